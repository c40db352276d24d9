"""Export a fairage model for other runtimes: ONNX (onnxruntime, TensorRT, ...) or TorchScript.

The exported graph takes **RGB float32 images in [0, 1], NCHW, shape (N, 3, S, S)** (input
``image``; N is dynamic) and returns the **apparent age in years**, float32 (N,) (output
``age``). The input normalisation of the network (``model.input_norm``) and the
label-unit-to-years scaling are inside the graph, so a caller only decodes, crops (see
``fairage.inference.predictor``: the detector box enlarged by 40% on each side, square), resizes to S
and divides by 255.

Metadata (written and read by ``fairage.store.exported``; ONNX ``metadata_props``, TorchScript extra file ``fairage.json``):
``fairage_image_size`` (S), ``fairage_input`` and ``fairage_output`` (the conventions above
in words), ``fairage_input_norm``, ``fairage_crop_margin``, ``fairage_name`` and
``fairage_config`` (the model's resolved config YAML, when known) and ``fairage_conformal``
(the model's conformal calibration, ``fairage.fairness.conformal``, as JSON; empty when it has none), so
an exported model gives the same age intervals as its run.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..data.decode import CROP_MARGIN
from ..errors import ConfigError
from ..store import exported
from .predictor import LoadedModel, load_model

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "image", "age"


class YearsModel(nn.Module):
    """An ``AgeRegressor`` whose output is in years: (N, 3, S, S) RGB [0, 1] -> (N,) years in 0-150."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ages(self.model(x))


def export_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The metadata written into an exported file (``fairage.store.exported``)."""
    return exported.export_metadata(
        loaded.image_size, loaded.input_norm, loaded.name, loaded.config, loaded.calibration, CROP_MARGIN
    )


def onnx_opsets() -> tuple[int, int]:
    """The ONNX opsets (lowest, highest) fairage exports with this torch's TorchScript-based exporter."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET, ONNX_MIN_OPSET
    except ImportError:  # a private module: torch may move it
        return 9, 18
    return max(9, ONNX_MIN_OPSET), ONNX_MAX_OPSET


def export_model(
    model: LoadedModel | str | os.PathLike, out: str | os.PathLike, fmt: str = "onnx", opset: int = 17
) -> Path:
    """Write ``model`` (a ``LoadedModel`` or a path for ``load_model``) to ``out`` atomically.

    ``fmt``: ``onnx`` (legacy TorchScript-based exporter, opset ``opset``, dynamic batch;
    needs the ``onnx`` package) or ``torchscript`` (``torch.jit.trace``; load it with
    ``torch.jit.load(path, _extra_files={"fairage.json": ""})``). Returns ``out``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose {' or '.join(FORMATS)}")
    low, high = onnx_opsets()
    if fmt == "onnx" and not low <= opset <= high:
        raise ConfigError(f"--opset {opset}: this torch exports ONNX opsets {low} to {high}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if loaded.kind == "exported":
        raise ConfigError(f"{loaded.source} is already an exported model; export a run or model folder")
    out = Path(out)
    wrapped = YearsModel(loaded.model).eval().float().to("cpu")
    size = loaded.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    meta = export_metadata(loaded)
    if fmt == "onnx":
        try:
            import onnx
        except ImportError:
            raise ConfigError("ONNX export needs the onnx package (pip install 'fairage[export]')") from None
        with atomic_path(out) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
            try:
                torch.onnx.export(
                    wrapped,
                    (example,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
            except (torch.onnx.errors.OnnxExporterError, ValueError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"ONNX export at opset {opset} failed: {reason[:300]}") from None
            proto = onnx.load(str(tmp))
            proto.doc_string = f"fairage age regressor: input {exported.EXPORT_INPUT}; output {exported.EXPORT_OUTPUT}"
            for key, value in meta.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapped, (example,))
        with atomic_path(out) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated
            torch.jit.save(traced, str(tmp), _extra_files={exported.TORCHSCRIPT_EXTRA: json.dumps(meta)})
    return out


class OnnxRuntimeForward:
    """A run or model folder's network run by ONNX Runtime on the CPU: (N, 3, S, S) float [0, 1]
    -> the network's raw output (label units or logits, as ``AgeRegressor.forward``), so the
    caller turns it into years and spreads exactly as for torch (``LoadedModel.outputs_to_years``).

    The network is exported in memory (the exporter of ``export_model``, opset 17, dynamic batch)
    and run with ``threads`` intra-op threads (one inter-op thread). ConfigError when onnx or
    onnxruntime is missing or the export fails.
    """

    def __init__(self, loaded: LoadedModel, threads: int = 1):
        import io

        try:
            import onnx  # noqa: F401 - the exporter needs it
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "--runtime onnxruntime needs onnx and onnxruntime (pip install 'fairage[export]')"
            ) from None
        if loaded.kind == "exported":
            raise ConfigError(f"{loaded.source} is an exported model: it runs on onnxruntime already")
        net = loaded.model
        device = next(net.parameters()).device
        net = net.to("cpu").eval()
        size = loaded.image_size
        example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
                torch.onnx.export(
                    net,
                    (example,),
                    buffer,
                    input_names=[INPUT_NAME],
                    output_names=["out"],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, "out": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except (torch.onnx.errors.OnnxExporterError, ValueError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"{loaded.source}: cannot run on onnxruntime, the export failed: {reason[:300]}"
            ) from None
        finally:
            loaded.model.to(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        self.threads = int(threads)
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor):
        import numpy as np

        (out,) = self.session.run(None, {INPUT_NAME: x.detach().cpu().numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

"""Keras 2 HDF5 files of the VGGFace2 ResNet50 (the course kit's network) -> a fairage model folder.

``read_keras_h5(path)`` reads, with h5py only (no TensorFlow, nothing unpickled), either kind of
Keras 2 HDF5 file:

* a full model (``model.save("x.h5")``): weights under the ``model_weights`` group, the
  architecture as JSON in the root attribute ``model_config``;
* weights only (``model.save_weights("x.h5")``): the layer groups at the root.

In both, the weights group lists its layers in the attribute ``layer_names`` and each layer
group lists its tensors in ``weight_names`` (e.g. ``conv1/7x7_s2/bn/gamma:0``; the "/" in
Keras names nests the HDF5 groups). The importer follows those attributes, never the raw keys,
and takes the owning layer from each weight name (so a backbone nested as one sub-model
layer is read too).

Mapping (``fairage.models.vggface2.keras_layer_map``): every convolution and BatchNormalization of the
backbone, ``dim_proj`` -> ``projection`` (Dense(512) + ReLU) and, when the file holds a trained
age model, the Dense layers after ``dim_proj`` ending in one unit -> fairage's head. Conv
kernels are stored (h, w, in, out) and become (out, in, h, w) (a transpose, never a spatial
flip); Dense kernels (in, out) are transposed; BatchNorm gamma/beta/moving_mean/moving_variance
become weight/bias/running_mean/running_var. The head's activations come from ``model_config``
when the file has one, else from the kit's convention (ReLU hidden layers, a sigmoid output read
as years / 100). The 8631-identity classifiers (``classifier``, ``classifier_low_dim``) are
skipped. Anything else (an unknown weighted layer, a missing layer, a shape that does not fit, an
unreadable dataset, another architecture) is a ``DataError`` naming it.

``write_model_folder(result, out)`` writes the model folder atomically (a temporary folder
renamed onto ``out``): ``config.yaml`` (a full ExperimentConfig: the imported network, 224 px,
and preset M3's kit/authors schedules without sample weights), ``model.safetensors`` (the
AgeRegressor state dict: ``backbone.*``, ``projection.*`` and ``head.*`` when a head was
imported) and ``import.json`` (what was mapped, from where).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config.files import dump_config
from ..config.presets import preset_raw
from ..config.schema import ExperimentConfig, validate_config
from ..errors import ConfigError, DataError
from ..models.regressor import AgeRegressor
from ..models.vggface2 import keras_layer_map
from ..store import model_folder

#: the 8631-identity classifiers of the VGGFace2 model (the kit removes them)
CLASSIFIERS = ("classifier", "classifier_low_dim")
#: the image side the Keras model was built for
KERAS_IMAGE_SIZE = 224
#: BatchNormalization variable -> torch BatchNorm2d tensor
_BN_VARS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
#: the preset whose stages (the kit's stage I, the authors' stage II; weights dropped) an
#: imported model's config.yaml carries, so the folder's config trains as it stands
SCHEDULE_PRESET = "M3"


@dataclass
class HeadLayer:
    """One Dense layer of an imported age head."""

    name: str
    units: int
    activation: str
    dropout: float = 0.0


@dataclass
class KerasImport:
    """What ``read_keras_h5`` found and converted."""

    source: Path
    kind: str  # "full model" or "weights only"
    config: ExperimentConfig
    state: dict[str, torch.Tensor]
    #: Keras layer -> fairage module, for every layer mapped
    mapping: dict[str, str]
    head: list[HeadLayer]
    #: "model_config" or "kit convention" (None without a head)
    head_activations_from: str | None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keras_version: str | None = None

    def summary(self) -> dict:
        """The ``import.json`` content."""
        return {
            "source": str(self.source.resolve()),
            "sha256": _sha256(self.source),
            "kind": self.kind,
            "keras_version": self.keras_version,
            "input_norm": self.config.model.input_norm,
            "image_size": self.config.data.image_size,
            "backbone": self.config.model.backbone,
            "layers_mapped": len(self.mapping),
            "mapping": self.mapping,
            "head": [vars(h) for h in self.head] or None,
            "head_activations_from": self.head_activations_from,
            "skipped": self.skipped,
            "notes": self.notes,
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values) -> list[str]:
    return [_text(v) for v in np.atleast_1d(values)] if values is not None else []


#: the most values one dataset of a layer fairage has no fixed shape for (dim_proj, a head's Dense
#: layers, the identity classifiers) may declare: the VGGFace2 classifier holds 512 x 8631 = 4.4 M
MAX_DATASET_VALUES = 1 << 25
#: the most values all datasets read together may declare (the whole network holds ~25 M)
MAX_TOTAL_VALUES = 1 << 27
#: the most HDF5 objects a file may hold (the network with its head has ~330)
MAX_OBJECTS = 100_000


def _refuse_outside_storage(path: Path, handle) -> None:
    """DataError for any object whose bytes live outside ``path``, found before any dataset is read.

    External links (another file's object), soft links (Keras writes none; they could lead
    around this check), datasets with external storage (raw bytes in another file, e.g.
    ``/etc/passwd``) and virtual datasets (mapped from other files). Only link and dataset
    headers are looked at: nothing outside ``path`` is opened.
    """
    import h5py

    seen: set = set()
    stack: list[tuple[str, h5py.Group]] = [("", handle)]
    while stack:
        prefix, group = stack.pop()
        for name in group:
            where = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise DataError(
                    f"{path}: '{where}' is an external link to {link.filename}:{link.path}; "
                    "import-keras reads only the file it is given (Keras files hold no links)"
                )
            if isinstance(link, h5py.SoftLink):
                raise DataError(f"{path}: '{where}' is a soft link to {link.path}; Keras files hold no links")
            obj = group.get(name)
            if obj.id in seen:  # a group hard-linked twice (or into itself) is walked once
                continue
            seen.add(obj.id)
            if len(seen) > MAX_OBJECTS:
                raise DataError(f"{path} holds more than {MAX_OBJECTS} HDF5 objects; not a Keras weights file")
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    sources = sorted({s.file_name for s in obj.virtual_sources()})
                    raise DataError(
                        f"{path}: dataset '{where}' is a virtual dataset mapped from "
                        f"{', '.join(sources)}; import-keras reads only the file it is given"
                    )
                if obj.external:
                    files = sorted({_text(entry[0]) for entry in obj.external})
                    raise DataError(
                        f"{path}: dataset '{where}' has external storage (its bytes are in "
                        f"{', '.join(files)}); import-keras reads only the file it is given"
                    )
            elif isinstance(obj, h5py.Group):
                stack.append((where, obj))


def _expected_shapes() -> dict[tuple[str, str], tuple[int, ...]]:
    """(Keras layer, variable) -> the Keras shape the VGGFace2 ResNet50 needs (backbone layers)."""
    from ..models.vggface2 import VGGFace2ResNet50

    with torch.device("meta"):  # shapes only: nothing is allocated
        own = {k: tuple(v.shape) for k, v in VGGFace2ResNet50().state_dict().items()}
    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for keras_name, module in keras_layer_map().items():
        if not module.startswith("backbone."):
            continue
        key = module[len("backbone.") :]
        if keras_name.endswith("/bn"):
            for variable, torch_name in _BN_VARS.items():
                shapes[(keras_name, variable)] = own[f"{key}.{torch_name}"]
        else:
            out, cin, h, w = own[f"{key}.weight"]
            shapes[(keras_name, "kernel")] = (h, w, cin, out)
    return shapes


def _check_dataset(
    path: Path, layer: str, weight: str, owner: str, variable: str, dataset, expected: dict, total: int
) -> int:
    """DataError unless ``dataset``'s declared dtype and shape fit; returns the running count of values."""
    dtype, shape = dataset.dtype, tuple(dataset.shape)
    if dtype.kind != "f":
        raise DataError(
            f"{path}: weight '{weight}' of layer '{layer}' holds {dtype} values; Keras weights are "
            "floating-point numbers"
        )
    need = expected.get((owner, variable))
    if need is not None and shape != need:
        raise DataError(
            f"{path}: layer '{owner}': shape mismatch, file {shape} ({weight}), the VGGFace2 ResNet50 needs {need}"
        )
    values = int(np.prod(shape, dtype=object))
    if need is None and (len(shape) > 4 or values > MAX_DATASET_VALUES):
        raise DataError(
            f"{path}: weight '{weight}' of layer '{layer}' declares shape {shape} ({values} values); "
            f"a layer of an age model holds at most {MAX_DATASET_VALUES} values in at most 4 dimensions"
        )
    total += values
    if total > MAX_TOTAL_VALUES:
        raise DataError(
            f"{path}: its weights declare more than {MAX_TOTAL_VALUES} values in all; the VGGFace2 "
            "ResNet50 with an age head holds about 25 million"
        )
    return total


def _read_layers(path: Path, group) -> dict[str, dict[str, np.ndarray]]:
    """Owning layer -> {variable: array}, in file order, following ``layer_names``/``weight_names``.

    Every dataset's declared dtype and shape are checked before its bytes are read.
    """
    import h5py

    layers: dict[str, dict[str, np.ndarray]] = {}
    known = keras_layer_map()
    expected = _expected_shapes()
    total = 0
    for layer in _texts(group.attrs.get("layer_names")):
        if layer not in group:
            raise DataError(f"{path}: layer '{layer}' is listed in layer_names but has no group")
        layer_group = group[layer]
        if not isinstance(layer_group, h5py.Group):
            raise DataError(f"{path}: layer '{layer}' is listed in layer_names but is not a group")
        for weight in _texts(layer_group.attrs.get("weight_names")):
            owner, _, variable = weight.rpartition("/")
            variable = variable.split(":", 1)[0]
            # a weight named without its layer (or under an outer scope) belongs to the group's layer
            if not owner or (owner not in known and layer in known):
                owner = layer
            try:
                dataset = layer_group[weight]
                if not isinstance(dataset, h5py.Dataset):
                    raise KeyError(weight)
                total = _check_dataset(path, layer, weight, owner, variable, dataset, expected, total)
                array = np.asarray(dataset[()])
            except KeyError:
                raise DataError(
                    f"{path}: weight '{weight}' of layer '{layer}' is listed in weight_names but not stored"
                ) from None
            except (OSError, RuntimeError, ValueError, TypeError) as err:
                raise DataError(
                    f"{path}: weight '{weight}' of layer '{layer}' cannot be read ({err}); "
                    "the file is truncated or corrupt"
                ) from None
            layers.setdefault(owner, {})[variable] = array
    return layers


def _model_config(path: Path, handle) -> dict | None:
    raw = handle.attrs.get("model_config")
    if raw is None:
        return None
    try:
        config = json.loads(_text(raw))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: its model_config attribute is not valid JSON ({err})") from None
    return config


def _mapping(value) -> dict:
    """``value`` if it is a mapping, else ``{}`` (a model_config's parts are JSON of any shape)."""
    return value if isinstance(value, dict) else {}


def _config_layers(config: dict | None) -> list[dict]:
    """The layer entries of a Keras model config, nested models flattened, in order."""
    if not isinstance(config, dict):
        return []
    out: list[dict] = []
    layers = _mapping(config.get("config")).get("layers")
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict):
            continue
        if isinstance(_mapping(layer.get("config")).get("layers"), list):
            out += _config_layers(layer)
        else:
            out.append(layer)
    return out


def _layer_name(entry: dict) -> str:
    return str(entry.get("name") or _mapping(entry.get("config")).get("name") or "")


def read_keras_h5(path: str | os.PathLike, input_norm: str = "vggface2") -> KerasImport:
    """Read a Keras 2 HDF5 file of the VGGFace2 ResNet50 (optionally with an age head); see the module doc."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if input_norm not in ("imagenet", "vggface2", "caffe"):
        raise ConfigError(f"--input-norm '{input_norm}' is not one of imagenet, vggface2, caffe")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise DataError(
            f"{path} is not an HDF5 file ({err}); import-keras reads Keras 2 .h5 files "
            "(model.save or model.save_weights)"
        ) from None
    with handle:
        # before any name is looked up: a lookup through an external link opens the other file
        try:
            _refuse_outside_storage(path, handle)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise DataError(
                f"{path}: its HDF5 objects cannot be listed ({err}); the file is truncated or corrupt"
            ) from None
        if "model_weights" in handle:
            kind, group = "full model", handle["model_weights"]
            config = _model_config(path, handle)
        elif "layer_names" in handle.attrs:
            kind, group, config = "weights only", handle, None
        else:
            raise DataError(
                f"{path} holds no Keras 2 weights (neither a model_weights group nor a layer_names "
                "attribute); Keras 3 .keras / .weights.h5 files are not read"
            )
        keras_version = _text(handle.attrs["keras_version"]) if "keras_version" in handle.attrs else None
        layers = _read_layers(path, group)
    return _convert(path, kind, layers, config, input_norm, keras_version)


def _convert(
    path: Path,
    kind: str,
    layers: dict[str, dict[str, np.ndarray]],
    config: dict | None,
    input_norm: str,
    keras_version: str | None,
) -> KerasImport:
    known = keras_layer_map()
    notes: list[str] = []
    dense, skipped = _sort_layers(path, layers, known)
    config_layers = {_layer_name(e): e for e in _config_layers(config)}
    if config is not None:
        order = [n for n in config_layers if n in dense] + [n for n in dense if n not in config_layers]
        dense = order
    projection_dim = int(layers["dim_proj"]["kernel"].shape[-1])
    head = _head_layers(path, dense, layers, config_layers, projection_dim, notes)
    dim_proj_activation = _mapping(_mapping(config_layers.get("dim_proj")).get("config")).get("activation")
    if dim_proj_activation not in (None, "relu"):
        raise DataError(
            f"{path}: dim_proj has activation '{dim_proj_activation}'; the VGGFace2 ResNet50 "
            "(and fairage's vggface2_resnet50) use relu"
        )
    cfg = validate_config(_imported_raw(path, kind, projection_dim, head, input_norm), f"import of {path}")
    state, mapping = _imported_state(path, AgeRegressor(cfg.model), known, layers, head, notes)
    if config is None and head:
        notes.append(
            "weights-only file: no model_config, so the head's activations follow the kit's convention "
            "(ReLU hidden layers, sigmoid output x 100 = years) and its dropout rates are unknown (0)"
        )
    return KerasImport(
        source=path,
        kind=kind,
        config=cfg,
        state=state,
        mapping=mapping,
        head=head,
        head_activations_from=None if not head else ("model_config" if config else "kit convention"),
        skipped=skipped,
        notes=notes,
        keras_version=keras_version,
    )


def _sort_layers(path: Path, layers: dict, known: dict) -> tuple[list[str], list[str]]:
    """The file's Dense layers after the backbone (candidates of an age head) and the skipped ones'
    descriptions; DataError when it is not the VGGFace2 ResNet50 or has layers of neither kind."""
    if "conv1/7x7_s2" not in layers:
        sample = ", ".join(list(layers)[:6]) or "none"
        raise DataError(
            f"{path} is not the VGGFace2 ResNet50: it has no layer 'conv1/7x7_s2' "
            f"(its weighted layers include: {sample})"
        )
    missing = [name for name in known if name not in layers]
    if missing:
        raise DataError(
            f"{path}: layer '{missing[0]}' of the VGGFace2 ResNet50 is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    skipped: list[str] = []
    dense: list[str] = []
    for name, variables in layers.items():
        if name in known:
            continue
        if name in CLASSIFIERS:
            skipped.append(
                f"{name}: the {_shape_of(variables)} identity classifier of VGGFace2 training (not used for age)"
            )
        elif set(variables) == {"kernel", "bias"} and variables["kernel"].ndim == 2:
            dense.append(name)
        else:
            raise DataError(
                f"{path}: layer '{name}' ({', '.join(sorted(variables))}) is not part of the "
                "VGGFace2 ResNet50 nor a Dense layer of an age head"
            )
    return dense, skipped


def _imported_raw(path: Path, kind: str, projection_dim: int, head: list, input_norm: str) -> dict:
    """The raw config of the imported model: the VGGFace2 ResNet50, its projection and head, the kit's schedule."""
    return {
        "name": path.stem,
        "description": f"Imported from {path.name} ({kind} Keras HDF5) by fairage import-keras.",
        "model": {
            "backbone": "vggface2_resnet50",
            "projection_dim": projection_dim,
            "head": [{"units": h.units, "dropout": h.dropout} for h in head[:-1]]
            if head
            else [{"units": 128}, {"units": 32}],
            "output": "sigmoid" if not head or head[-1].activation == "sigmoid" else "linear",
            "input_norm": input_norm,
            "head_init": "keras",
        },
        "data": {"image_size": KERAS_IMAGE_SIZE},
        **_schedule(),
    }


def _imported_state(
    path: Path, model: AgeRegressor, known: dict, layers: dict, head: list, notes: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict from the Keras layers, and which Keras layer went to which module
    (a note added when there is no head)."""
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    mapping: dict[str, str] = {}
    for keras_name, module in known.items():
        for key, tensor in _tensors(path, keras_name, layers[keras_name]).items():
            _put(path, keras_name, f"{module}.{key}", tensor, own, state)
        mapping[keras_name] = module
    if head:
        linears = [i for i, m in enumerate(model.head) if isinstance(m, torch.nn.Linear)]
        for layer, index in zip(head, linears):
            for key, tensor in _tensors(path, layer.name, layers[layer.name]).items():
                _put(path, layer.name, f"head.{index}.{key}", tensor, own, state)
            mapping[layer.name] = f"head.{index}"
    else:
        notes.append(
            "no age head in the file (no Dense layers after dim_proj): the folder holds the backbone "
            "and dim_proj; its config names the kit head (128, 32), which starts at random init"
        )
    for key, tensor in own.items():  # BatchNorm step counters: Keras has none
        if key.endswith("num_batches_tracked") and key.startswith("backbone."):
            state[key] = torch.zeros_like(tensor)
    return state, mapping


def _schedule() -> dict:
    """The stages of ``SCHEDULE_PRESET`` at full scale, without sample weights."""
    raw = preset_raw(SCHEDULE_PRESET)
    stages = {name: dict(raw[name]) for name in ("stage1", "stage2") if raw.get(name)}
    for stage in stages.values():
        stage.pop("weighting", None)
    return stages


def _shape_of(variables: dict[str, np.ndarray]) -> str:
    kernel = variables.get("kernel")
    return f"{kernel.shape[-1]}-way" if kernel is not None else "unknown"


def _head_layers(
    path: Path, dense: list[str], layers: dict, config_layers: dict, width: int, notes: list[str]
) -> list[HeadLayer]:
    """The age head's Dense layers, checked to chain from ``dim_proj`` to one output unit."""
    if not dense:
        return []
    head: list[HeadLayer] = []
    names = list(config_layers)
    for position, name in enumerate(dense):
        kernel = layers[name]["kernel"]
        if kernel.shape[0] != width:
            raise DataError(
                f"{path}: Dense layer '{name}' takes {kernel.shape[0]} inputs but the layer before it "
                f"gives {width}: not an age head after dim_proj"
            )
        last = position == len(dense) - 1
        entry = config_layers.get(name)
        if entry is not None:
            activation = str(_mapping(entry.get("config")).get("activation", "linear"))
        else:
            activation = "sigmoid" if last else "relu"
        if not last and activation != "relu":
            raise DataError(
                f"{path}: head layer '{name}' has activation '{activation}'; fairage's head uses relu "
                "between its Dense layers"
            )
        if last and activation not in ("sigmoid", "linear"):
            raise DataError(
                f"{path}: the output layer '{name}' has activation '{activation}'; fairage reads "
                "sigmoid (years / 100) or linear outputs"
            )
        dropout = _dropout_before(path, name, names, config_layers)
        if last and dropout:
            notes.append(
                f"Dropout {dropout} before the output layer '{name}' is not represented (no effect on predictions)"
            )
            dropout = 0.0
        head.append(HeadLayer(name=name, units=int(kernel.shape[1]), activation=activation, dropout=dropout))
        width = int(kernel.shape[1])
    if width != 1:
        raise DataError(f"{path}: the last Dense layer '{dense[-1]}' has {width} units; an age head ends in one unit")
    if head[-1].activation == "linear":
        notes.append(f"the output layer '{head[-1].name}' is linear: its output is read as years")
    return head


def _dropout_before(path: Path, name: str, names: list[str], config_layers: dict) -> float:
    """The rate of a Dropout layer directly before ``name`` in the model config (0 if none)."""
    if name not in config_layers:
        return 0.0
    index = names.index(name)
    if index > 0 and config_layers[names[index - 1]].get("class_name") == "Dropout":
        rate = _mapping(config_layers[names[index - 1]].get("config")).get("rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise DataError(
                f"{path}: model_config: the Dropout before '{name}' has rate {str(rate)[:40]!r}; "
                "a rate is a number in [0, 1)"
            )
        return float(rate)
    return 0.0


def _tensors(path: Path, keras_name: str, variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """One Keras layer's arrays as torch tensors named like the matching torch module's."""
    out: dict[str, torch.Tensor] = {}
    if "kernel" in variables:
        kernel = variables["kernel"]
        if kernel.ndim == 4:  # (h, w, in, out) -> (out, in, h, w)
            out["weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        else:  # Dense (in, out) -> (out, in)
            out["weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T))
        if "bias" in variables:
            out["bias"] = torch.from_numpy(np.asarray(variables["bias"]))
        extra = set(variables) - {"kernel", "bias"}
    else:
        missing = [v for v in _BN_VARS if v not in variables]
        if missing:
            raise DataError(
                f"{path}: layer '{keras_name}' lacks {', '.join(missing)} (a BatchNormalization needs "
                f"{', '.join(_BN_VARS)})"
            )
        for variable, key in _BN_VARS.items():
            out[key] = torch.from_numpy(np.asarray(variables[variable]))
        extra = set(variables) - set(_BN_VARS)
    if extra:
        raise DataError(f"{path}: layer '{keras_name}' holds unexpected weights: {', '.join(sorted(extra))}")
    return {k: v.float() for k, v in out.items()}


def _put(path: Path, keras_name: str, key: str, tensor: torch.Tensor, own: dict, state: dict) -> None:
    if key not in own:
        raise DataError(f"{path}: layer '{keras_name}' has a weight fairage has no place for ({key})")
    if tuple(own[key].shape) != tuple(tensor.shape):
        raise DataError(
            f"{path}: layer '{keras_name}': shape mismatch, file {tuple(tensor.shape)} "
            f"(as {key}), the VGGFace2 ResNet50 needs {tuple(own[key].shape)}"
        )
    state[key] = tensor


def write_model_folder(result: KerasImport, out: str | os.PathLike) -> Path:
    """Write ``config.yaml``, ``model.safetensors`` and ``import.json`` to ``out``, atomically.

    ``out`` must not exist or be an empty folder. The files are written into a temporary
    folder next to it, renamed onto ``out`` at the end: on any error nothing is left at ``out``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        (tmp / model_folder.CONFIG).write_text(dump_config(result.config), encoding="utf-8")
        save_file(
            {k: v.contiguous() for k, v in result.state.items()},
            str(tmp / model_folder.WEIGHTS),
            metadata={"source": result.source.name, "format": "fairage AgeRegressor state dict"},
        )
        (tmp / model_folder.IMPORT).write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out


def import_keras(path: str | os.PathLike, out: str | os.PathLike, input_norm: str = "vggface2") -> KerasImport:
    """``read_keras_h5`` then ``write_model_folder``; returns what was imported."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new folder")
    result = read_keras_h5(path, input_norm)
    write_model_folder(result, out)
    return result

"""Exported-model metadata, both ways: what ``fairage export`` writes into an ``.onnx`` (``metadata_props``) or
TorchScript file (extra file ``fairage.json``), and how a loader reads it back, checked as strictly as a config.

Keys (all values strings): ``fairage_image_size`` (S), ``fairage_input`` and ``fairage_output`` (the
conventions in words), ``fairage_input_norm``, ``fairage_crop_margin``, ``fairage_name``, ``fairage_config``
(the model's resolved config YAML, when known) and ``fairage_conformal`` (its calibration's JSON, when it has one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..fairness.conformal import EXPORT_KEY, Calibration, calibration_from_text

if TYPE_CHECKING:
    from ..config.schema import ExperimentConfig

#: the TorchScript extra file holding the metadata
TORCHSCRIPT_EXTRA = "fairage.json"
EXPORT_INPUT = "RGB float32 NCHW in [0, 1], shape (N, 3, S, S); the model normalises it itself"
EXPORT_OUTPUT = "apparent age in years, float32, shape (N,)"
INPUT_NORMS = ("imagenet", "vggface2", "caffe")


def export_metadata(
    image_size: int,
    input_norm: str,
    name: str,
    config: ExperimentConfig | None,
    calibration: Calibration | None,
    crop_margin: float,
) -> dict[str, str]:
    """The metadata written into an exported file (all values strings)."""
    from ..config.files import dump_config

    return {
        "fairage_image_size": str(image_size),
        "fairage_input": EXPORT_INPUT,
        "fairage_output": EXPORT_OUTPUT,
        "fairage_input_norm": input_norm,
        "fairage_crop_margin": str(crop_margin),
        "fairage_name": name,
        "fairage_config": dump_config(config) if config is not None else "",
        EXPORT_KEY: json.dumps(calibration.to_json()) if calibration is not None else "",
    }


@dataclass
class ExportedInfo:
    """What an exported file's metadata says: input side, normalisation, name, config and calibration."""

    image_size: int
    input_norm: str
    name: str
    config: ExperimentConfig | None
    calibration: Calibration | None


def read_export_metadata(meta: dict, path: Path) -> ExportedInfo:
    """The metadata of the exported file ``path``, checked; ConfigError naming the file and the key."""
    from ..config.files import load_yaml
    from ..config.schema import MAX_IMAGE_SIZE, validate_config

    if "fairage_image_size" not in meta:
        raise ConfigError(f"{path}: no fairage metadata (fairage_image_size); export it with `fairage export`")
    # the metadata decides how much is allocated per face: checked as strictly as a config
    text = str(meta["fairage_image_size"]).strip()
    size = int(text) if text.isdigit() and len(text) <= 6 else None
    if size is None or not 8 <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"{path}: its metadata fairage_image_size {text[:40]!r} is not an image side of 8 to {MAX_IMAGE_SIZE} px"
        )
    norm = meta.get("fairage_input_norm", "")
    if norm not in ("", *INPUT_NORMS):
        raise ConfigError(f"{path}: its metadata fairage_input_norm {norm[:40]!r} is not imagenet, vggface2 or caffe")
    cfg = None
    if meta.get("fairage_config"):
        import yaml

        try:
            raw = load_yaml(meta["fairage_config"], f"{path} (metadata fairage_config)")
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: its metadata fairage_config is not valid YAML ({err})") from None
        cfg = validate_config(raw, f"{path} (metadata fairage_config)")
    calibration = calibration_from_text(meta.get(EXPORT_KEY), f"{path} (metadata {EXPORT_KEY})")
    return ExportedInfo(size, norm, str(meta.get("fairage_name", path.stem))[:200], cfg, calibration)

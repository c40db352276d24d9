"""Model folders and which kind of model a path names.

A model folder (``fairage import-keras`` writes one) holds ``config.yaml``, the network's weights
``model.safetensors`` and optionally ``import.json`` and ``conformal.json``; it is not a run folder (no
record, history or evaluation). ``model_kind`` decides once, for predict, evaluate, export, serve and the
model card, whether a path is a run folder, a model folder or an exported file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    from ..config.schema import ExperimentConfig
    from ..models.regressor import AgeRegressor

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
IMPORT = "import.json"
KINDS = ("run", "folder", "exported")


def model_kind(path: str | Path) -> str:
    """``"run"`` (a training run folder), ``"folder"`` (a model folder) or ``"exported"`` (a file).

    DataError naming ``path`` when it is none of these.
    """
    from .run_folder import RunFolder

    path = Path(path)
    if path.is_file():
        return "exported"
    if not path.is_dir():
        raise DataError(f"{path}: model not found")
    if not (path / CONFIG).is_file():
        raise DataError(
            f"{path} holds no {CONFIG}: not a fairage model: expected a run folder (config.yaml + "
            "checkpoints/), a model folder (config.yaml + model.safetensors) or an exported model file"
        )
    if RunFolder.exists(path):
        return "run"
    if (path / WEIGHTS).is_file():
        return "folder"
    raise DataError(f"{path} has a {CONFIG} but neither {RunFolder.RUN} (a run folder) nor {WEIGHTS} (a model folder)")


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a model folder (not a run folder, not a file)."""
    try:
        return model_kind(path) == "folder"
    except DataError:
        return False


def read_config(path: str | Path) -> ExperimentConfig:
    """A model folder's validated config."""
    from ..config.files import read_yaml
    from ..config.schema import validate_config

    config_path = Path(path) / CONFIG
    return validate_config(read_yaml(config_path), str(config_path))


def read_import_info(path: str | Path) -> dict:
    """A model folder's ``import.json`` object (``{}`` when absent); DataError naming the file when unreadable."""
    import_path = Path(path) / IMPORT
    if not import_path.is_file():
        return {}
    try:
        info = json.loads(import_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{import_path} is not readable JSON: {err}") from None
    if not isinstance(info, dict):
        raise DataError(f"{import_path} does not hold a JSON object")
    return info


def load_model_folder(path: str | Path) -> tuple[AgeRegressor, ExperimentConfig]:
    """A model folder's network (eval mode, fp32, CPU) and config; DataError naming the weights file when
    it cannot be read or does not fit the config's model."""
    from safetensors.torch import load_file

    from ..models.regressor import AgeRegressor

    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DataError(f"{weights}: cannot read ({type(err).__name__}: {err})") from None
    model = AgeRegressor(cfg.model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"{weights}: weights do not match the config's model (missing "
            f"{', '.join(result.missing_keys[:5]) or 'none'}; unexpected "
            f"{', '.join(result.unexpected_keys[:5]) or 'none'})"
        )
    return model.eval().float(), cfg

"""Training checkpoints: the one reader of a checkpoint file, its model weights and the config saved inside.

Every path from a checkpoint to a model goes through here (train's next stage and test predictions,
``export-backbone``, ``predict``, ``serve``, the tuner): ``read_checkpoint`` loads the file once with
``weights_only=True``, ``model_state`` takes the model's weights out of it (the Lightning module's
``model.`` prefix stripped), ``load_weights`` puts them into a model and ``model_from_checkpoint``
builds the model from the file. Anything wrong with the file is a DataError naming it.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    import torch

    from ..config.schema import ExperimentConfig
    from ..models.regressor import AgeRegressor

#: the key under which training stores the run's config (YAML text) in every checkpoint
CONFIG_KEY = "fairage_config"
#: the Lightning module holds the network as ``self.model``: its keys carry this prefix in a checkpoint
MODEL_PREFIX = "model."


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file loaded with ``weights_only=True``; DataError naming it when corrupt or truncated."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise
        from ..models.regressor import load_error_reason

        text = str(err)
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
            # a complete file whose pickle names more than tensors: not damage, and never to be unpickled
            raise DataError(
                f"{path}: {load_error_reason(err)}; it is not a checkpoint fairage training wrote "
                "(delete it to retrain from the previous checkpoint, or start a new run)"
            ) from None
        reason = text.splitlines()[0] if text else type(err).__name__
        raise DataError(
            f"{path} is corrupt or truncated ({reason}); delete it to retrain from the "
            "previous checkpoint, or start a new run"
        ) from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path} is not a fairage checkpoint (no mapping at the top level)")
    return ckpt


def strip_model_prefix(state: dict) -> dict:
    """The entries of a Lightning state dict that belong to the network, without their ``model.`` prefix."""
    return {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def model_state(ckpt: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The network's weights in checkpoint ``ckpt`` (read from ``path``); DataError naming it when it holds none."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise DataError(f"{path} holds no 'state_dict': not a fairage training checkpoint")
    return strip_model_prefix(state)


def load_weights(model: AgeRegressor, path: str | Path, ckpt: dict | None = None) -> None:
    """Load the checkpoint's network weights into ``model`` (``ckpt``: the file already read, else it is read).

    DataError naming the file when they do not fit ``model`` (the run's config.yaml names another network).
    """
    state = model_state(read_checkpoint(path) if ckpt is None else ckpt, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys or other shapes: config.yaml names another model
        raise DataError(
            f"{path}: its weights do not fit the model of the run's config.yaml ({_first_line(err)}); "
            "was config.yaml edited? Restore it, or start a new run"
        ) from None


def saved_config(ckpt: dict, path: str | Path) -> ExperimentConfig | None:
    """The config training saved inside the checkpoint, validated; None when it holds none (an older file)."""
    import yaml

    from ..config.files import load_yaml
    from ..config.schema import validate_config

    text = ckpt.get(CONFIG_KEY)
    if not isinstance(text, str):
        return None
    try:
        raw = load_yaml(text, f"{path} ({CONFIG_KEY})")
    except yaml.YAMLError as err:
        raise DataError(f"{path}: the config saved inside is not valid YAML: {err}") from None
    return validate_config(raw, f"{path} ({CONFIG_KEY})")


def model_from_checkpoint(
    path: str | Path,
    config: ExperimentConfig | None = None,
) -> tuple[AgeRegressor, ExperimentConfig]:
    """The model of a fairage training checkpoint (eval mode, CPU) and its config; the file is read once.

    The config is the one saved inside the file; ``config`` (the run folder's config.yaml) stands in
    for a file written before checkpoints held theirs. DataError naming the file when it is corrupt,
    holds no config and none is given, or its weights do not fit.
    """
    from ..models.regressor import AgeRegressor

    path = Path(path)
    ckpt = read_checkpoint(path)
    cfg = saved_config(ckpt, path) or config
    if cfg is None:
        raise DataError(
            f"{path} does not hold its config ('{CONFIG_KEY}'); it was not written by "
            "fairage training, or by an older version: use its run folder instead"
        )
    model = AgeRegressor(cfg.model)
    load_weights(model, path, ckpt)
    return model.eval(), cfg


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."

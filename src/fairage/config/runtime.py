"""Lightning settings checked against this machine before a run starts (``check_trainer``)."""

from __future__ import annotations

import difflib
import re

from ..errors import ConfigError
from .schema import TrainerConfig

# --------------------------------------------------------------------------- Lightning settings


def check_trainer(trainer: TrainerConfig) -> None:
    """Check the Lightning settings of ``trainer`` against this machine; ConfigError naming the key.

    Catches what Lightning would only refuse once training starts (a misspelt accelerator,
    strategy or precision, malformed devices, a GPU asked for where there is none), so a
    command can refuse before it creates a run folder.
    """
    import typing

    import torch
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    try:  # Lightning's own list; it has no public name
        from lightning.fabric.connector import (
            _PRECISION_INPUT_STR,
            _PRECISION_INPUT_STR_ALIAS,
        )

        precision_names = [*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS)]
    except ImportError:
        precision_names = [
            "16-true",
            "16-mixed",
            "bf16-true",
            "bf16-mixed",
            "32-true",
            "64-true",
            "64",
            "32",
            "16",
            "bf16",
            "transformer-engine",
            "transformer-engine-float16",
        ]

    accelerators = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    acc = trainer.accelerator
    if acc not in accelerators:
        close = difflib.get_close_matches(acc, accelerators, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"trainer.accelerator '{acc}' is not known{hint}; choose one of {', '.join(accelerators)}")
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator '{acc}': no CUDA GPU is available on this machine (use cpu or auto)")
    if acc not in ("auto", "gpu") and not AcceleratorRegistry[acc]["accelerator"].is_available():
        raise ConfigError(f"trainer.accelerator '{acc}' is not available on this machine (use cpu or auto)")

    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if trainer.strategy not in strategies:
        close = difflib.get_close_matches(trainer.strategy, strategies, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"trainer.strategy '{trainer.strategy}' is not known{hint}; choose one of {', '.join(strategies)}"
        )

    precisions = ["auto", *precision_names]
    if trainer.precision not in precisions:
        close = difflib.get_close_matches(trainer.precision, precisions, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"trainer.precision '{trainer.precision}' is not known{hint}; choose one of {', '.join(precisions)}"
        )

    if trainer.logger == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError(
                "trainer.logger 'tensorboard' needs the tensorboard package: "
                "pip install 'fairage[tensorboard]' (or use csv)"
            )
    if trainer.logger == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError(
                "trainer.logger 'mlflow' needs the mlflow package: "
                "pip install 'fairage[mlflow]' (or pip install mlflow-skinny; or use csv)"
            )

    devices = trainer.devices
    text = str(devices).strip()
    if not (text == "auto" or re.fullmatch(r"-?\d+", text) or re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text)):
        raise ConfigError(
            f"trainer.devices '{devices}' is not a number of devices, auto, -1 (all) "
            "or a list of device indices like 0,1"
        )
    count = int(text) if re.fullmatch(r"-?\d+", text) else None
    if count is not None and count != -1 and count < 1:
        raise ConfigError(f"trainer.devices {devices}: give at least 1 device (or -1 for all, or auto)")
    if acc in ("gpu", "cuda") and count is not None and count > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices {devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")

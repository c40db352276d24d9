"""Lightning settings checked against this machine before a run starts (``check_trainer``), and one run's
resolved accelerator, devices, precision and seed (``RuntimeSettings``)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .schema import TrainerConfig

# --------------------------------------------------------------------------- Lightning settings


def check_trainer(trainer: TrainerConfig) -> None:
    """Check the Lightning settings of ``trainer`` against this machine; ConfigError naming the key.

    Catches what Lightning would only refuse once training starts (a misspelt accelerator,
    strategy or precision, malformed devices, a GPU asked for where there is none), so a
    command can refuse before it creates a run folder.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    _check_accelerator(trainer.accelerator)
    _check_known("trainer.strategy", trainer.strategy, ["auto", *StrategyRegistry.available_strategies()])
    _check_known("trainer.precision", trainer.precision, ["auto", *_precision_names()])
    _check_logger(trainer.logger)
    _check_devices(trainer.devices, trainer.accelerator)


def _precision_names() -> list[str]:
    """The precisions Lightning accepts."""
    import typing

    try:  # Lightning's own list; it has no public name
        from lightning.fabric.connector import (
            _PRECISION_INPUT_STR,
            _PRECISION_INPUT_STR_ALIAS,
        )

        return [*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS)]
    except ImportError:
        return [
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


def _check_known(key: str, value: str, choices: list[str]) -> None:
    """ConfigError naming ``key`` (and the closest of ``choices``) when ``value`` is not one of them."""
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key} '{value}' is not known{hint}; choose one of {', '.join(choices)}")


def _check_accelerator(acc: str) -> None:
    import torch
    from lightning.pytorch.accelerators import AcceleratorRegistry

    _check_known("trainer.accelerator", acc, sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()}))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator '{acc}': no CUDA GPU is available on this machine (use cpu or auto)")
    if acc not in ("auto", "gpu") and not AcceleratorRegistry[acc]["accelerator"].is_available():
        raise ConfigError(f"trainer.accelerator '{acc}' is not available on this machine (use cpu or auto)")


def _check_logger(logger: str) -> None:
    """ConfigError when the logger's package is not installed."""
    import importlib.util

    find = importlib.util.find_spec
    if logger == "tensorboard" and find("tensorboard") is None and find("tensorboardX") is None:
        raise ConfigError(
            "trainer.logger 'tensorboard' needs the tensorboard package: "
            "pip install 'fairage[tensorboard]' (or use csv)"
        )
    if logger == "mlflow" and find("mlflow") is None:
        raise ConfigError(
            "trainer.logger 'mlflow' needs the mlflow package: "
            "pip install 'fairage[mlflow]' (or pip install mlflow-skinny; or use csv)"
        )


def _check_devices(devices, acc: str) -> None:
    """ConfigError for malformed devices, fewer than one, or more GPUs than this machine has."""
    import torch

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


# --------------------------------------------------------------------------- one run's resolved settings


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how one run computes, resolved once at its start and passed down to every stage.

    ``accelerator``: ``trainer.accelerator`` resolved (``auto`` -> ``gpu`` where CUDA is present,
    else ``cpu``; ``cuda`` -> ``gpu``); ``precision``: ``trainer.precision`` resolved (``auto`` ->
    ``fairage.training.precision.auto_precision``); ``devices`` as configured; ``seed``: the run's.
    """

    accelerator: str
    devices: str | int
    precision: str
    seed: int = 0

    @classmethod
    def resolve(cls, trainer: TrainerConfig, seed: int = 0) -> RuntimeSettings:
        import torch

        from ..training.precision import auto_precision

        acc = trainer.accelerator
        if acc == "auto":
            acc = "gpu" if torch.cuda.is_available() else "cpu"
        elif acc == "cuda":
            acc = "gpu"
        precision = trainer.precision if trainer.precision != "auto" else auto_precision(acc)
        return cls(acc, trainer.devices, precision, seed)

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"

    @property
    def device(self):
        """The torch device of single-process work (features, predictions): ``cuda`` on a GPU, else ``cpu``."""
        import torch

        return torch.device("cuda") if self.on_gpu else torch.device("cpu")

    def apply(self) -> None:
        """The process-wide settings of a run, set once at its start: the global random state seeded
        from ``seed`` (Python, NumPy, torch: the initial weights and every draw before the first stage);
        Lightning's start-up banners and checkpoint notes kept out of the console; TF32 on a GPU for
        what bf16 autocast leaves in float32."""
        import logging

        import lightning as L

        L.seed_everything(self.seed, verbose=False)

        for name in (
            "lightning.pytorch.utilities.rank_zero",
            "lightning.fabric.utilities.rank_zero",
            "lightning.pytorch.accelerators.cuda",
            "lightning.pytorch.trainer.connectors.checkpoint_connector",
        ):
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.on_gpu:
            import torch

            torch.set_float32_matmul_precision("high")

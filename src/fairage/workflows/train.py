"""The config of a ``fairage train`` run: a config file or a preset at a scale, with overrides and
the Lightning flags, checked against this machine before any run folder is created."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import ExperimentConfig
from ..errors import ConfigError


def trainer_overrides(
    accelerator: str | None = None,
    devices: str | None = None,
    strategy: str | None = None,
    num_nodes: int | None = None,
    deterministic: bool = False,
) -> list[str]:
    """The Lightning flags given (not None; ``deterministic`` when true) as ``trainer.KEY=VALUE`` overrides."""
    overrides = [
        f"trainer.{key}={value}"
        for key, value in (
            ("accelerator", accelerator),
            ("devices", devices),
            ("strategy", strategy),
            ("num_nodes", num_nodes),
        )
        if value is not None
    ]
    if deterministic:
        overrides.append("trainer.deterministic=true")
    return overrides


def train_config(
    config: Path | None,
    preset: str | None,
    scale: str,
    data: Path | None,
    out: Path | None,
    overrides: list[str],
) -> ExperimentConfig:
    """The config of a new run: exactly one of ``config`` (a YAML file) and ``preset`` (at ``scale``),
    with ``overrides``; ConfigError when one is missing, or ``data`` or ``out`` is, or the trainer
    settings do not fit this machine."""
    from ..config.files import load_config
    from ..config.presets import load_preset
    from ..config.runtime import check_trainer

    if (config is None) == (preset is None):
        raise ConfigError("give exactly one of --config CFG.yaml and --preset NAME (or --resume runs/NAME)")
    if data is None or out is None:
        raise ConfigError("--data DIR and --out runs/NAME are required (or --resume runs/NAME)")
    cfg = load_config(config, overrides) if config is not None else load_preset(preset, scale, overrides)
    check_trainer(cfg.trainer)
    return cfg

"""What a training stage is, what its run shares, and where it writes.

* ``StageSpec``: one stage: its name, its ``StageConfig`` and whether its feature extractor is
  frozen (``StageSpec.stage1``: stage I, the head on a frozen backbone; ``StageSpec.stage2``:
  stage II, all layers). ``stage_specs(cfg)`` lists a config's stages in order.
* ``RunContext``: what every stage of a run shares: trainer config, ``RuntimeSettings``, seed,
  data loader workers, progress output, extra Lightning callbacks, the config stored in checkpoints.
* ``StageFolder``: where one stage writes (the run folder, whether ``history.csv`` is kept)
  and what it continues (a ``-last.ckpt`` to resume from, the earlier epochs' history).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.runtime import RuntimeSettings
from ..config.schema import ExperimentConfig, StageConfig, TrainerConfig

if TYPE_CHECKING:
    import pandas as pd
    from lightning.pytorch.callbacks import Callback


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    ``name`` ("stage1"/"stage2") names its checkpoints, history rows, plots and messages;
    ``frozen``: the feature extractor (backbone, and the projection unless ``config.trainable``
    is "projection+head") is frozen with BatchNorm in eval mode, and only the rest trains.
    """

    name: str
    config: StageConfig
    frozen: bool

    @classmethod
    def stage1(cls, config: StageConfig) -> StageSpec:
        """Stage I: the head (and optionally the projection) on a frozen feature extractor."""
        return cls("stage1", config, frozen=True)

    @classmethod
    def stage2(cls, config: StageConfig) -> StageSpec:
        """Stage II: all layers train."""
        return cls("stage2", config, frozen=False)

    def with_config(self, config: StageConfig) -> StageSpec:
        """The same stage with another config (e.g. its image budget turned into epochs)."""
        return replace(self, config=config)


def stage_specs(cfg: ExperimentConfig) -> list[StageSpec]:
    """The configured stages of ``cfg`` in training order (stage I, then stage II; either may be absent)."""
    specs = [StageSpec.stage1(cfg.stage1) if cfg.stage1 is not None else None]
    specs.append(StageSpec.stage2(cfg.stage2) if cfg.stage2 is not None else None)
    return [spec for spec in specs if spec is not None]


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares.

    ``runtime``: the run's ``RuntimeSettings``, resolved and applied once at its start; None
    until ``resolved()`` resolves it from ``trainer`` and ``seed`` (and applies it).
    ``num_workers``: data loader worker processes of image loaders; ``progress``: show progress bars;
    ``callbacks``: extra Lightning callbacks of every stage; ``config_yaml``: the run's config,
    stored in every checkpoint.
    """

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runtime: RuntimeSettings | None = None
    seed: int = 0
    num_workers: int = 0
    progress: bool = False
    callbacks: Sequence[Callback] = ()
    config_yaml: str | None = None

    def resolved(self) -> RunContext:
        """This context with its runtime settings; resolving them here (a run of its own) applies them too."""
        if self.runtime is not None:
            return self
        runtime = RuntimeSettings.resolve(self.trainer, self.seed)
        runtime.apply()
        return replace(self, runtime=runtime)


@dataclass(frozen=True)
class StageFolder:
    """Where one stage writes and what it continues.

    Checkpoints go to ``run_dir/checkpoints/{stage}-best.ckpt`` and ``-last.ckpt``; the history to
    ``run_dir/history.csv`` when ``history_file``. ``ckpt_path``: a ``-last.ckpt`` to resume the
    stage from; ``previous_history``: the rows of the epochs before (earlier stages, the resumed
    stage's own), which the stage's rows are appended to.
    """

    run_dir: Path
    history_file: bool = True
    ckpt_path: str | Path | None = None
    previous_history: pd.DataFrame | None = None

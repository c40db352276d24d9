"""One training stage on in-memory arrays: stage I (head on a frozen feature extractor) or II (all layers).

::

    model, info = build_model(cfg.model)
    arrays = StageArrays(train_images, train_ages, val_images, val_ages)
    result = fit_stage(model, "stage1", cfg.stage1, arrays, run_dir, trainer_cfg=cfg.trainer, seed=cfg.seed)
    years = predict(model, test_images)

Stage I freezes the backbone *and* the projection (the feature extractor, see
``fairage.models``) with BatchNorm kept in eval mode; when augmentation is off and
``cache_features`` is on, their features are computed once and the head trains on them.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from ..config.runtime import RuntimeSettings
from ..config.schema import StageConfig, TrainerConfig
from ..errors import FairageError
from ..models.regressor import AgeRegressor
from ..store.checkpoint import load_weights
from ..store.run_folder import RunFolder
from .factories import (
    StageArrays,
    make_callbacks,
    make_loaders,
    make_trainer,
)
from .lean import LoopOutcome, choose_loop, fit_lean
from .module import AgeModule

log = logging.getLogger(__name__)


class NonFiniteLossError(FairageError):
    """The loss became NaN/inf before any finite validation loss: nothing worth keeping."""


class CollapsedStageError(FairageError):
    """The stage's first epoch already collapsed (constant predictions): no checkpoint worth keeping.

    Not the input's fault: the CLI exits 1, as for any failed run."""

    exit_code = 1


@dataclass
class StageResult:
    """What ``fit_stage`` returns: checkpoint paths, epochs run, the stop message if any."""

    best_path: str | None
    last_path: str | None
    epochs: int
    best_val_loss: float | None
    history: pd.DataFrame
    non_finite: str | None = None
    #: the stage stopped after its predictions collapsed (``CollapseStop``'s message)
    collapsed: str | None = None
    #: the loop that trained it: "lean" (``fairage.training.lean``) or "lightning"
    loop: str = "lightning"


def fit_stage(
    model: AgeRegressor,
    stage_name: str,
    stage: StageConfig,
    arrays: StageArrays,
    run_dir: str | Path | None = None,
    *,
    trainer_cfg: TrainerConfig | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = False,
    ckpt_path: str | Path | None = None,
    previous_history: pd.DataFrame | None = None,
    callbacks: Sequence[Callback] = (),
    cache_features: bool | None = None,
    config_yaml: str | None = None,
    runtime: RuntimeSettings | None = None,
) -> StageResult:
    """Train ``model`` in place for one stage; afterwards it holds the stage's *best* weights.

    stage_name: "stage1" (backbone frozen, and the projection unless ``stage.trainable`` is
    "projection+head"; the rest trained) or "stage2" (all layers).
    Checkpoints go to ``run_dir/checkpoints/{stage_name}-best.ckpt`` (best validation loss)
    and ``-last.ckpt`` (every epoch); the per-epoch rows are appended to
    ``previous_history`` and written to ``run_dir/history.csv``. ``ckpt_path`` resumes this
    stage from a Lightning checkpoint. ``cache_features`` overrides ``stage.cache_features``
    (None: use the config). ``config_yaml``: the run's config, stored in every checkpoint.
    ``run_dir=None``: checkpoints go to a temporary folder and no history file is written.

    A cached stage I trains in the lean loop (``fairage.training.lean``: same objective,
    schedule, stops, files and results, without Lightning's per-epoch overhead) wherever it
    applies, unless ``stage.loop`` is "lightning"; everything else in Lightning's Trainer.
    ``StageResult.loop`` says which.

    ``runtime``: the run's ``RuntimeSettings`` (resolved and applied once at its start); None: this
    call is a run of its own, resolved from ``trainer_cfg`` and ``seed`` and applied here.
    """
    trainer_cfg = trainer_cfg or TrainerConfig()
    if runtime is None:
        runtime = RuntimeSettings.resolve(trainer_cfg, seed)
        runtime.apply()
    kwargs = {
        "trainer_cfg": trainer_cfg,
        "runtime": runtime,
        "num_workers": num_workers,
        "seed": seed,
        "progress": progress,
        "ckpt_path": ckpt_path,
        "previous_history": previous_history,
        "callbacks": callbacks,
        "cache_features": cache_features,
        "config_yaml": config_yaml,
    }
    if run_dir is None:  # checkpoints (for the best weights) still need a folder
        with tempfile.TemporaryDirectory(prefix="fairage-stage-") as tmp:
            return _fit_stage(model, stage_name, stage, arrays, Path(tmp), history_file=False, **kwargs)
    return _fit_stage(model, stage_name, stage, arrays, Path(run_dir), history_file=True, **kwargs)


def _fit_stage(
    model: AgeRegressor,
    stage_name: str,
    stage: StageConfig,
    arrays: StageArrays,
    run_dir: Path,
    *,
    history_file: bool,
    trainer_cfg: TrainerConfig,
    runtime: RuntimeSettings,
    num_workers: int,
    seed: int,
    progress: bool,
    ckpt_path: str | Path | None,
    previous_history: pd.DataFrame | None,
    callbacks: Sequence[Callback],
    cache_features: bool | None,
    config_yaml: str | None,
) -> StageResult:
    frozen = stage_name == "stage1"
    if stage.max_images is not None:  # the image budget becomes an epoch count for the loop, the schedule and resume
        stage = stage.model_copy(update={"max_epochs": stage.epochs_for(len(arrays.train_images)), "max_images": None})
    use_cache = stage.cache_features if cache_features is None else cache_features
    use_cache = bool(use_cache and frozen and not (stage.augment.enabled and stage.augment.mode == "random"))
    L.seed_everything(seed, workers=True, verbose=False)
    if trainer_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    from .methods import build_objective

    objective = build_objective(stage, model.label_scale, arrays.train_ages, arrays.face_arrays, seed)
    loop = choose_loop(
        stage_name, stage, trainer_cfg, use_cache=use_cache, callbacks=callbacks, ckpt_path=ckpt_path, runtime=runtime
    )
    if loop == "lean":
        outcome = fit_lean(
            model,
            stage_name,
            stage,
            arrays,
            run_dir,
            history_file=history_file,
            trainer_cfg=trainer_cfg,
            runtime=runtime,
            seed=seed,
            progress=progress,
            ckpt_path=ckpt_path,
            previous_history=previous_history,
            config_yaml=config_yaml,
            objective=objective,
        )
    else:
        outcome = _fit_lightning(
            model,
            stage_name,
            stage,
            arrays,
            run_dir,
            history_file=history_file,
            trainer_cfg=trainer_cfg,
            runtime=runtime,
            num_workers=num_workers,
            seed=seed,
            progress=progress,
            ckpt_path=ckpt_path,
            previous_history=previous_history,
            callbacks=callbacks,
            config_yaml=config_yaml,
            objective=objective,
            use_cache=use_cache,
        )
    non_finite, best_path, best_val, collapsed = (
        outcome.non_finite,
        outcome.best_path,
        outcome.best_val_loss,
        outcome.collapsed,
    )
    if non_finite and (best_val is None or not math.isfinite(best_val)):
        raise NonFiniteLossError(non_finite.replace("keeping its best checkpoint", "no finite validation loss to keep"))
    if collapsed and not best_path:
        raise CollapsedStageError(
            collapsed.replace(
                "keeping its best checkpoint before the collapse", "with no epoch before the collapse to keep"
            )
        )
    if non_finite:  # warned only once it is known that a best checkpoint is kept
        log.warning(non_finite)
    if collapsed:
        log.warning(collapsed)
    if best_path:
        load_weights(model, best_path)
    model.to("cpu")
    return StageResult(
        best_path=best_path,
        last_path=outcome.last_path,
        epochs=outcome.epochs,
        best_val_loss=best_val,
        history=outcome.history,
        non_finite=non_finite,
        collapsed=collapsed,
        loop=loop,
    )


def _fit_lightning(
    model: AgeRegressor,
    stage_name: str,
    stage: StageConfig,
    arrays: StageArrays,
    run_dir: Path,
    *,
    history_file: bool,
    trainer_cfg: TrainerConfig,
    runtime: RuntimeSettings,
    num_workers: int,
    seed: int,
    progress: bool,
    ckpt_path: str | Path | None,
    previous_history: pd.DataFrame | None,
    callbacks: Sequence[Callback],
    config_yaml: str | None,
    objective,
    use_cache: bool,
) -> LoopOutcome:
    """The stage in Lightning's Trainer (images, or cached features where the lean loop does not apply)."""
    channels_last = trainer_cfg.channels_last
    train_loader, val_loader = make_loaders(
        model,
        stage,
        arrays,
        use_cache=use_cache,
        runtime=runtime,
        channels_last=trainer_cfg.channels_last,
        num_workers=num_workers,
        seed=seed,
        with_index=objective is not None and objective.needs_index,
    )
    module = AgeModule(
        model,
        stage,
        frozen=stage_name == "stage1",
        inputs="features" if use_cache else "images",
        channels_last=channels_last,
        image_size=arrays.image_size,
        objective=objective,
    )
    dro = objective is not None and objective.dro is not None
    cbs = make_callbacks(
        stage_name,
        stage,
        run_dir,
        history_path=run_dir / RunFolder.HISTORY if history_file else None,
        previous_history=previous_history,
        progress=progress,
        config_yaml=config_yaml,
        extra=callbacks,
        dro_groups=arrays.face_arrays.group_names if dro else None,
    )
    trainer = make_trainer(trainer_cfg, runtime, stage, cbs.all, run_dir, progress)
    with warnings.catch_warnings():
        for message in (
            ".*does not have many workers.*",
            ".*number of training batches.*",
            ".*Checkpoint directory .* exists and is not empty.*",
            ".*LeafSpec.*",
            ".*module\\(s\\) in eval mode at the start of training.*",
        ):
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(
            module,
            train_loader,
            val_loader,
            ckpt_path=str(ckpt_path) if ckpt_path else None,
            weights_only=True if ckpt_path else None,
        )
    best_score = cbs.best.best_model_score
    return LoopOutcome(
        best_path=cbs.best.best_model_path or None,
        best_val_loss=float(best_score) if best_score is not None else None,
        last_path=str(cbs.last.path) if cbs.last.path.is_file() else None,
        epochs=trainer.current_epoch,
        history=cbs.history.history,
        non_finite=cbs.history.non_finite,
        collapsed=cbs.collapse.message if cbs.collapse is not None else None,
    )

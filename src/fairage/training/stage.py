"""One training stage on in-memory arrays: stage I (head on a frozen feature extractor) or II (all layers).

::

    model, info = build_model(cfg.model)
    arrays = StageArrays(train_images, train_ages, val_images, val_ages)
    context = RunContext(trainer=cfg.trainer, seed=cfg.seed)
    result = fit_stage(model, StageSpec.stage1(cfg.stage1), arrays, run_dir, context=context)
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
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from ..errors import FairageError
from ..models.regressor import AgeRegressor
from ..store.checkpoint import load_weights
from ..store.run_folder import RunFolder
from .factories import (
    StageArrays,
    StageCallbacks,
    make_callbacks,
    make_loaders,
    make_trainer,
)
from .lean import LoopOutcome, choose_loop, fit_lean
from .module import AgeModule
from .spec import RunContext, StageFolder, StageSpec

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
    spec: StageSpec,
    arrays: StageArrays,
    run_dir: str | Path | None = None,
    *,
    context: RunContext | None = None,
    ckpt_path: str | Path | None = None,
    previous_history: pd.DataFrame | None = None,
    cache_features: bool | None = None,
) -> StageResult:
    """Train ``model`` in place for the stage ``spec``; afterwards it holds the stage's *best* weights.

    ``spec.frozen`` (stage I): the feature extractor is frozen and the rest trained; else all layers.
    Checkpoints go to ``run_dir/checkpoints/{spec.name}-best.ckpt`` (best validation loss)
    and ``-last.ckpt`` (every epoch); the per-epoch rows are appended to
    ``previous_history`` and written to ``run_dir/history.csv``. ``ckpt_path`` resumes this
    stage from its ``-last.ckpt``. ``cache_features`` overrides ``spec.config.cache_features``
    (None: use the config). ``run_dir=None``: checkpoints go to a temporary folder and no
    history file is written.

    A cached stage I trains in the lean loop (``fairage.training.lean``: same objective,
    schedule, stops, files and results, without Lightning's per-epoch overhead) wherever it
    applies, unless ``spec.config.loop`` is "lightning"; everything else in Lightning's Trainer.
    ``StageResult.loop`` says which.

    ``context``: what the run shares (trainer config, runtime settings, seed, callbacks, the
    config stored in checkpoints); None: ``RunContext()``. Without ``context.runtime`` this call
    is a run of its own: its runtime settings are resolved from ``context.trainer`` and
    ``context.seed`` and applied here.
    """
    context = (context or RunContext()).resolved()
    if run_dir is None:  # checkpoints (for the best weights) still need a folder
        with tempfile.TemporaryDirectory(prefix="fairage-stage-") as tmp:
            folder = StageFolder(Path(tmp), history_file=False, ckpt_path=ckpt_path, previous_history=previous_history)
            return _fit_stage(model, spec, arrays, context, folder, cache_features)
    folder = StageFolder(Path(run_dir), history_file=True, ckpt_path=ckpt_path, previous_history=previous_history)
    return _fit_stage(model, spec, arrays, context, folder, cache_features)


def _fit_stage(
    model: AgeRegressor,
    spec: StageSpec,
    arrays: StageArrays,
    context: RunContext,
    folder: StageFolder,
    cache_features: bool | None,
) -> StageResult:
    stage = spec.config
    if stage.max_images is not None:  # the image budget becomes an epoch count for the loop, the schedule and resume
        stage = stage.model_copy(update={"max_epochs": stage.epochs_for(len(arrays.train_images)), "max_images": None})
        spec = spec.with_config(stage)
    use_cache = stage.cache_features if cache_features is None else cache_features
    use_cache = bool(use_cache and spec.frozen and not (stage.augment.enabled and stage.augment.mode == "random"))
    # each stage starts from the run's seed, so a stage resumed or trained on its own repeats its draws
    # (dropout, augmentation); nothing before its first training step draws from the global RNG (the
    # feature cache, the objective and the samplers do not), so both loops train from this state
    L.seed_everything(context.seed, workers=True, verbose=False)
    if context.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    from .methods import build_objective

    objective = build_objective(stage, model.label_scale, arrays.train_ages, arrays.face_arrays, context.seed)
    loop = choose_loop(
        spec.name,
        stage,
        context.trainer,
        use_cache=use_cache,
        callbacks=context.callbacks,
        ckpt_path=folder.ckpt_path,
        runtime=context.runtime,
    )
    if loop == "lean":
        outcome = fit_lean(model, spec, arrays, context, folder, objective)
    else:
        outcome = _fit_lightning(model, spec, arrays, context, folder, objective, use_cache)
    return _stage_result(model, outcome, loop)


def _stage_result(model: AgeRegressor, outcome: LoopOutcome, loop: str) -> StageResult:
    """Check the loop's outcome, load its best weights into ``model`` (on the CPU) and describe the stage.

    NonFiniteLossError / CollapsedStageError when the stage left nothing worth keeping.
    """
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


#: Lightning warnings that say nothing about a stage fairage set up on purpose
_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*number of training batches.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    ".*LeafSpec.*",
    ".*module\\(s\\) in eval mode at the start of training.*",
)


def _fit_lightning(
    model: AgeRegressor,
    spec: StageSpec,
    arrays: StageArrays,
    context: RunContext,
    folder: StageFolder,
    objective,
    use_cache: bool,
) -> LoopOutcome:
    """The stage in Lightning's Trainer (images, or cached features where the lean loop does not apply)."""
    stage, trainer_cfg = spec.config, context.trainer
    train_loader, val_loader = make_loaders(
        model,
        stage,
        arrays,
        use_cache=use_cache,
        runtime=context.runtime,
        channels_last=trainer_cfg.channels_last,
        num_workers=context.num_workers,
        seed=context.seed,
        with_index=objective is not None and objective.needs_index,
    )
    module = AgeModule(
        model,
        stage,
        frozen=spec.frozen,
        inputs="features" if use_cache else "images",
        channels_last=trainer_cfg.channels_last,
        image_size=arrays.image_size,
        objective=objective,
    )
    cbs = _lightning_callbacks(spec, arrays, context, folder, dro=objective is not None and objective.dro is not None)
    trainer = make_trainer(trainer_cfg, context.runtime, stage, cbs.all, folder.run_dir, context.progress)
    ckpt_path = folder.ckpt_path
    with warnings.catch_warnings():
        for message in _QUIET_WARNINGS:
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


def _lightning_callbacks(
    spec: StageSpec, arrays: StageArrays, context: RunContext, folder: StageFolder, dro: bool
) -> StageCallbacks:
    """The stage's callbacks in Lightning's Trainer (``dro``: Group DRO's q is recorded per epoch)."""
    return make_callbacks(
        spec.name,
        spec.config,
        folder.run_dir,
        history_path=folder.run_dir / RunFolder.HISTORY if folder.history_file else None,
        previous_history=folder.previous_history,
        progress=context.progress,
        config_yaml=context.config_yaml,
        extra=context.callbacks,
        dro_groups=arrays.face_arrays.group_names if dro else None,
    )

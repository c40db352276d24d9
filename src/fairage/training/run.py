"""Run level: train the configured stages into a run folder, resume it, export its backbone.

``train(cfg, data_dir, out_dir)`` loads the data, runs the configured stages into a run
folder (``fairage.store.run_folder.RunFolder``) and evaluates on the test split;
``resume_run(out_dir)`` continues an interrupted run; ``export_backbone`` writes a run's backbone.
Checkpoints are read through ``fairage.store.checkpoint`` (one reader, one checkpoint -> model path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from ..atomic import atomic_path, save_torch, write_text
from ..config.files import dump_config
from ..config.runtime import RuntimeSettings
from ..config.schema import (
    ExperimentConfig,
    StageConfig,
    TrainerConfig,
)
from ..errors import ConfigError, DataError, FairageError
from ..fairness.metrics import EvaluationResult
from ..models.regressor import AgeRegressor, build_model
from ..store.checkpoint import (
    MODEL_PREFIX,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
)
from ..store.run_folder import (
    HISTORY_COLUMNS,
    RunFolder,
    absolute_paths,
    config_faces,
    is_rank_zero,
)
from .factories import (
    COLLAPSE_STD,
    StageArrays,
)
from .inference import predict, predict_with_spread
from .spec import RunContext, StageSpec, stage_specs
from .stage import CollapsedStageError, fit_stage

log = logging.getLogger(__name__)


def device_description(trainer_cfg: TrainerConfig, runtime: RuntimeSettings) -> str:
    acc = runtime.accelerator
    if acc == "gpu" and torch.cuda.is_available():
        acc = f"cuda ({torch.cuda.get_device_name(0)})"
    return f"{acc} devices={runtime.devices} nodes={trainer_cfg.num_nodes} {runtime.precision}"


@dataclass
class RunData:
    """Faces and decoded images of the three splits."""

    faces: dict[str, pd.DataFrame]
    images: dict[str, np.ndarray]


def load_run_data(cfg: ExperimentConfig, data_dir: str | Path, progress: bool = True) -> RunData:
    """Face tables and uint8 image arrays of train/valid/test (``fairage.data``)."""
    from ..data import load_images

    faces = config_faces(cfg, data_dir)
    tables, images = {}, {}
    for split in ("train", "valid", "test"):
        table = faces[faces["split"] == split].reset_index(drop=True)
        if len(table) == 0:
            raise FairageError(
                f"dataset {data_dir} has no '{split}' faces; training needs train, valid and test splits"
            )
        tables[split] = table
        images[split] = load_images(
            table,
            cfg.data.image_size,
            cache_dir=cfg.data.cache_dir,
            workers=max(1, cfg.data.num_workers),
            progress=progress and is_rank_zero(),
        )
    return RunData(tables, images)


def stage_weights(train_faces: pd.DataFrame, stage_name: str, stage: StageConfig, run_dir: Path) -> np.ndarray | None:
    """Per-face weights of a stage (None when it uses none) and its ``weights_{stage}.png``."""
    if not stage.weighting.active:
        return None
    from ..fairness.weighting import compute_weights, group_table
    from ..outputs.plots import plot_group_weights

    weights = compute_weights(train_faces, stage.weighting)
    if is_rank_zero():
        plot_group_weights(
            group_table(train_faces, stage.weighting),
            RunFolder(run_dir).weights_plot(stage_name),
            title=f"{stage_name}: group sizes and weights ({stage.weighting.scheme}, "
            f"{stage.weighting.formula}, mode {stage.weighting.mode})",
        )
    return weights


def calibrate(cfg: ExperimentConfig, valid_faces: pd.DataFrame, predictions: np.ndarray, folder: RunFolder):
    """Fit the conformal calibration (``eval.conformal``) on the validation predictions (years),
    store it as ``conformal.json`` and return it with its warnings; ``(None, [])`` when disabled."""
    from ..fairness.conformal import fit_calibration, minimum_group_size

    settings = cfg.eval.conformal
    if not settings.enabled:
        return None, []
    if len(valid_faces) < minimum_group_size(settings.alpha):  # too few for any interval: train on, say so
        needed = minimum_group_size(settings.alpha)
        message = (
            f"no age intervals: the valid split has {len(valid_faces)} faces, fewer than the {needed} "
            f"a {100 * (1 - settings.alpha):g}% interval needs"
        )
        return None, [message]
    df = valid_faces.copy()
    df["prediction"] = predictions
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # returned, and recorded in run.json
            calibration, messages = fit_calibration(
                df,
                alpha=settings.alpha,
                by=settings.by,
                age_edges=settings.age_edges,
                min_group=settings.min_group,
                tighten=settings.tighten,
            )
    except DataError as err:  # the trained model is kept; `fairage calibrate` can add intervals later
        return None, [f"no age intervals: {err}"]
    folder.write_calibration(calibration)
    return calibration, messages


def evaluate_test(
    cfg: ExperimentConfig,
    test_faces: pd.DataFrame,
    predictions: np.ndarray,
    folder: RunFolder,
    spread: np.ndarray | None = None,
    calibration=None,
) -> EvaluationResult:
    """Write ``predictions_test.csv`` (with the per-face ``spread`` when the head gives one, and the
    conformal intervals of ``calibration`` when given) and (last, atomically) ``metrics_test.json``;
    return the metrics."""
    from ..fairness.conformal import interval_arguments
    from ..fairness.metrics import evaluate
    from ..store.predictions import write_predictions

    intervals = calibration.intervals(predictions, test_faces) if calibration is not None else None
    write_predictions(folder.file(RunFolder.PREDICTIONS), test_faces, predictions, spread, intervals)
    df = test_faces.copy()
    df["prediction"] = predictions
    settings = folder.evaluation_settings(cfg, df.columns)
    if calibration is not None and len(calibration.by) > 1:  # coverage (and MAE) of the calibrated intersection too
        by = list(calibration.by)
        if by not in settings["intersections"]:
            settings["intersections"] = [*settings["intersections"], by]
    metrics = evaluate(df, **interval_arguments(calibration, df), **settings)
    write_text(folder.file(RunFolder.METRICS), json.dumps(metrics.to_json(), indent=2) + "\n")
    return metrics


def collapse_warning(predictions: np.ndarray) -> str | None:
    """A message when the predictions (years, shape (N,)) are nearly constant, else None.

    A network whose ReLUs died or whose sigmoid output saturated predicts one age for
    every face; its MAE and bias scores then describe the age distribution, not a model.

    >>> collapse_warning(np.array([30.0, 30.1, 29.9])).startswith("the model collapsed")
    True
    >>> collapse_warning(np.array([10.0, 50.0])) is None
    True
    """
    if len(predictions) < 2 or float(np.std(predictions)) >= COLLAPSE_STD:
        return None
    return (
        f"the model collapsed: its test predictions are nearly constant (std {np.std(predictions):.2f} "
        f"years, mean {np.mean(predictions):.1f}); its scores describe the data, not a model. "
        "Try a smaller learning rate or start from pretrained weights (model.weights)."
    )


def train(
    cfg: ExperimentConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> EvaluationResult | None:
    """Train the configured stages into the run folder ``out_dir``; return the test metrics.

    ``resume=True`` continues an interrupted run in ``out_dir`` (see ``resume_run``).
    ``callbacks`` are extra Lightning callbacks for every stage. The folder is locked
    while training (``RunFolder.lock``: a second process gets RunInUseError). Relative
    paths of ``cfg`` are made absolute in the stored config. On non-zero DDP ranks
    nothing is written and None is returned.
    """
    run_dir = Path(out_dir)
    cfg = absolute_paths(cfg)
    if not resume:  # the user's own folder is never written into (nor cleaned)
        RunFolder.check_out(run_dir)
    # DDP's script launcher re-runs this command in the other ranks after rank 0 has
    # created the run folder: only rank 0 locks, checks and writes it
    lock = RunFolder(run_dir).lock() if is_rank_zero() else contextlib.nullcontext()
    with lock:
        return _train_in_folder(cfg, Path(data_dir).resolve(), run_dir, resume, progress, callbacks)


def _train_in_folder(
    cfg: ExperimentConfig, data_dir: Path, run_dir: Path, resume: bool, progress: bool, callbacks: Sequence[Callback]
) -> EvaluationResult | None:
    rank0 = is_rank_zero()
    if rank0 and (run_dir / RunFolder.METRICS).is_file():
        if resume:
            return RunFolder.open(run_dir).metrics()
        raise FairageError(f"{run_dir} already holds a finished run ({RunFolder.METRICS}); choose another --out")
    exists = RunFolder.exists(run_dir)
    if rank0 and not resume and exists:
        raise FairageError(
            f"{run_dir} already holds an unfinished run; continue it with "
            f"`fairage train --resume {run_dir}` or choose another --out"
        )
    folder = RunFolder.open(run_dir) if resume and exists else None

    runtime = RuntimeSettings.resolve(cfg.trainer, cfg.seed)  # once per run, passed to every stage
    runtime.apply()  # seeds the initial weights too
    model, weight_info = build_model(cfg.model)
    data = load_run_data(cfg, data_dir, progress=progress)
    head_loaded = weight_info["weights_loaded"] and not any(
        k.startswith("head.") for k in weight_info.get("missing_keys", [])
    )
    if not head_loaded:  # a distribution head starts at the training ages' distribution (no-op for regression)
        model.init_output_bias(data.faces["train"]["age"].to_numpy(dtype=float))
    _check_conformal_columns(cfg, data, data_dir)
    if folder is None:  # a new run (or a "resume" of a folder that never got a run.json)
        folder = RunFolder.create(
            run_dir,
            cfg,
            data_dir,
            **weight_info,
            device=device_description(cfg.trainer, runtime),
            precision=runtime.precision,
        )
        resume = False
    history = folder.history() if resume else pd.DataFrame(columns=HISTORY_COLUMNS)
    context = RunContext(
        trainer=cfg.trainer,
        runtime=runtime,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        progress=progress and rank0,
        callbacks=callbacks,
        config_yaml=dump_config(cfg),
    )
    history = _run_stages(cfg, context, data, model, folder, history, resume)
    if not rank0:
        return None
    return _finish_run(cfg, runtime, data, model, folder, history)


def _check_conformal_columns(cfg: ExperimentConfig, data: RunData, data_dir: Path) -> None:
    """ConfigError when ``eval.conformal.by`` names a column the dataset lacks: it fails now, not after training."""
    if not cfg.eval.conformal.enabled:
        return
    missing = [a for a in cfg.eval.conformal.by if a != "age" and a not in data.faces["valid"].columns]
    if missing:
        raise ConfigError(
            f"eval.conformal.by names {', '.join(map(repr, missing))}, which the dataset "
            f"{data_dir} has no column for (have: {', '.join(map(str, data.faces['valid'].columns))})"
        )


def _finish_run(
    cfg: ExperimentConfig,
    runtime: RuntimeSettings,
    data: RunData,
    model: AgeRegressor,
    folder: RunFolder,
    history: pd.DataFrame,
) -> EvaluationResult:
    """After the stages: training curves, the conformal calibration, the test predictions and metrics."""
    from ..outputs.plots import plot_training_curves

    run_dir = folder.path
    if len(history):
        plot_training_curves(history, folder.file(RunFolder.CURVES), title=f"{cfg.name}: {cfg.strategy}")
    # float32, whatever training used
    preds, spread = predict_with_spread(model, data.images["test"], device=runtime.device)
    warnings = list(folder.record.warnings)
    collapsed = collapse_warning(preds)
    if collapsed:
        log.warning("%s: %s", run_dir, collapsed)
        warnings.append(collapsed)
    calibration = None
    if cfg.eval.conformal.enabled:  # calibrated on faces the model did not train on
        val_preds = predict(model, data.images["valid"], device=runtime.device)
        calibration, messages = calibrate(cfg, data.faces["valid"], val_preds, folder)
        for message in messages:
            log.warning("%s: %s", run_dir, message)
        warnings.extend(messages)
    folder.update(stage="test", warnings=warnings)  # predicting and evaluating the test split
    metrics = evaluate_test(cfg, data.faces["test"], preds, folder, spread, calibration)
    folder.update(status="finished", stage=cfg.stages()[-1][0])
    return metrics


def _run_stages(
    cfg: ExperimentConfig,
    context: RunContext,
    data: RunData,
    model: AgeRegressor,
    folder: RunFolder,
    history: pd.DataFrame,
    resume: bool,
) -> pd.DataFrame:
    """Train the configured stages not yet completed; ``model`` ends with the last stage's best weights."""
    completed = list(folder.record.completed_stages)
    from .methods import face_arrays

    specs = stage_specs(cfg)
    # read before any stage trains, so a dataset without age_std fails at once
    method_arrays = {spec.name: face_arrays(data.faces["train"], spec.config, spec.name) for spec in specs}
    for spec in specs:
        if spec.name in completed:
            # the next stage starts from this stage's best
            load_weights(model, folder.checkpoint(spec.name, "best"))
            continue
        ckpt_path, history = _resume_point(folder, spec, model, history, completed, resume)
        folder.update(stage=spec.name, status="running")
        arrays = _stage_arrays(cfg, data, spec, folder, method_arrays)
        collapsed = dict(folder.record.collapsed_stages)
        try:
            result = fit_stage(
                model, spec, arrays, folder.path, context=context, ckpt_path=ckpt_path, previous_history=history
            )
        except CollapsedStageError as err:
            if not completed:
                folder.update(collapsed_stages={**collapsed, spec.name: str(err)})
                raise
            # nothing of this stage is worth keeping: the model stays the previous stage's best
            message = f"{err}; the model is {completed[-1]}'s best"
            log.warning(message)
            load_weights(model, folder.checkpoint(completed[-1], "best"))
            folder.update(collapsed_stages={**collapsed, spec.name: message})
            history = folder.history()
            break
        history = result.history
        completed.append(spec.name)
        stopped = dict(folder.record.stopped_stages)
        if result.non_finite:
            stopped[spec.name] = result.non_finite
        if result.collapsed:
            collapsed[spec.name] = result.collapsed
        folder.update(completed_stages=completed, stopped_stages=stopped, collapsed_stages=collapsed)
    return history


def _resume_point(
    folder: RunFolder,
    spec: StageSpec,
    model: AgeRegressor,
    history: pd.DataFrame,
    completed: list[str],
    resume: bool,
) -> tuple[Path | None, pd.DataFrame]:
    """The ``-last.ckpt`` the stage resumes from (None: it starts afresh) and the history rows it continues."""
    last = folder.checkpoint(spec.name, "last")
    ckpt_path = last if resume and last.is_file() else None
    if ckpt_path is not None:
        epoch = _resumable_epoch(ckpt_path, model) + 1
        keep = (history["stage"] != spec.name) | (history["epoch"] <= epoch)
        history = history[keep & history["stage"].isin(completed + [spec.name])].reset_index(drop=True)
    else:
        history = history[history["stage"].isin(completed)].reset_index(drop=True)
    return ckpt_path, history


def _stage_arrays(
    cfg: ExperimentConfig, data: RunData, spec: StageSpec, folder: RunFolder, method_arrays: dict
) -> StageArrays:
    """The arrays the stage trains on: its (replicated) training faces, their weights, the validation faces.

    ``method_arrays`` (stage name -> ``FaceArrays``) gains the rows of replicated copies.
    """
    from .methods import face_arrays

    stage = spec.config
    train_faces, train_images = data.faces["train"], data.images["train"]
    if stage.augment.enabled and stage.augment.mode == "replicate":  # offline copies, weighted as faces
        from .augment import replicate_faces

        train_images, source = replicate_faces(
            train_images, train_faces["age"].to_numpy(), stage.augment.min_age, seed=cfg.seed
        )
        train_faces = train_faces.iloc[source].reset_index(drop=True)
        method_arrays[spec.name] = face_arrays(train_faces, stage, spec.name)  # rows of the copies too
    weights = stage_weights(train_faces, spec.name, stage, folder.path)
    return StageArrays(
        train_images,
        train_faces["age"].to_numpy(np.float32),
        data.images["valid"],
        data.faces["valid"]["age"].to_numpy(np.float32),
        weights,
        face_arrays=method_arrays[spec.name],
    )


def _resumable_epoch(path: Path, model: AgeRegressor) -> int:
    """The epoch of the ``-last`` checkpoint ``path``, checked to be one Lightning can resume ``model`` from.

    DataError naming the file when it lacks what Lightning restores (epoch, weights, optimizer
    state) or its weights do not fit ``model`` (the run's config.yaml was edited to another
    network), so ``--resume`` says so in one line instead of failing inside Lightning.
    """
    ckpt = read_checkpoint(path)
    epoch = ckpt.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise DataError(
            f"{path} holds no epoch number: not a checkpoint fairage training wrote; delete it to "
            "restart this stage from its beginning"
        )
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not isinstance(ckpt.get("optimizer_states"), list):
        raise DataError(
            f"{path} holds no model weights or optimizer state: not a checkpoint fairage training "
            "wrote; delete it to restart this stage from its beginning"
        )
    own = {f"{MODEL_PREFIX}{k}": v for k, v in model.state_dict().items()}
    theirs = {k: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    wrong = sorted(
        k
        for k in set(own) & set(theirs)
        if not isinstance(theirs[k], torch.Tensor) or tuple(theirs[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what} {', '.join(keys[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if keys
        )
        raise DataError(
            f"{path}: its weights do not fit the model of the run's config.yaml ({details}); was "
            "config.yaml edited? Restore it, or start a new run"
        )
    return epoch


def resume_run(
    out_dir: str | Path, progress: bool = True, callbacks: Sequence[Callback] = ()
) -> EvaluationResult | None:
    """Continue an interrupted run from its last checkpoint, in the right stage; return the test metrics.

    Reads the run's ``config.yaml`` and ``run.json`` (its ``data_dir``). Stages already
    completed are not retrained; the interrupted stage restarts from
    ``checkpoints/{stage}-last.ckpt`` (written at every epoch end; optimizer, scheduler,
    early stopping state included), so at most the interrupted epoch is redone;
    ``history.csv`` continues where it stopped. A finished run just returns its metrics.
    """
    folder = RunFolder.open(out_dir)
    return train(folder.config(), folder.data_dir, folder.path, resume=True, progress=progress, callbacks=callbacks)


def export_backbone(source: str | Path, out_path: str | Path) -> Path:
    """Write the backbone of a finished run, or of one checkpoint file, to ``out_path``.

    ``source`` is a finished run folder (the best checkpoint of its last stage is used)
    or a fairage checkpoint (``.ckpt``, which holds its config). The file is a
    torchvision-style ResNet state dict (``conv1.weight``, ``layer1.0...``; no ``fc``) in
    ``.safetensors`` or ``.pth`` (chosen by the suffix), written atomically. Name it as
    ``model.weights`` of another config to start from this backbone, e.g. a model
    pretrained on one dataset (UTKFace, or synthetic faces) fine-tuned on another; the
    projection and head start at random init there. Returns ``out_path``.
    """
    source, out_path = Path(source), Path(out_path)
    if not source.exists():
        raise DataError(f"{source} is not a fairage run folder or checkpoint: not found")
    if out_path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ConfigError(f"{out_path}: backbone file must end in .safetensors, .pth or .pt")
    if source.is_dir():
        folder = RunFolder.open(source)
        if folder.record.status != "finished":
            raise FairageError(
                f"{source} holds no finished run (run.json status {folder.record.status!r}); "
                f"finish it with `fairage train --resume {source}`"
            )
        cfg = folder.config()
        ckpt = folder.checkpoint(cfg.stages()[-1][0], "best")
        if not ckpt.is_file():
            raise DataError(f"{ckpt} not found: the run's best checkpoint of {cfg.stages()[-1][0]} is missing")
        model, cfg = model_from_checkpoint(ckpt, cfg)  # config.yaml for a file older than the saved config
    else:
        model, cfg = model_from_checkpoint(source)
    state = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()}
    with atomic_path(out_path) as tmp:
        if out_path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"fairage_run": str(source.resolve()), "backbone": cfg.model.backbone})
        else:
            save_torch(state, tmp)
    return out_path


# size: each setting a caller may override defaults to the config, and the docstring says how
def calibrate_folder(
    path: str | Path,
    data_dir: str | Path | None = None,
    split: str = "valid",
    alpha: float | None = None,
    by: Sequence[str] | None = None,
    min_group: int | None = None,
    progress: bool = False,
):
    """Fit (or refit) the conformal calibration of a run folder or a model folder; return
    ``(calibration, warnings)``.

    The model predicts the faces of ``split`` (default ``valid``: faces it did not train on)
    of ``data_dir`` (a run's default: its own data, loaded with its ``data.*`` settings; a
    model folder needs it). ``alpha``, ``by``, ``min_group`` default to the config's
    ``eval.conformal``. The calibration goes to the folder's ``conformal.json``; a finished
    run's ``predictions_test.csv`` and ``metrics_test.json`` are rewritten with the new
    intervals (same predictions), so an older run gains them.
    """
    from ..fairness.conformal import CONFORMAL, fit_calibration, write_calibration
    from ..inference.predictor import load_model, predict_faces

    path = Path(path)
    loaded = load_model(path)
    if loaded.kind == "exported":
        raise ConfigError(f"{path}: calibrate a run or model folder, then export it again")
    cfg = loaded.config
    settings = cfg.eval.conformal
    alpha = settings.alpha if alpha is None else alpha
    by = list(settings.by if by is None else by)
    min_group = settings.min_group if min_group is None else min_group
    folder = RunFolder.open(path) if loaded.kind == "run" else None
    if data_dir is None and folder is None:
        raise ConfigError(f"{path} is a model folder: give the dataset to calibrate on (--data DIR)")
    faces = config_faces(cfg, data_dir or folder.data_dir)
    faces = faces[faces["split"] == split].reset_index(drop=True)
    if len(faces) == 0:
        raise DataError(f"dataset {data_dir or folder.data_dir} has no {split!r} faces to calibrate on")
    df = faces.copy()
    df["prediction"] = predict_faces(loaded, faces, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # returned to the caller
        calibration, messages = fit_calibration(
            df,
            alpha=alpha,
            by=by,
            age_edges=settings.age_edges,
            min_group=min_group,
            split=split,
            tighten=settings.tighten,
        )
    if folder is None:
        write_calibration(path / CONFORMAL, calibration)
        return calibration, messages
    with folder.lock():
        folder.write_calibration(calibration)
        kept = [w for w in folder.record.warnings if not w.startswith("conformal groups")]
        folder.update(warnings=kept + messages)
        if folder.file(RunFolder.PREDICTIONS).is_file() and folder.is_finished():
            _reevaluate_test(folder, calibration)
    return calibration, messages


def _reevaluate_test(folder: RunFolder, calibration) -> None:
    """Rewrite a finished run's test predictions and metrics with the intervals of ``calibration``
    (the same predictions, read back from ``predictions_test.csv``)."""
    from ..store.predictions import SPREAD_COLUMN, join_predictions, read_predictions

    test = folder.faces("test")
    joined = join_predictions(
        test, read_predictions(folder.file(RunFolder.PREDICTIONS)), folder.file(RunFolder.PREDICTIONS)
    )
    spread = joined[SPREAD_COLUMN].to_numpy() if SPREAD_COLUMN in joined.columns else None
    evaluate_test(folder.config(), test, joined["prediction"].to_numpy(), folder, spread, calibration)

"""The pieces ``fit_stage`` assembles: data loaders, callbacks and the Lightning Trainer.

Each factory takes the stage's config and a ``StageArrays`` and returns ready objects,
so a training script can build its own loop from the same parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..atomic import save_torch, write_text
from ..config.runtime import RuntimeSettings
from ..config.schema import StageConfig, TrainerConfig
from ..models.regressor import AgeRegressor
from ..store.checkpoint import CONFIG_KEY, read_checkpoint
from ..store.run_folder import HISTORY_COLUMNS, RunFolder
from .inference import extract_features
from .module import FaceArrayDataset

#: key of a checkpoint that holds the run's config (YAML text), so the file describes itself


@dataclass
class StageArrays:
    """The arrays one stage trains on.

    Images: uint8 (N, S, S, 3) RGB (a read-only memmap is fine); ages: float years (N,);
    ``train_weights``: per-face loss weights (``weighting.mode: loss``) or sampling
    weights (``mode: sampler``), None = all 1.
    """

    train_images: np.ndarray
    train_ages: np.ndarray
    val_images: np.ndarray
    val_ages: np.ndarray
    train_weights: np.ndarray | None = None
    #: the training faces' ``fairage.training.methods.FaceArrays`` (Group DRO groups, ``age_std``), needed
    #: when the stage turns those methods on
    face_arrays: Any = None

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])


# =========================================================================== devices


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    """Lightning precision of training steps: the configured one, or for ``auto`` bf16-mixed
    where the device has native bf16 and 32-true elsewhere (``RuntimeSettings.resolve``)."""
    return RuntimeSettings.resolve(trainer_cfg).precision


def seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# =========================================================================== loaders


# size: one keyword per loader option of a stage
def make_loaders(
    model: AgeRegressor,
    stage: StageConfig,
    arrays: StageArrays,
    *,
    use_cache: bool,
    runtime: RuntimeSettings,
    channels_last: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    with_index: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of a stage; batches are ``(x, age_years, weight)``, plus each
    face's position in the training arrays when ``with_index`` (methods with per-face state).

    ``use_cache``: x is the frozen feature extractor's output (N, feature_dim), computed
    here once; otherwise uint8 images. Sampler mode draws faces by ``train_weights``
    (loss unweighted). Seeded from ``seed``: shuffling and sampling repeat exactly (their own
    generators); dropout and augmentation draw from the global RNG, which ``fit_stage`` seeds per stage.
    """
    on_gpu = runtime.on_gpu
    sampler, weights = train_sampler(stage, arrays, seed)  # sampler mode: unweighted loss
    if use_cache:
        feats_train, feats_val = cached_features(model, stage, arrays, runtime, channels_last)
        w = torch.ones(len(arrays.train_ages)) if weights is None else torch.as_tensor(np.asarray(weights, np.float32))
        train_set: Dataset = TensorDataset(
            feats_train,
            torch.as_tensor(np.asarray(arrays.train_ages, np.float32)),
            w,
            *([torch.arange(len(arrays.train_ages))] if with_index else []),
        )
        val_set: Dataset = TensorDataset(
            feats_val, torch.as_tensor(np.asarray(arrays.val_ages, np.float32)), torch.ones(len(arrays.val_ages))
        )
        workers = 0  # in-memory tensors: worker processes would only add overhead
    else:
        train_set = FaceArrayDataset(arrays.train_images, arrays.train_ages, weights, with_index=with_index)
        val_set = FaceArrayDataset(arrays.val_images, arrays.val_ages)
        workers = num_workers
    loader_kw: dict[str, Any] = {"num_workers": workers, "pin_memory": on_gpu, "persistent_workers": workers > 0}
    train_loader = DataLoader(
        train_set,
        batch_size=stage.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=seeded_generator(seed) if sampler is None else None,
        drop_last=False,
        **loader_kw,
    )
    val_loader = DataLoader(val_set, batch_size=max(stage.batch_size, 64), shuffle=False, **loader_kw)
    return train_loader, val_loader


def cached_features(
    model: AgeRegressor, stage: StageConfig, arrays: StageArrays, runtime: RuntimeSettings, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen part's features of the training and validation images: float32 (N, D) on the CPU.

    Computed in the training steps' precision (bf16 autocast under bf16-mixed), so that cached
    and uncached stage I agree.
    """
    autocast = runtime.precision.startswith("bf16")
    return tuple(
        extract_features(
            model,
            images,
            device=runtime.device,
            channels_last=channels_last,
            autocast=autocast,
            trainable=stage.trainable,
        )
        for images in (arrays.train_images, arrays.val_images)
    )


def train_sampler(stage: StageConfig, arrays: StageArrays, seed: int):
    """Sampler mode (``weighting.mode: sampler``): ``(seeded weighted sampler, None)``; else
    ``(None, the per-face loss weights or None)``."""
    weights = arrays.train_weights
    if weights is not None and stage.weighting.mode == "sampler":
        from ..fairness.weighting import make_sampler

        return make_sampler(np.asarray(weights, dtype=np.float64), len(arrays.train_ages), seed), None
    return None, weights


# =========================================================================== callbacks and IO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes through ``fairage.atomic`` (temp file + rename)
    and reads with ``weights_only=True`` (a corrupt file is a DataError naming it)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_torch(checkpoint, path)  # a full disk is an OSError naming the checkpoint, not torch's "unexpected pos"

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        return read_checkpoint(path)


def write_history(path: Path, history: pd.DataFrame) -> None:
    """Write the per-epoch rows (``HISTORY_COLUMNS``) atomically."""
    write_text(path, history[HISTORY_COLUMNS].to_csv(index=False))


def non_finite_message(stage: str, row: dict) -> str | None:
    """The stop message when a history row's train or validation loss is NaN/inf, else None."""
    bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(row[k])]
    if not bad:
        return None
    return (
        f"{stage}: {' and '.join(bad)} became {row[bad[0]]} at epoch {row['epoch']}; stage stopped, "
        "keeping its best checkpoint (try a lower learning rate or loss: huber)"
    )


class HistoryCallback(Callback):
    """Appends one row per epoch to ``history.csv`` (atomically, rank 0) and stops on NaN/inf.

    Rows of earlier stages (and of this stage's epochs before a resume point) are kept.
    ``path=None``: rows are only kept in memory.
    """

    def __init__(self, path: Path | None, stage: str, previous: pd.DataFrame | None = None):
        self.path = path
        self.stage = stage
        self.rows: list[dict] = [] if previous is None else previous.to_dict("records")
        self.epoch_lr = float("nan")
        self.non_finite: str | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "stage": self.stage}
        for key in ("train_loss", "val_loss", "train_mae", "val_mae"):
            row[key] = float(m[key]) if key in m else float("nan")
        row["lr"] = self.epoch_lr
        self.rows.append(row)
        if self.path is not None and trainer.is_global_zero:
            write_history(self.path, self.history)
        message = non_finite_message(self.stage, row)
        if message:
            self.non_finite = message
            trainer.should_stop = True

    @property
    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)


class LastCheckpoint(Checkpoint):
    """Writes ``path`` (atomically) at the end of every training epoch.

    Lightning's ``save_last`` only writes when the monitored checkpoint does, i.e. when
    validation improves; a resume from it would redo every epoch since. Being a
    ``Checkpoint``, this runs after the other callbacks (early stopping, the best
    checkpoint, the history), so the file holds their state of this epoch.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint[{self.path.name}]"

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)  # the full state (optimizer, schedulers, callbacks), for resume


class ConfigInCheckpoint(Callback):
    """Stores the run's config (YAML text) in every checkpoint under ``CONFIG_KEY``,
    so ``store.checkpoint.model_from_checkpoint`` can rebuild the model from the file alone."""

    def __init__(self, config_yaml: str):
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CONFIG_KEY] = self.config_yaml


class StageProgressBar(RichProgressBar):
    """Rich progress with the stage name and 1-based epochs: "stage1 epoch 3/50"."""

    def __init__(self, stage: str):
        super().__init__(leave=True)
        self.stage = stage

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.stage} epoch {current_epoch + 1}/{self.trainer.max_epochs}"


#: validation predictions spreading less than this (years, standard deviation) mean a collapsed model
COLLAPSE_STD = 0.5


class CollapseStop(Callback):
    """Stops a stage after the epoch in which its validation predictions collapsed.

    Collapsed: nearly constant predictions (std below ``COLLAPSE_STD`` years) that are either
    saturated (a sigmoid output whose mean is within ``SATURATION_YEARS`` of 0 or of 100 years)
    or that spread before in this stage (dead units, any head). A saturated
    output or dead ReLUs give no gradient to recover from, so training on is wasted; a model
    that has not spread its predictions yet (an early epoch predicting about the mean age) is
    not collapsed. ``message`` then says so, and ``collapsed_now`` keeps that epoch out of the
    best checkpoint (``BestCheckpoint``). Reads ``val_pred_std`` and ``val_pred_mean`` (years),
    which ``AgeModule`` logs after each validation.
    """

    SATURATION_YEARS = 1.0

    def __init__(self, stage: str):
        self.stage = stage
        self.message: str | None = None
        self.collapsed_now = False
        self.spread_before = False

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "val_pred_std" not in metrics:
            return
        std, mean = float(metrics["val_pred_std"]), float(metrics.get("val_pred_mean", float("nan")))
        output = getattr(getattr(pl_module, "model", None), "output", "sigmoid")
        if self.observe(std, mean, output, trainer.current_epoch):
            trainer.should_stop = True

    def observe(self, std: float, mean: float, output: str, epoch: int) -> bool:
        """Judge one epoch's validation predictions (std and mean in years; ``epoch`` 0-based)
        of a model with head ``output``; True when they collapsed (the stage should stop)."""
        # only the sigmoid output saturates at an end; a linear one starts near 0, and the distribution
        # heads (dex, coral, corn) may sit near an end early on small data and still learn
        bounded = output == "sigmoid"
        saturated = bounded and (mean <= self.SATURATION_YEARS or mean >= 100 - self.SATURATION_YEARS)
        self.collapsed_now = std < COLLAPSE_STD and (saturated or self.spread_before)
        self.spread_before = self.spread_before or std >= 2 * COLLAPSE_STD
        if self.collapsed_now:
            self.message = (
                f"{self.stage} collapsed in epoch {epoch + 1}: its validation predictions "
                f"are nearly constant (std {std:.2f} years, mean {mean:.1f}); the stage stopped, "
                "keeping its best checkpoint before the collapse (try a lower learning rate, "
                "warmup_epochs or grad_clip)"
            )
        return self.collapsed_now


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` of the lowest validation loss that never keeps a collapsed epoch."""

    def __init__(self, *args, collapse: CollapseStop | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.collapse = collapse

    def check_monitor_top_k(self, trainer, current=None) -> bool:
        if self.collapse is not None and self.collapse.collapsed_now:
            return False
        return super().check_monitor_top_k(trainer, current)


@dataclass
class StageCallbacks:
    """The callbacks of one stage: ``all`` goes to the Trainer; the others are read afterwards."""

    all: list[Callback]
    history: HistoryCallback
    best: ModelCheckpoint
    last: LastCheckpoint
    collapse: CollapseStop | None = None


# size: one keyword per callback option of a stage
def make_callbacks(
    stage_name: str,
    stage: StageConfig,
    run_dir: Path,
    *,
    history_path: Path | None,
    previous_history: pd.DataFrame | None = None,
    progress: bool = False,
    config_yaml: str | None = None,
    extra: Sequence[Callback] = (),
    dro_groups: Sequence[str] | None = None,
) -> StageCallbacks:
    """History (and NaN stop), early stopping, best and last checkpoints in ``run_dir/checkpoints``."""
    history = HistoryCallback(history_path, stage_name, previous_history)
    collapse = CollapseStop(stage_name) if stage.stop_on_collapse else None
    folder = RunFolder(run_dir)
    best = BestCheckpoint(
        dirpath=folder.checkpoints_dir,
        filename=folder.checkpoint(stage_name, "best").stem,
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        save_last=False,
        auto_insert_metric_name=False,
        enable_version_counter=False,
        collapse=collapse,
    )
    last = LastCheckpoint(folder.checkpoint(stage_name, "last"))
    cbs: list[Callback] = [
        history,
        *([collapse] if collapse else []),
        EarlyStopping(monitor="val_loss", mode="min", patience=stage.patience, check_finite=True),
        best,
        last,
        *extra,
    ]
    if config_yaml is not None:
        cbs.append(ConfigInCheckpoint(config_yaml))
    if dro_groups is not None and history_path is not None:  # Group DRO's q per epoch in dro_q.csv
        from .methods import DROHistoryCallback

        cbs.append(DROHistoryCallback(run_dir, stage_name, list(dro_groups)))
    if progress:
        cbs.append(StageProgressBar(stage_name))
    return StageCallbacks(cbs, history, best, last, collapse)


#: the MLflow store of a run folder without ``trainer.tracking_uri``: ``RUN/logs/mlflow.db``
MLFLOW_DB = "mlflow.db"
#: MLflow's default experiment name when ``trainer.experiment_name`` is not set
MLFLOW_EXPERIMENT = "fairage"


def sqlite_tracking_uri(folder: str | Path) -> str:
    """The MLflow tracking URI of ``FOLDER/mlflow.db`` (a local SQLite store), absolute."""
    return f"sqlite:///{(Path(folder).resolve() / MLFLOW_DB)}"


def _flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A config dump flattened to ``{"stage2.lr": "0.001", "model.head.0.units": "256", ...}``."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: "None" if value is None else str(value)}
    out: dict[str, str] = {}
    for key, sub in items:
        out.update(_flat_params(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def make_logger(trainer_cfg: TrainerConfig, run_dir: Path):
    """The Lightning logger of ``trainer.logger`` (one version, or MLflow run, per stage), or False.

    ``csv`` and ``tensorboard`` write under ``RUN/logs/version_K/``. ``mlflow``: Lightning's
    ``MLFlowLogger`` to ``trainer.tracking_uri`` (default: the run folder's own SQLite store
    ``RUN/logs/mlflow.db``, artifacts in ``mlartifacts/`` beside a SQLite file), experiment
    ``trainer.experiment_name`` (default ``"fairage"``), run name ``<config name>/<stage>``, tags
    ``fairage.run``, ``fairage.stage``, ``fairage.run_dir`` and ``trainer.tracking_tags``; the run's
    config is logged as its parameters (dotted keys, as ``--set`` names them).
    """
    if trainer_cfg.logger == "none":
        return False
    run_dir = Path(run_dir)
    if trainer_cfg.logger == "mlflow":
        return _mlflow_logger(trainer_cfg, run_dir)
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cls = TensorBoardLogger if trainer_cfg.logger == "tensorboard" else CSVLogger
    return cls(save_dir=str(run_dir), name=RunFolder.LOGS)


def _mlflow_logger(trainer_cfg: TrainerConfig, run_dir: Path):
    from lightning.pytorch.loggers import MLFlowLogger

    from ..store.run_folder import RunFolder

    uri = trainer_cfg.tracking_uri
    if uri is None:
        logs = RunFolder(run_dir).file(RunFolder.LOGS)
        logs.mkdir(parents=True, exist_ok=True)
        uri = sqlite_tracking_uri(logs)
    # MLflow puts a new experiment's artifacts under ./mlruns of the working directory unless told;
    # beside a SQLite store they stay with it (a server chooses its own)
    artifacts = (
        (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
    )
    name, stage, params = run_dir.name, None, {}
    if RunFolder.exists(run_dir):  # a stage of a run folder (not fit_stage's temporary folder)
        folder = RunFolder.open(run_dir)
        cfg = folder.config()
        name, stage = cfg.name, folder.record.stage if folder.record is not None else None
        params = _flat_params(cfg.model_dump(mode="json"))
    tags = {"fairage.run": name, "fairage.run_dir": str(run_dir.resolve()), **trainer_cfg.tracking_tags}
    if stage:
        tags["fairage.stage"] = stage
    logger = MLFlowLogger(
        experiment_name=trainer_cfg.experiment_name or MLFLOW_EXPERIMENT,
        run_name=f"{name}/{stage}" if stage else name,
        tracking_uri=uri,
        tags=tags,
        artifact_location=artifacts,
    )
    if params:
        logger.log_hyperparams(params)
    return logger


def make_trainer(
    trainer_cfg: TrainerConfig,
    runtime: RuntimeSettings,
    stage: StageConfig,
    callbacks: list[Callback],
    run_dir: Path,
    progress: bool = False,
) -> L.Trainer:
    """The Lightning Trainer of one stage (logger of ``trainer.logger``; checkpoints through ``AtomicCheckpointIO``)."""
    on_gpu = runtime.on_gpu
    return L.Trainer(
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        strategy=trainer_cfg.strategy,
        num_nodes=trainer_cfg.num_nodes,
        precision=runtime.precision,
        deterministic=trainer_cfg.deterministic,
        # cuDNN autotuning for fixed-size images, unless bitwise repeatability was asked for
        benchmark=on_gpu and not trainer_cfg.deterministic,
        max_epochs=stage.max_epochs,
        callbacks=callbacks,
        logger=make_logger(trainer_cfg, run_dir),
        enable_checkpointing=True,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=stage.grad_clip,
        gradient_clip_algorithm="norm" if stage.grad_clip is not None else None,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )

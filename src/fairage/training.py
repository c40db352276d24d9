"""Two-stage training on Lightning: stage I (head on a frozen backbone), stage II (all layers).

Core (works on in-memory arrays)::

    model, info = build_model(cfg.model)
    best = fit_stage(model, "stage1", cfg.stage1, train_images, train_ages, val_images,
                     val_ages, run_dir, trainer_cfg=cfg.trainer, seed=cfg.seed)
    years = predict(model, test_images)

Run level: ``train(cfg, data_dir, out_dir)`` loads the data, runs the configured stages
into a run folder (see docs/INTERFACES.md) and evaluates on the test split;
``resume_run(out_dir)`` continues an interrupted run.

Units. Images are uint8 NHWC arrays (N, S, S, 3) RGB; they are converted to float RGB in
[0, 1], optionally augmented and made channels_last *on the device* inside the module; the
model applies its own input normalisation (``model.input_norm``). Ages are float years. The loss is computed in the model's
label units (years / 100 for ``output: sigmoid``, years for ``linear``), so the
``huber_delta`` of the config (years) is divided by the same factor; ``train_mae`` and
``val_mae`` are always in years. ``history.csv``'s losses are therefore in label units.

Stage I freezes the backbone, and the projection too unless ``stage1.trainable`` is
"projection+head" (the kit's stage I; ``AgeRegressor.frozen_modules``), with BatchNorm kept in
eval mode; when random augmentation is off and ``cache_features`` is on, the frozen part's
output is computed once (``AgeRegressor.frozen_features``) and the rest trains on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .atomic import atomic_path, write_text
from .config import AugmentConfig, ExperimentConfig, StageConfig, TrainerConfig, dump_config, read_yaml, validate_config
from .errors import ConfigError, FairageError
from .models import AgeRegressor, build_model

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "stage", "train_loss", "val_loss", "train_mae", "val_mae", "lr"]
STAGE_TITLES = {"stage1": "stage I (head, backbone frozen)", "stage2": "stage II (all layers)"}


class NonFiniteLossError(FairageError):
    """The loss became NaN/inf before any finite validation loss: nothing worth keeping."""


# =========================================================================== data


class FaceArrayDataset(Dataset):
    """uint8 images (N, S, S, 3) + ages (N,) years + weights (N,) -> (image HWC uint8, age, weight).

    ``images`` may be a read-only memmap; each item is copied out (small) so the
    batch tensor is writable and pinnable.
    """

    def __init__(self, images: np.ndarray, ages: np.ndarray, weights: np.ndarray | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
        if len(ages) != len(images):
            raise ValueError(f"{len(images)} images but {len(ages)} ages")
        self.images = images
        self.ages = torch.as_tensor(np.asarray(ages, dtype=np.float32))
        w = np.ones(len(images), np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        if len(w) != len(images):
            raise ValueError(f"{len(images)} images but {len(w)} weights")
        self.weights = torch.as_tensor(w)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.images[i])), self.ages[i], self.weights[i]


def images_to_input(images_uint8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 RGB in [0, 1], the model's input.

    The model normalises its input itself (``fairage.models.InputNorm``).
    """
    return memory_format(images_uint8.permute(0, 3, 1, 2).float().div_(255.0), channels_last)


def memory_format(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``x`` made contiguous, in channels_last layout when asked."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def build_augment(cfg: AugmentConfig, image_size: int):
    """torchvision.transforms.v2 pipeline on one float CHW image in [0, 1] (None when off or offline)."""
    if not cfg.enabled or cfg.mode != "random":  # "replicate" copies faces before training (fairage.augment)
        return None
    from torchvision.transforms import v2

    steps: list[nn.Module] = []
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None))
    if cfg.blur_sigma > 0:
        kernel = max(3, int(2 * math.ceil(2 * cfg.blur_sigma) + 1))
        kernel = min(kernel, image_size - (1 - image_size % 2))  # odd and not larger than the image
        steps.append(v2.GaussianBlur(kernel, sigma=(0.1, cfg.blur_sigma)))
    if cfg.translate > 0:
        steps.append(v2.RandomAffine(degrees=0.0, translate=(cfg.translate, cfg.translate)))
    return v2.Compose(steps) if steps else None


# =========================================================================== Lightning module


class AgeModule(L.LightningModule):
    """Trains an ``AgeRegressor`` for one stage.

    ``frozen=True`` (stage I): the modules ``stage.trainable`` leaves frozen (backbone, and
    the projection for "head") have ``requires_grad=False`` and stay in eval mode (BatchNorm
    statistics untouched); the rest is optimised. ``inputs="features"``: batches carry the
    frozen part's cached output instead of images and only the trainable part runs.
    Batches are ``(x, age_years, weight)``.
    """

    def __init__(self, model: AgeRegressor, stage: StageConfig, frozen: bool, inputs: str = "images",
                 channels_last: bool = False, image_size: int | None = None):
        super().__init__()
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs must be 'images' or 'features', got {inputs!r}")
        if inputs == "features" and not frozen:
            raise ValueError("cached features need a frozen feature extractor")
        self.model = model
        self.stage = stage
        self.frozen = frozen
        self.inputs = inputs
        self.channels_last = channels_last
        self.augment = build_augment(stage.augment, image_size or 224) if inputs == "images" else None
        model.requires_grad_(True)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.scale = model.label_scale

    # stage I keeps BatchNorm (and everything else in the feature extractor) in eval mode.
    # Lightning does not call train() at fit start (it only captures and restores
    # submodule modes around validation), so enforce it at every epoch start too.
    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Stage I: what ``stage.trainable`` leaves frozen (``AgeRegressor.frozen_modules``); else nothing."""
        return self.model.frozen_modules(self.stage.trainable) if self.frozen else []

    def on_train_epoch_start(self) -> None:
        self.train()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, age, weight = batch
        if self.inputs == "images":
            training = self._trainer is not None and self.trainer.training
            x = self.prepare_images(x, age, augment=training)
        return x, age, weight

    def prepare_images(self, x: torch.Tensor, age: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 (N, S, S, 3) on the device -> float (N, 3, S, S) RGB in [0, 1].

        ``augment``: apply the stage's augmentation (per image; only to faces with
        ``age >= augment.min_age`` when that is set).
        """
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment is not None and augment:
            chosen = torch.ones(len(x), dtype=torch.bool, device=x.device)
            if self.stage.augment.min_age is not None:
                chosen = age >= self.stage.augment.min_age
            # v2 transforms draw one set of parameters per call: apply per image
            for i in torch.nonzero(chosen).flatten().tolist():
                x[i] = self.augment(x[i]).clamp_(0, 1)
        return memory_format(x, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.trainable_forward(x, self.stage.trainable) if self.inputs == "features" else self.model(x)

    def _step(self, batch, prefix: str):
        from .weighting import weighted_loss

        x, age, weight = batch
        out = self(x).float()
        target = age / self.scale
        use_weight = weight if prefix == "train" and self.stage.weighting.mode == "loss" else None
        loss = weighted_loss(out, target, use_weight, self.stage.loss, self.stage.huber_delta / self.scale)
        mae = (out * self.scale - age).abs().mean()
        n = len(age)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True,
                 prog_bar=True)
        self.log(f"{prefix}_mae", mae, on_step=False, on_epoch=True, batch_size=n, sync_dist=True,
                 prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.stage.lr, amsgrad=self.stage.amsgrad,
                               weight_decay=self.stage.weight_decay, eps=self.stage.adam_eps)
        # lr_min_delta: Keras's absolute min_delta instead of torch's relative threshold
        threshold = {} if self.stage.lr_min_delta is None else {"threshold": self.stage.lr_min_delta,
                                                                 "threshold_mode": "abs"}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.stage.lr_factor, patience=self.stage.lr_patience, min_lr=self.stage.min_lr,
            **threshold)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}


# =========================================================================== callbacks and IO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes through ``fairage.atomic`` (temp file + rename)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def read_history(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "history.csv"
    if path.is_file():
        return pd.read_csv(path)
    return pd.DataFrame(columns=HISTORY_COLUMNS)


def write_history(run_dir: Path, history: pd.DataFrame) -> None:
    write_text(Path(run_dir) / "history.csv", history[HISTORY_COLUMNS].to_csv(index=False))


class HistoryCallback(Callback):
    """Appends one row per epoch to ``history.csv`` (atomically, rank 0) and stops on NaN/inf.

    Rows of earlier stages (and of this stage's epochs before a resume point) are kept.
    """

    def __init__(self, run_dir: Path | None, stage: str, previous: pd.DataFrame | None = None):
        self.run_dir = run_dir
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
        if self.run_dir is not None and trainer.is_global_zero:
            write_history(self.run_dir, pd.DataFrame(self.rows, columns=HISTORY_COLUMNS))
        bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(row[k])]
        if bad:
            self.non_finite = (
                f"{self.stage}: {' and '.join(bad)} became {row[bad[0]]} at epoch {row['epoch']}; stage stopped, "
                "keeping its best checkpoint (try a lower learning rate or loss: huber)")
            trainer.should_stop = True

    @property
    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)


class StageProgressBar(RichProgressBar):
    """Rich progress with the stage name and 1-based epochs: "stage1 epoch 3/50"."""

    def __init__(self, stage: str):
        super().__init__(leave=True)
        self.stage = stage

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.stage} epoch {current_epoch + 1}/{self.trainer.max_epochs}"


# =========================================================================== stage runner


def resolve_accelerator(trainer_cfg: TrainerConfig) -> str:
    acc = trainer_cfg.accelerator
    if acc == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if acc == "cuda":
        return "gpu"
    return acc


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    return "bf16-mixed" if resolve_accelerator(trainer_cfg) == "gpu" else "32-true"


def _device_for(trainer_cfg: TrainerConfig) -> torch.device:
    return torch.device("cuda") if resolve_accelerator(trainer_cfg) == "gpu" else torch.device("cpu")


def _eval_batches(model: AgeRegressor, fn, images: np.ndarray, batch_size: int, device, channels_last: bool,
                  autocast: bool) -> list[torch.Tensor]:
    """``fn`` of each normalised batch of uint8 images (N, S, S, 3), model in eval mode; CPU tensors."""
    device = torch.device(device or "cpu")
    was_training = model.training
    model.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(fn(images_to_input(batch, channels_last)).cpu())
    model.train(was_training)
    return out


@torch.inference_mode()
def extract_features(model: AgeRegressor, images: np.ndarray, batch_size: int = 64,
                     device: torch.device | str | None = None, channels_last: bool = False,
                     autocast: bool = False, trainable: str = "head") -> torch.Tensor:
    """What stage I's frozen part computes (eval mode) for all images: the cacheable features.

    images: uint8 (N, S, S, 3). Returns float32 (N, D) on the CPU: D = feature_dim (backbone +
    projection) for ``trainable="head"``, backbone_dim (pooled backbone) for "projection+head".
    """
    out = _eval_batches(model, lambda x: model.frozen_features(x, trainable), images, batch_size, device,
                        channels_last, autocast)
    return torch.cat([o.float() for o in out]) if out else torch.empty(0, model.frozen_dim(trainable))


@torch.inference_mode()
def predict(model: AgeRegressor, images: np.ndarray, batch_size: int = 256,
            device: torch.device | str | None = None, channels_last: bool = False,
            autocast: bool = False) -> np.ndarray:
    """Predicted ages in years, float64 (N,), for uint8 images (N, S, S, 3), eval mode."""
    out = _eval_batches(model, lambda x: model.years(model(x)), images, batch_size, device, channels_last, autocast)
    return torch.cat(out).double().numpy() if out else np.empty(0)


@dataclass
class StageResult:
    """What ``fit_stage`` returns: checkpoint paths, epochs run, the stop message if any."""

    best_path: str | None
    last_path: str | None
    epochs: int
    best_val_loss: float | None
    history: pd.DataFrame
    non_finite: str | None = None


def _quiet_lightning() -> None:
    """Keep Lightning's start-up banners (GPU available, tips) out of the console."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def fit_stage(
    model: AgeRegressor,
    stage_name: str,
    stage: StageConfig,
    train_images: np.ndarray,
    train_ages: np.ndarray,
    val_images: np.ndarray,
    val_ages: np.ndarray,
    run_dir: str | Path | None = None,
    train_weights: np.ndarray | None = None,
    trainer_cfg: TrainerConfig | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = False,
    ckpt_path: str | Path | None = None,
    previous_history: pd.DataFrame | None = None,
    callbacks: Sequence[Callback] = (),
    cache_features: bool | None = None,
    _history_file: bool = True,
) -> StageResult:
    """Train ``model`` in place for one stage; afterwards it holds the stage's *best* weights.

    stage_name: "stage1" (backbone frozen, and the projection unless ``stage.trainable`` is
    "projection+head"; the rest trained) or "stage2" (all layers).
    Images: uint8 (N, S, S, 3); ages: float years (N,); train_weights: per-face weights
    (loss mode) or sampling weights (sampler mode, ``stage.weighting.mode``), None = all 1.
    Checkpoints go to ``run_dir/checkpoints/{stage_name}-best.ckpt`` and ``-last.ckpt``;
    the per-epoch rows are appended to ``previous_history`` and written to
    ``run_dir/history.csv``. ``ckpt_path`` resumes this stage from a Lightning checkpoint.
    ``cache_features`` overrides ``stage.cache_features`` (None: use the config).
    ``run_dir=None``: checkpoints go to a temporary folder and no history file is written.
    """
    if run_dir is None:  # checkpoints (for the best weights) still need a folder
        with tempfile.TemporaryDirectory(prefix="fairage-stage-") as tmp:
            return fit_stage(model, stage_name, stage, train_images, train_ages, val_images, val_ages,
                             Path(tmp), train_weights, trainer_cfg, num_workers, seed, progress, ckpt_path,
                             previous_history, callbacks, cache_features, _history_file=False)
    trainer_cfg = trainer_cfg or TrainerConfig()
    frozen = stage_name == "stage1"
    use_cache = (stage.cache_features if cache_features is None else cache_features)
    use_cache = bool(use_cache and frozen and not (stage.augment.enabled and stage.augment.mode == "random"))
    accelerator = resolve_accelerator(trainer_cfg)
    on_gpu = accelerator == "gpu"
    channels_last = bool(trainer_cfg.channels_last and on_gpu)
    precision = resolve_precision(trainer_cfg)
    run_dir = Path(run_dir)

    _quiet_lightning()
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 for what bf16 autocast leaves in float32
    L.seed_everything(seed, workers=True, verbose=False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    sampler = None
    weights = train_weights
    if train_weights is not None and stage.weighting.mode == "sampler":
        from .weighting import make_sampler

        sampler = make_sampler(np.asarray(train_weights, dtype=np.float64), len(train_ages), seed)
        weights = None  # sampler mode: unweighted loss

    if use_cache:
        device = _device_for(trainer_cfg)
        autocast = precision.startswith("bf16")
        feats_train = extract_features(model, train_images, device=device, channels_last=channels_last, autocast=autocast,
                                       trainable=stage.trainable)
        feats_val = extract_features(model, val_images, device=device, channels_last=channels_last, autocast=autocast,
                                     trainable=stage.trainable)
        w = torch.ones(len(train_ages)) if weights is None else torch.as_tensor(np.asarray(weights, np.float32))
        train_set: Dataset = TensorDataset(feats_train, torch.as_tensor(np.asarray(train_ages, np.float32)), w)
        val_set: Dataset = TensorDataset(feats_val, torch.as_tensor(np.asarray(val_ages, np.float32)),
                                         torch.ones(len(val_ages)))
        workers = 0  # in-memory tensors: worker processes would only add overhead
    else:
        train_set = FaceArrayDataset(train_images, train_ages, weights)
        val_set = FaceArrayDataset(val_images, val_ages)
        workers = num_workers
    # re-seed so both paths start training from the same RNG state (same dropout masks)
    L.seed_everything(seed, workers=True, verbose=False)
    loader_kw: dict[str, Any] = dict(num_workers=workers, pin_memory=on_gpu, persistent_workers=workers > 0)
    train_loader = DataLoader(train_set, batch_size=stage.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=_seeded_generator(seed) if sampler is None else None, drop_last=False,
                              **loader_kw)
    val_loader = DataLoader(val_set, batch_size=max(stage.batch_size, 64), shuffle=False, **loader_kw)

    module = AgeModule(model, stage, frozen=frozen, inputs="features" if use_cache else "images",
                       channels_last=channels_last, image_size=train_images.shape[1])
    history_cb = HistoryCallback(run_dir if _history_file else None, stage_name, previous_history)
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename=f"{stage_name}-best", monitor="val_loss", mode="min",
                                 save_top_k=1, save_last=True, auto_insert_metric_name=False,
                                 enable_version_counter=False)
    checkpoint.CHECKPOINT_NAME_LAST = f"{stage_name}-last"
    cbs: list[Callback] = [history_cb,
                           EarlyStopping(monitor="val_loss", mode="min", patience=stage.patience, check_finite=True),
                           checkpoint, *callbacks]
    if progress:
        cbs.append(StageProgressBar(stage_name))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        num_nodes=trainer_cfg.num_nodes,
        precision=precision,
        deterministic=trainer_cfg.deterministic,
        # cuDNN autotuning for fixed-size images, unless bitwise repeatability was asked for
        benchmark=on_gpu and not trainer_cfg.deterministic,
        max_epochs=stage.max_epochs,
        callbacks=cbs,
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*number of training batches.*",
                        ".*Checkpoint directory .* exists and is not empty.*", ".*LeafSpec.*",
                        ".*module\\(s\\) in eval mode at the start of training.*"):
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True if ckpt_path else None)
    if history_cb.non_finite:
        log.warning(history_cb.non_finite)
    best_path = checkpoint.best_model_path or None
    best_score = checkpoint.best_model_score
    best_val = float(best_score) if best_score is not None else None
    if history_cb.non_finite and (best_val is None or not math.isfinite(best_val)):
        raise NonFiniteLossError(history_cb.non_finite.replace("keeping its best checkpoint", "no finite validation loss to keep"))
    if best_path:
        load_module_checkpoint(model, best_path)
    model.to("cpu")
    return StageResult(best_path=best_path, last_path=checkpoint.last_model_path or None,
                       epochs=trainer.current_epoch, best_val_loss=best_val, history=history_cb.history,
                       non_finite=history_cb.non_finite)


def load_module_checkpoint(model: AgeRegressor, path: str | Path) -> None:
    """Load an ``AgeModule`` checkpoint's model weights into ``model`` (weights_only=True)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})


# =========================================================================== run folder


def _device_description(trainer_cfg: TrainerConfig) -> str:
    acc = resolve_accelerator(trainer_cfg)
    if acc == "gpu" and torch.cuda.is_available():
        acc = f"cuda ({torch.cuda.get_device_name(0)})"
    return f"{acc} devices={trainer_cfg.devices} nodes={trainer_cfg.num_nodes} {resolve_precision(trainer_cfg)}"


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def _read_run_json(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_run_json(run_dir: Path, info: dict) -> None:
    if _is_rank_zero():
        write_text(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


@dataclass
class RunData:
    """Faces and decoded images of the three splits."""

    faces: dict[str, pd.DataFrame]
    images: dict[str, np.ndarray]


def load_run_data(cfg: ExperimentConfig, data_dir: str | Path, progress: bool = True) -> RunData:
    """Face tables and uint8 image arrays of train/valid/test (``fairage.data``)."""
    from .data import load_faces, load_images

    faces = load_faces(data_dir, layout=cfg.data.layout, target=cfg.data.target, full_images=cfg.data.full_images)
    tables, images = {}, {}
    for split in ("train", "valid", "test"):
        table = faces[faces["split"] == split].reset_index(drop=True)
        if len(table) == 0:
            raise FairageError(f"dataset {data_dir} has no '{split}' faces; training needs train, valid and test splits")
        tables[split] = table
        images[split] = load_images(table, cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                                    workers=max(1, cfg.data.num_workers), progress=progress and _is_rank_zero())
    return RunData(tables, images)


def stage_weights(train_faces: pd.DataFrame, stage_name: str, stage: StageConfig, run_dir: Path) -> np.ndarray | None:
    """Per-face weights of a stage (None when it uses none) and its ``weights_{stage}.png``."""
    if not stage.weighting.active:
        return None
    from .report import plot_group_weights
    from .weighting import compute_weights, group_table

    weights = compute_weights(train_faces, stage.weighting)
    if _is_rank_zero():
        plot_group_weights(group_table(train_faces, stage.weighting), run_dir / f"weights_{stage_name}.png",
                           title=f"{stage_name}: group sizes and weights ({stage.weighting.scheme}, "
                                 f"{stage.weighting.formula}, mode {stage.weighting.mode})")
    return weights


def evaluate_test(cfg: ExperimentConfig, test_faces: pd.DataFrame, predictions: np.ndarray, run_dir: Path) -> dict:
    """Write ``predictions_test.csv`` and (last, atomically) ``metrics_test.json``; return the metrics."""
    from .data.predictions import write_predictions
    from .metrics import evaluate

    write_predictions(run_dir / "predictions_test.csv", test_faces, predictions)
    df = test_faces.copy()
    df["prediction"] = predictions
    metrics = evaluate(df, n_boot=cfg.eval.n_boot, level=cfg.eval.level, seed=cfg.seed)
    write_text(run_dir / "metrics_test.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


#: test predictions spread less than this (years, standard deviation) mean a collapsed model
COLLAPSE_STD = 0.5


def collapse_warning(predictions: np.ndarray) -> str | None:
    """A message when the predictions (years, shape (N,)) are nearly constant, else None.

    A network whose ReLUs died or whose sigmoid output saturated predicts one age for
    every face; its MAE and bias scores then describe the age distribution, not a model.
    """
    if len(predictions) < 2 or float(np.std(predictions)) >= COLLAPSE_STD:
        return None
    return (f"the model collapsed: its test predictions are nearly constant (std {np.std(predictions):.2f} "
            f"years, mean {np.mean(predictions):.1f}); its scores describe the data, not a model. "
            "Try a smaller learning rate or start from pretrained weights (model.weights).")


def train(cfg: ExperimentConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
          progress: bool = True, callbacks: Sequence[Callback] = ()) -> dict:
    """Train the configured stages into the run folder ``out_dir``; return the test metrics.

    ``resume=True`` continues an interrupted run in ``out_dir`` (see ``resume_run``).
    ``callbacks`` are extra Lightning callbacks for every stage. On non-zero DDP ranks
    nothing is written and an empty dict is returned.
    """
    run_dir = Path(out_dir)
    data_dir = Path(data_dir).resolve()
    # DDP's script launcher re-runs this command in the other ranks after rank 0 has
    # created the run folder: only rank 0 checks and writes it
    rank0 = _is_rank_zero()
    if rank0 and (run_dir / "metrics_test.json").is_file():
        if resume:
            return json.loads((run_dir / "metrics_test.json").read_text(encoding="utf-8"))
        raise FairageError(f"{run_dir} already holds a finished run (metrics_test.json); choose another --out")
    if rank0 and not resume and (run_dir / "run.json").is_file():
        raise FairageError(f"{run_dir} already holds an unfinished run; continue it with "
                           f"`fairage train --resume {run_dir}` or choose another --out")
    info = _read_run_json(run_dir) if resume else {}

    L.seed_everything(cfg.seed, verbose=False)  # the initial weights too
    model, weight_info = build_model(cfg.model)
    data = load_run_data(cfg, data_dir, progress=progress)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", dump_config(cfg))
    if not info:  # a new run (or a "resume" of a folder that never got a run.json)
        info = {"data_dir": str(data_dir), **weight_info, "status": "running", "stage": cfg.stages()[0][0],
                "completed_stages": [], "device": _device_description(cfg.trainer), "seed": cfg.seed}
        _write_run_json(run_dir, info)
        if rank0 and (run_dir / "history.csv").exists():
            (run_dir / "history.csv").unlink()
        resume = False
    history = read_history(run_dir)
    try:
        history = _run_stages(cfg, data, model, run_dir, info, history, resume, progress, callbacks)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        if rank0:
            print(f"interrupted: continue with `fairage train --resume {run_dir}`", file=sys.stderr)
        raise
    if not rank0:
        return {}
    from .report import plot_training_curves

    if len(history):
        plot_training_curves(history, run_dir / "curves.png", title=f"{cfg.name}: {cfg.strategy}")
    device = _device_for(cfg.trainer)
    preds = predict(model, data.images["test"], device=device,
                    autocast=resolve_precision(cfg.trainer).startswith("bf16"))
    info.update(stage="test")  # predicting and evaluating the test split
    collapsed = collapse_warning(preds)
    if collapsed:
        log.warning("%s: %s", run_dir, collapsed)
        info["warnings"] = [collapsed]
    _write_run_json(run_dir, info)
    metrics = evaluate_test(cfg, data.faces["test"], preds, run_dir)
    info.update(status="finished", stage=cfg.stages()[-1][0])
    _write_run_json(run_dir, info)
    return metrics


def _run_stages(cfg: ExperimentConfig, data: RunData, model: AgeRegressor, run_dir: Path, info: dict,
                history: pd.DataFrame, resume: bool, progress: bool, callbacks: Sequence[Callback]) -> pd.DataFrame:
    """Train the configured stages not yet completed; ``model`` ends with the last stage's best weights."""
    rank0 = _is_rank_zero()
    completed = list(info.get("completed_stages", []))
    for stage_name, stage in cfg.stages():
        best = run_dir / "checkpoints" / f"{stage_name}-best.ckpt"
        if stage_name in completed:
            load_module_checkpoint(model, best)  # the next stage starts from this stage's best
            continue
        last = run_dir / "checkpoints" / f"{stage_name}-last.ckpt"
        ckpt_path = last if resume and last.is_file() else None
        if ckpt_path is not None:
            epoch = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"]) + 1
            keep = (history["stage"] != stage_name) | (history["epoch"] <= epoch)
            history = history[keep & history["stage"].isin(completed + [stage_name])].reset_index(drop=True)
        else:
            history = history[history["stage"].isin(completed)].reset_index(drop=True)
        info.update(stage=stage_name, status="running")
        _write_run_json(run_dir, info)
        train_faces, train_images = data.faces["train"], data.images["train"]
        if stage.augment.enabled and stage.augment.mode == "replicate":  # offline copies, weighted as faces
            from .augment import replicate_faces

            train_images, source = replicate_faces(train_images, train_faces["age"].to_numpy(), stage.augment.min_age,
                                                   seed=cfg.seed)
            train_faces = train_faces.iloc[source].reset_index(drop=True)
        weights = stage_weights(train_faces, stage_name, stage, run_dir)
        result = fit_stage(
            model, stage_name, stage,
            train_images, train_faces["age"].to_numpy(np.float32),
            data.images["valid"], data.faces["valid"]["age"].to_numpy(np.float32),
            run_dir=run_dir, train_weights=weights, trainer_cfg=cfg.trainer, num_workers=cfg.data.num_workers,
            seed=cfg.seed, progress=progress and rank0, ckpt_path=ckpt_path, previous_history=history,
            callbacks=callbacks,
        )
        history = result.history
        completed.append(stage_name)
        info["completed_stages"] = completed
        if result.non_finite:
            info.setdefault("stopped", {})[stage_name] = result.non_finite
        _write_run_json(run_dir, info)
    return history


def _read_run_folder(run_dir: Path) -> tuple[ExperimentConfig, dict]:
    """A run folder's validated ``config.yaml`` and its ``run.json``."""
    if not (run_dir / "run.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise FairageError(f"{run_dir} is not a fairage run folder (no run.json/config.yaml)")
    return validate_config(read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml")), _read_run_json(run_dir)


def resume_run(out_dir: str | Path, progress: bool = True, callbacks: Sequence[Callback] = ()) -> dict:
    """Continue an interrupted run from its last checkpoint, in the right stage; return the test metrics.

    Reads the run's ``config.yaml`` and ``run.json`` (its ``data_dir``). Stages already
    completed are not retrained; the interrupted stage restarts from
    ``checkpoints/{stage}-last.ckpt`` (optimizer, scheduler, early stopping state
    included); ``history.csv`` continues where it stopped. A finished run just returns
    its metrics.
    """
    run_dir = Path(out_dir)
    cfg, info = _read_run_folder(run_dir)
    if "data_dir" not in info:
        raise FairageError(f"{run_dir / 'run.json'} has no 'data_dir': cannot tell which dataset to resume on")
    return train(cfg, info["data_dir"], run_dir, resume=True, progress=progress, callbacks=callbacks)


#: the name used in the task brief
resume = resume_run


def export_backbone(run_dir: str | Path, out_path: str | Path) -> Path:
    """Write the backbone of a finished run (best weights of its last stage) to ``out_path``.

    The file is a torchvision-style ResNet state dict (``conv1.weight``, ``layer1.0...``;
    no ``fc``) in ``.safetensors`` or ``.pth`` (chosen by the suffix), written atomically.
    Name it as ``model.weights`` of another config to start from this backbone, e.g. a
    model pretrained on one dataset (UTKFace, or synthetic faces) fine-tuned on another;
    the projection and head start at random init there. Returns ``out_path``.
    """
    run_dir, out_path = Path(run_dir), Path(out_path)
    cfg, info = _read_run_folder(run_dir)
    if info.get("status") != "finished":
        raise FairageError(f"{run_dir} holds no finished run (run.json status "
                           f"{info.get('status', 'missing')!r}); finish it with `fairage train --resume {run_dir}`")
    if out_path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ConfigError(f"{out_path}: backbone file must end in .safetensors, .pth or .pt")
    last_stage = cfg.stages()[-1][0]
    ckpt = run_dir / "checkpoints" / f"{last_stage}-best.ckpt"
    if not ckpt.is_file():
        raise FairageError(f"{ckpt} not found: the run's best checkpoint of {last_stage} is missing")
    model = AgeRegressor(cfg.model)
    load_module_checkpoint(model, ckpt)
    state = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()}
    with atomic_path(out_path) as tmp:
        if out_path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"fairage_run": str(run_dir.resolve()),
                                                 "backbone": cfg.model.backbone})
        else:
            torch.save(state, tmp)
    return out_path

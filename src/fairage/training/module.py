"""The Lightning module, the dataset and the augmentation of one training stage.

Units. Images are uint8 NHWC arrays (N, S, S, 3) RGB; they are converted to float RGB in
[0, 1], optionally augmented and made channels_last *on the device* inside the module; the
model applies its own input normalisation (``model.input_norm``). Ages are float years. The
loss is computed in the model's label units (years / 100 for ``output: sigmoid``, years for
``linear``), so the ``huber_delta`` of the config (years) is divided by the same factor;
``train_mae`` and ``val_mae`` are always in years.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config.schema import AugmentConfig, StageConfig
from ..models.regressor import AgeRegressor


class FaceArrayDataset(Dataset):
    """uint8 images (N, S, S, 3) + ages (N,) years + weights (N,) -> (image HWC uint8, age, weight).

    ``images`` may be a read-only memmap; each item is copied out (small) so the
    batch tensor is writable and pinnable.
    """

    def __init__(
        self, images: np.ndarray, ages: np.ndarray, weights: np.ndarray | None = None, with_index: bool = False
    ):
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
        # methods that keep per-face state (fairage.training.methods) need each face's position
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.with_index:
            return torch.from_numpy(np.array(self.images[i])), self.ages[i], self.weights[i], i
        return torch.from_numpy(np.array(self.images[i])), self.ages[i], self.weights[i]


def images_to_input(images_uint8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 RGB in [0, 1], the model's input.

    The model normalises its input itself (``fairage.models.backbones.InputNorm``).
    """
    return memory_format(images_uint8.permute(0, 3, 1, 2).float().div_(255.0), channels_last)


def memory_format(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``x`` made contiguous, in channels_last layout when asked."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def build_augment(cfg: AugmentConfig, image_size: int):
    """torchvision.transforms.v2 pipeline on one float CHW image in [0, 1] (None when off, offline or empty).

    The shift (``cfg.translate``) is not part of it: ``random_shift`` moves the whole batch at once.
    """
    if not cfg.enabled or cfg.mode != "random":  # "replicate" copies faces before training (fairage.training.augment)
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
    return v2.Compose(steps) if steps else None


def random_shift(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) shifted by its own whole-pixel offset, zero-filled.

    The offsets are drawn as torchvision's ``RandomAffine(degrees=0, translate=(f, f))`` draws
    them (``round(uniform(-f * side, f * side))`` per axis, from torch's global generator), and a
    whole-pixel affine move is exactly this shift; done for the batch at once, because
    ``RandomAffine`` on one small image at a time cost more than the forward and backward pass.
    """
    n, _, h, w = x.shape
    max_dx, max_dy = fraction * w, fraction * h
    dx = torch.empty(n).uniform_(-max_dx, max_dx).round().long()
    dy = torch.empty(n).uniform_(-max_dy, max_dy).round().long()
    pad = int(math.ceil(max(max_dx, max_dy)))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h)[None, :] - dy[:, None] + pad).to(x.device)  # (N, H): source row of each row
    cols = (torch.arange(w)[None, :] - dx[:, None] + pad).to(x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing picks (N, H, W, C); back to (N, C, H, W)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class AgeModule(L.LightningModule):
    """Trains an ``AgeRegressor`` for one stage.

    ``frozen=True`` (stage I): the modules ``stage.trainable`` leaves frozen (backbone, and
    the projection for "head") have ``requires_grad=False`` and stay in eval mode (BatchNorm
    statistics untouched); the rest is optimised. ``inputs="features"``: batches carry the
    frozen part's cached output instead of images and only the trainable part runs.
    Batches are ``(x, age_years, weight)``.
    """

    def __init__(
        self,
        model: AgeRegressor,
        stage: StageConfig,
        frozen: bool,
        inputs: str = "images",
        channels_last: bool = False,
        image_size: int | None = None,
        objective: nn.Module | None = None,
    ):
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
        random_images = inputs == "images" and stage.augment.enabled and stage.augment.mode == "random"
        #: the random mode's shift (fraction of the side), applied to the batch by ``random_shift``; 0 = none
        self.shift = stage.augment.translate if random_images else 0.0
        model.requires_grad_(True)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.scale = model.label_scale
        # a fairage.models.losses.StageObjective when the stage uses a method beyond weighting
        self.objective = objective
        # running count, sum and sum of squares of the epoch's validation predictions (years)
        self._val_moments = torch.zeros(3, dtype=torch.float64)

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
        if self.objective is not None:
            self.objective.start_epoch(self.current_epoch)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, age, weight, *index = batch
        if self.inputs == "images":
            training = self._trainer is not None and self.trainer.training
            x = self.prepare_images(x, age, augment=training)
        return x, age, weight, *index

    def prepare_images(self, x: torch.Tensor, age: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 (N, S, S, 3) on the device -> float (N, 3, S, S) RGB in [0, 1].

        ``augment``: apply the stage's augmentation (per image; only to faces with
        ``age >= augment.min_age`` when that is set).
        """
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if augment and (self.augment is not None or self.shift > 0):
            chosen = torch.ones(len(x), dtype=torch.bool, device=x.device)
            if self.stage.augment.min_age is not None:
                chosen = age >= self.stage.augment.min_age
            index = torch.nonzero(chosen).flatten()
            # v2 transforms draw one set of parameters per call: apply per image
            if self.augment is not None:
                for i in index.tolist():
                    x[i] = self.augment(x[i]).clamp_(0, 1)
            if self.shift > 0 and len(index):
                x[index] = random_shift(x[index], self.shift)
        return memory_format(x, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.trainable_forward(x, self.stage.trainable) if self.inputs == "features" else self.model(x)

    def batch_loss(self, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's loss (label units) and the predictions in years (B,) of one prepared batch.

        ``train``: the training objective (sample weights in ``weighting.mode: loss``, the
        methods' per-face state); else the validation loss. Shared by this module's steps and
        the lean loop (``fairage.training.lean``), so both optimise the same objective.
        """
        from ..models.losses import weighted_loss

        x, age, weight, *index = batch
        out = self(x).float()
        use_weight = weight if train and self.stage.weighting.mode == "loss" else None
        if self.objective is not None:  # Group DRO, BMC, DEX, label_std (fairage.models.losses)
            loss = self.objective(out, age, use_weight, index[0] if index else None, train=train)
        else:
            loss = weighted_loss(
                out, age / self.scale, use_weight, self.stage.loss, self.stage.huber_delta / self.scale
            )
        return loss, self.model.years(out)

    def _step(self, batch, prefix: str):
        age = batch[1]
        loss, years = self.batch_loss(batch, train=prefix == "train")
        mae = (years - age).abs().mean()
        n = len(age)
        if prefix == "val":
            y = years.detach().double().cpu()
            self._val_moments += torch.stack([torch.tensor(float(n), dtype=torch.float64), y.sum(), (y * y).sum()])
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=True)
        self.log(f"{prefix}_mae", mae, on_step=False, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        # float32 even under bf16-mixed: the validation loss picks the checkpoint and drives the
        # LR schedule, so it must score the model as test predictions will use it
        with torch.autocast(self.device.type, enabled=False):
            self._step(batch, "val")

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer is not None:
            self.warm_up(self.trainer.optimizers[0], self.trainer.global_step, self.trainer.num_training_batches)

    def warm_up(self, optimizer: torch.optim.Optimizer, step: int, batches_per_epoch: int) -> None:
        """Before optimizer step ``step`` (0-based): the linear warm-up's rate over the first
        ``warmup_epochs``; afterwards the plateau schedule alone sets the rate, so the two never
        fight over it. The cosine schedule has its warm-up built in."""
        if self.stage.warmup_epochs <= 0 or self.stage.lr_schedule != "plateau":
            return
        steps = max(1, int(round(self.stage.warmup_epochs * batches_per_epoch)))
        if step < steps:
            for group in optimizer.param_groups:
                group["lr"] = self.stage.lr * (step + 1) / steps

    def on_validation_epoch_start(self):
        self._val_moments.zero_()

    def on_validation_epoch_end(self):
        # the spread of the validation predictions: near 0 means the model predicts one age for
        # every face (a saturated output or dead units), which CollapseStop watches for
        n, total, squares = (float(v) for v in self._val_moments)
        if n > 0:
            mean = total / n
            std = max(squares / n - mean * mean, 0.0) ** 0.5
            self.log("val_pred_std", std, on_epoch=True, sync_dist=True)
            self.log("val_pred_mean", mean, on_epoch=True, sync_dist=True)

    def configure_optimizers(self, mixed: bool | None = None):
        """Adam and ReduceLROnPlateau on ``val_loss``. ``mixed``: the steps run under mixed
        precision (None: as the attached Trainer's precision says)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.objective is not None:  # BMC's noise sigma
            params += list(self.objective.parameters())
        if mixed is None:
            mixed = self._trainer is not None and str(self.trainer.precision).endswith("-mixed")
        # fused (CPU and CUDA kernels only): one pass over all parameters per step instead of one
        # per operation, the same update rule. Lightning refuses to clip the gradients of a fused
        # optimizer under mixed precision (it could unscale them itself), so clipping stages there
        # take the per-operation Adam
        fused = all(p.device.type in ("cpu", "cuda") for p in params) and not (mixed and self.stage.grad_clip)
        opt = torch.optim.Adam(
            params,
            lr=self.stage.lr,
            amsgrad=self.stage.amsgrad,
            weight_decay=self.stage.weight_decay,
            eps=self.stage.adam_eps,
            fused=fused,
        )
        if self.stage.lr_schedule == "cosine":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self._cosine(opt), "interval": "step"}}
        # lr_min_delta: Keras's absolute min_delta instead of torch's relative threshold
        threshold = (
            {} if self.stage.lr_min_delta is None else {"threshold": self.stage.lr_min_delta, "threshold_mode": "abs"}
        )
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt,
            mode="min",
            factor=self.stage.lr_factor,
            patience=self.stage.lr_patience,
            min_lr=self.stage.min_lr,
            **threshold,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}

    def _cosine(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr`` at ``max_epochs`` (per step)."""
        # the loaders are not set up yet here (num_training_batches is inf): Lightning's own estimate
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        per_epoch = total / self.stage.max_epochs
        warm = min(int(round(self.stage.warmup_epochs * per_epoch)), total - 1)
        if self.stage.warmup_epochs > 0:
            warm = max(warm, 1)
        floor = min(self.stage.min_lr / self.stage.lr, 1.0)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            done = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

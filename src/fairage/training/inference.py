"""Inference on uint8 image arrays: predicted ages and feature-extractor outputs (eval mode)."""

from __future__ import annotations

import numpy as np
import torch

from ..models.regressor import AgeRegressor
from .module import images_to_input


def _eval_batches(
    model: AgeRegressor, fn, images: np.ndarray, batch_size: int, device, channels_last: bool, autocast: bool
) -> list[torch.Tensor]:
    """``fn`` of each normalised batch of uint8 images (N, S, S, 3), model in eval mode; CPU tensors."""
    device = torch.device(device or "cpu")
    was_training = model.training
    model.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(fn(images_to_input(batch, channels_last)).cpu())
    model.train(was_training)
    return out


@torch.inference_mode()
def extract_features(
    model: AgeRegressor,
    images: np.ndarray,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    autocast: bool = False,
    trainable: str = "head",
) -> torch.Tensor:
    """What stage I's frozen part computes (eval mode) for all images: the cacheable features.

    images: uint8 (N, S, S, 3). Returns float32 (N, D) on the CPU: D = feature_dim (backbone +
    projection) for ``trainable="head"``, backbone_dim (pooled backbone) for "projection+head".
    """
    out = _eval_batches(
        model, lambda x: model.frozen_features(x, trainable), images, batch_size, device, channels_last, autocast
    )
    return torch.cat([o.float() for o in out]) if out else torch.empty(0, model.frozen_dim(trainable))


@torch.inference_mode()
def predict(
    model: AgeRegressor,
    images: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    autocast: bool = False,
) -> np.ndarray:
    """Predicted ages in years, float64 (N,), for uint8 images (N, S, S, 3), eval mode (``model.ages``: 0-150)."""
    out = _eval_batches(model, lambda x: model.ages(model(x)), images, batch_size, device, channels_last, autocast)
    return torch.cat(out).double().numpy() if out else np.empty(0)


@torch.inference_mode()
def predict_with_spread(
    model: AgeRegressor,
    images: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    autocast: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``predict``'s ages and, for a distribution head (``model.has_spread``), each face's spread:
    the standard deviation in years of its predicted age distribution, float64 (N,); else None."""
    if not model.has_spread:
        return predict(model, images, batch_size, device, channels_last, autocast), None

    def both(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return torch.stack([model.ages(out), model.spread(out)], dim=1)

    out = _eval_batches(model, both, images, batch_size, device, channels_last, autocast)
    table = torch.cat(out).double().numpy() if out else np.empty((0, 2))
    return table[:, 0].copy(), table[:, 1].copy()

"""Backbones: input normalisation, torchvision and timm networks, published ImageNet weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from ..config.schema import TORCHVISION_BACKBONES
from ..errors import ConfigError
from .vggface2 import VGGFace2ResNet50

log = logging.getLogger(__name__)


#: ImageNet normalisation (torchvision ResNets), RGB, on [0, 1] pixels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the VGGFace2 authors' mean, BGR order, on 0-255 pixels (no std division)
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)
#: Keras ``resnet50.preprocess_input`` ("caffe" mode) mean, BGR order, on 0-255 pixels
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class InputNorm(nn.Module):
    """The network's input convention, applied inside the model.

    Input: RGB float images (N, 3, S, S) in [0, 1]. Output, per ``kind``:

    * ``imagenet``: RGB, ``(x - IMAGENET_MEAN) / IMAGENET_STD``;
    * ``vggface2``: BGR, ``255 x - VGGFACE2_MEAN_BGR`` (what the VGGFace2 ResNet50 was trained on);
    * ``caffe``: BGR, ``255 x - CAFFE_MEAN_BGR`` (Keras ``resnet50.preprocess_input``).

    Written as one per-channel affine map ``x * scale + shift`` (after the channel flip),
    so an exported graph carries it. The constants are non-persistent buffers: they are
    derived from the config, not stored in state dicts.
    """

    KINDS = ("imagenet", "vggface2", "caffe", "pretrained")

    def __init__(
        self, kind: str = "imagenet", mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
    ):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"model.input_norm '{kind}' is not one of {', '.join(self.KINDS)}")
        if (kind == "pretrained") != (mean is not None and std is not None):
            raise ValueError("InputNorm: mean and std (RGB, [0, 1] pixels) are given with kind 'pretrained' only")
        self.kind = kind
        self.bgr = kind not in ("imagenet", "pretrained")
        if kind in ("imagenet", "pretrained"):
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if kind == "imagenet" else (tuple(mean), tuple(std))
            scale = [1.0 / s for s in std]
            shift = [-m / s for m, s in zip(mean, std)]
        else:
            mean = VGGFACE2_MEAN_BGR if kind == "vggface2" else CAFFE_MEAN_BGR
            scale = [255.0] * 3
            shift = [-m for m in mean]
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x.flip(1)
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return self.kind

    @classmethod
    def from_mean_std(cls, mean, std) -> InputNorm:
        """``(x - mean) / std`` per RGB channel on [0, 1] pixels: a pretrained model's own convention
        (``input_norm: pretrained``; timm's ``pretrained_cfg["mean"]`` and ``["std"]``)."""
        return cls("pretrained", mean=tuple(float(m) for m in mean), std=tuple(float(v) for v in std))


_BACKBONES = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
    "vggface2_resnet50": lambda weights=None: VGGFace2ResNet50(),
}


#: Keras BatchNormalization defaults (epsilon 1e-3, momentum 0.99 = torch momentum 0.01)
class PretrainedWeightsError(ConfigError):
    """Published weights asked for by name (``model.weights: pretrained`` / ``imagenet``) are neither
    cached nor downloadable here; the message names the file, its address and where to put it."""


def timm_backbone(name: str, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: a timm model that returns (N, num_features) pooled features.

    ``pretrained``: timm loads its published weights through its cache (the Hugging Face hub
    cache, or the torch hub cache for weights published at a URL); PretrainedWeightsError
    when they are neither cached nor downloadable (an offline machine).
    """
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError) as err:  # the hub's errors are OSErrors; urllib's URLError too
        raise PretrainedWeightsError(_timm_fetch_advice(name, err)) from None


def _timm_fetch_advice(name: str, err: Exception) -> str:
    """What to download for timm model ``name``'s pretrained weights and where to put it."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    head = f"model.weights pretrained: timm could not load the pretrained weights of {name} ({reason})."
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
        from huggingface_hub import constants

        return (
            f"{head} Download https://huggingface.co/{hub_id}/resolve/main/{filename} (the file {filename} "
            f"of the Hugging Face repository {hub_id}) on a machine with network access and pass it as "
            f"model.weights=/path/to/{filename}, or copy that machine's Hugging Face cache after "
            f"`hf download {hub_id} {filename}` into {constants.HF_HUB_CACHE} here"
        )
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url:
        target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        return f"{head} Download {url} and put it at {target}, or pass it as model.weights=/path/to/{target.name}"
    return f"{head} timm lists no published weights for it; give a local file as model.weights"


def torchvision_imagenet_state(backbone: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The ImageNet state dict of torchvision backbone ``backbone`` (its weights enum's ``DEFAULT``) and its file.

    Read through the torch hub cache (``<TORCH_HOME>/hub/checkpoints/<file name of the URL>``;
    downloaded there when missing and the network allows) with ``weights_only=True``;
    PretrainedWeightsError naming the file, its URL and that folder when it cannot be had.
    """
    if backbone not in TORCHVISION_BACKBONES:
        raise ConfigError(
            f"model.weights imagenet: backbone '{backbone}' is not one of {', '.join(TORCHVISION_BACKBONES)}"
        )
    weights = tv_models.get_model_weights(backbone).DEFAULT
    target = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    try:
        state = weights.get_state_dict(progress=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 - urllib, socket and hash errors differ; the advice is the same
        reason = f"{type(err).__name__}: {err}"
        raise PretrainedWeightsError(
            f"model.weights imagenet: the {weights} weights of {backbone} are not in the torch hub cache and "
            f"could not be downloaded ({reason}). Download {weights.url} on a machine with network access and "
            f"put it at {target} (TORCH_HOME sets the folder), or pass it as model.weights=/path/to/{target.name}"
        ) from None
    return state, target

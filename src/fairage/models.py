"""The age regressor: a torchvision ResNet backbone, an optional projection and an MLP head.

``AgeRegressor`` maps an RGB float image batch (N, 3, S, S) in [0, 1] to one value per
face in *label units*; it applies its own input normalisation first (``InputNorm``, from
``model.input_norm``), so every caller (training, feature cache, evaluation, prediction,
export) feeds the same [0, 1] RGB pixels:

* ``output: sigmoid`` -> values in [0, 1] = years / 100 (the course kit's choice; labels
  are divided by 100 for training, ``LABEL_SCALE["sigmoid"] == 100``);
* ``output: linear`` -> years directly (``LABEL_SCALE["linear"] == 1``);
* ``output: dex`` -> (N, 101) logits over the ages 0..100 (DEX, Rothe et al. 2015);
  targets stay in years (``LABEL_SCALE["dex"] == 1``) and the loss is a cross-entropy.

``model.years(out)`` converts outputs to years (for DEX: the softmax's expected age).

Layout (state-dict prefixes): ``backbone.*`` (torchvision ResNet without its ``fc``),
``projection.*`` (Linear to ``projection_dim``, the VGGFace2 model's ``dim_proj``; an
Identity when ``projection_dim`` is None) and ``head.*``. The backbone and the
projection together are the *feature extractor* (``model.features``): in stage I both
are frozen, as the kit froze the whole pretrained VGGFace2 model including ``dim_proj``;
only the head trains, so feature-cached stage I caches the projection's output.

Nothing is ever downloaded: torchvision backbones are built with ``weights=None``;
pretrained weights come only from a local file (``load_weights``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from .config import HeadBlock, ModelConfig
from .errors import ConfigError
from .losses import DEX_AGES, dex_expectation

log = logging.getLogger(__name__)

#: label units -> years factor per output kind
LABEL_SCALE: dict[str, float] = {"sigmoid": 100.0, "linear": 1.0, "dex": 1.0}

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

    KINDS = ("imagenet", "vggface2", "caffe")

    def __init__(self, kind: str = "imagenet"):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"model.input_norm '{kind}' is not one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.bgr = kind != "imagenet"
        if kind == "imagenet":
            scale = [1.0 / s for s in IMAGENET_STD]
            shift = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
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

_BACKBONES = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
}


def build_head(in_features: int, blocks: list[HeadBlock], outputs: int = 1) -> nn.Sequential:
    """MLP head: per block Dropout(p) -> Linear(units) -> ReLU, then Linear(outputs).

    The report's M5 head is ``blocks = [(0.1, 256), (0.1, 128), (0.05, 64), (0.05, 32)]``
    after the 512-d layer: 512 -> 256 -> 128 -> 64 -> 32 -> 1.
    """
    layers: list[nn.Module] = []
    width = in_features
    for block in blocks:
        if block.dropout > 0:
            layers.append(nn.Dropout(block.dropout))
        layers += [nn.Linear(width, block.units), nn.ReLU(inplace=True)]
        width = block.units
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class AgeRegressor(nn.Module):
    """Backbone -> projection -> head -> (sigmoid); output (N,) in label units ((N, 101) logits for DEX).

    Parameters
    ----------
    cfg : ModelConfig
        backbone name, projection_dim, head blocks and output kind.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.backbone not in _BACKBONES:
            raise ConfigError(f"model.backbone '{cfg.backbone}' is not one of {', '.join(_BACKBONES)}")
        backbone = _BACKBONES[cfg.backbone](weights=None)
        self.backbone_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        if cfg.projection_dim is not None:
            self.projection: nn.Module = nn.Linear(self.backbone_dim, cfg.projection_dim)
            self.feature_dim = cfg.projection_dim
        else:
            self.projection = nn.Identity()
            self.feature_dim = self.backbone_dim
        self.head = build_head(self.feature_dim, cfg.head, DEX_AGES if cfg.output == "dex" else 1)
        self.input_norm = InputNorm(cfg.input_norm)
        self.output = cfg.output
        self.label_scale = LABEL_SCALE[cfg.output]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB images in [0, 1] -> (N, feature_dim) features (backbone + projection)."""
        return self.projection(self.backbone(self.input_norm(x)))

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) features -> (N,) outputs in label units ((N, 101) logits for DEX)."""
        if self.output == "dex":
            return self.head(features)
        out = self.head(features).squeeze(-1)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.features(x))

    def years(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs -> years (N,): label units times the scale; DEX logits (N, 101) -> expected age."""
        if self.output == "dex":
            return dex_expectation(out)
        return out.float() * self.label_scale

    def feature_extractor_modules(self) -> list[nn.Module]:
        """The modules frozen in stage I (backbone and projection)."""
        return [self.backbone, self.projection]


def build_model(cfg: ModelConfig) -> tuple[AgeRegressor, dict]:
    """Build the model and load ``cfg.weights`` when given.

    Returns ``(model, info)`` where ``info`` is ``{"weights_loaded": bool}`` plus, when
    a weights file was given, ``"weights"`` (its path), ``"missing_keys"`` and
    ``"unexpected_keys"`` (recorded in the run's ``run.json``).
    """
    model = AgeRegressor(cfg)
    if cfg.weights is None:
        return model, {"weights_loaded": False}
    missing, unexpected = load_weights(model, cfg.weights)
    return model, {
        "weights_loaded": True,
        "weights": str(Path(cfg.weights).resolve()),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(
            f"model.weights file not found: {path}. Supply a local state dict (.pth/.pt, e.g. "
            "torch.save(model.state_dict(), path)) or a .safetensors file of a torchvision "
            "ResNet or of a fairage model, or set model.weights to null for random init; "
            "nothing is downloaded"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pth", ".pt", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"model.weights {path}: unknown file type '{suffix}'; use .pth, .pt or .safetensors")
    except ConfigError:
        raise
    except Exception as err:  # corrupt file, pickled objects refused by weights_only
        raise ConfigError(f"model.weights {path} could not be read as a state dict: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights {path} is not a state dict (a mapping of names to tensors)")
    # a fairage Lightning checkpoint prefixes the model's keys with "model."
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def load_weights(model: AgeRegressor, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local state dict into ``model``; return ``(missing_keys, unexpected_keys)``.

    Accepted files: ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or
    ``.safetensors``, holding either a whole fairage model (keys ``backbone.*``,
    ``projection.*``, ``head.*``; also a fairage checkpoint) or a plain torchvision
    ResNet state dict (``conv1.weight``, ...; loaded into the backbone, its ``fc.*``
    reported as unexpected, the projection and head as missing). Mismatched keys are returned and logged; a file that
    matches no key at all, or whose tensor shapes disagree, is a ConfigError.
    """
    path = Path(path)
    state = _read_state_dict(path)
    whole = any(k.split(".", 1)[0] in ("backbone", "projection", "head") for k in state)
    target: nn.Module = model if whole else model.backbone
    own = target.state_dict()
    shape_errors = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items() if k in own and own[k].shape != v.shape
    ]
    if shape_errors:
        raise ConfigError(f"model.weights {path}: tensor shapes do not match the model: {', '.join(shape_errors[:5])}"
                          + (f" and {len(shape_errors) - 5} more" if len(shape_errors) > 5 else ""))
    result = target.load_state_dict(state, strict=False)
    if whole:
        missing = list(result.missing_keys)
    else:  # a backbone-only file leaves the projection and head at random init too
        missing = ["backbone." + k for k in result.missing_keys]
        missing += [k for k in model.state_dict() if not k.startswith("backbone.")]
    unexpected = list(result.unexpected_keys)
    if len(unexpected) == len(state):
        raise ConfigError(
            f"model.weights {path}: none of its {len(state)} keys (e.g. {next(iter(state), '')!r}) match "
            f"the {type(model).__name__} ({'whole model' if whole else 'torchvision backbone'} keys such as "
            f"{next(iter(own))!r})"
        )
    # a backbone-only file is expected to leave the projection and head at random init
    surprising = missing if whole else [k for k in missing if k.startswith("backbone.")]
    if surprising:
        log.warning("model.weights %s: %d missing keys (left at random init): %s", path, len(surprising),
                    ", ".join(surprising[:10]))
    if unexpected:
        log.warning("model.weights %s: %d unexpected keys (ignored): %s", path, len(unexpected), ", ".join(unexpected[:10]))
    return missing, unexpected


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

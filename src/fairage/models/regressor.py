"""The age regressor: a ResNet backbone, an optional projection and an MLP head.

``AgeRegressor`` maps an RGB float image batch (N, 3, S, S) in [0, 1] to one value per
face in *label units*; it applies its own input normalisation first (``InputNorm``, from
``model.input_norm``), so every caller (training, feature cache, evaluation, prediction,
export) feeds the same [0, 1] RGB pixels:

* ``output: sigmoid`` -> values in [0, 1] = years / 100 (the course kit's choice; labels
  are divided by 100 for training, ``LABEL_SCALE["sigmoid"] == 100``);
* ``output: linear`` -> years directly (``LABEL_SCALE["linear"] == 1``);
* ``output: dex`` -> (N, 101) logits over the ages 0..100 (DEX, Rothe et al. 2015);
  targets stay in years (``LABEL_SCALE["dex"] == 1``) and the loss is a cross-entropy;
* ``output: coral`` / ``corn`` -> (N, 100) logits of the ordinal tasks "age > k", k = 0..99
  (CORAL, Cao et al. 2020: ``coral_pytorch.layers.CoralLayer``, one weight vector shared by
  all tasks and 100 biases; CORN, Shi et al. 2023: a plain ``Linear(100)``); targets in years.

``model.years(out)`` converts outputs to years (for DEX: the softmax's expected age; for
CORAL/CORN: the number of thresholds passed); ``model.spread(out)`` is the standard
deviation in years of the age distribution the distribution heads (dex, coral, corn) give.

Layout (state-dict prefixes): ``backbone.*`` (a torchvision ResNet without its ``fc``, or
``VGGFace2ResNet50``, the VGGFace2 authors' Keras ResNet50 as the course kit uses it),
``projection.*`` (Linear to ``projection_dim``, the VGGFace2 model's ``dim_proj``, followed by
a ReLU for ``vggface2_resnet50`` as in Keras; an Identity when ``projection_dim`` is None) and
``head.*``. The backbone and the projection together are the *feature extractor*
(``model.features``). Stage I freezes the backbone and, with ``trainable: head``, the
projection too (the cache then holds the projected features); with ``trainable:
projection+head`` (the kit: ``dim_proj`` trains with the head) only the backbone is frozen
and the cache holds the pooled backbone output (``frozen_modules``, ``frozen_features``,
``trainable_forward``).

``model.backbone: timm/<name>`` is any timm model, built with ``num_classes=0`` so that it
returns its pooled features; its input normalisation is the mean/std of its pretrained
config (``input_norm: pretrained``, ``InputNorm.from_mean_std``).

Weights: a local file (``load_weights``: safetensors, or a state dict read with
``weights_only=True``), or, asked for by name, the published ones through their library's
cache: ``model.weights: pretrained`` (timm: ``timm.create_model(pretrained=True)``, the
Hugging Face cache) and ``model.weights: imagenet`` (torchvision: the weights enum's
``DEFAULT`` through the torch hub cache, ``<TORCH_HOME>/hub/checkpoints``). Nothing else is
downloaded; an offline machine without the cached file gets a ConfigError naming the file,
its address and where to put it (``PretrainedWeightsError``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config.schema import ModelConfig, timm_name
from ..errors import ConfigError
from .backbones import (
    _BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputNorm,
    timm_backbone,
    torchvision_imagenet_state,
)
from .heads import (
    DISTRIBUTION_HEADS,
    HEAD_OUTPUTS,
    LABEL_SCALE,
    build_head,
    clamp_ages,
    scale_bias_lr,
)
from .losses import (
    DEX_AGES,
    dex_expectation,
    dex_spread,
    ordinal_ages,
    ordinal_spread,
)
from .vggface2 import VGGFace2ResNet50

log = logging.getLogger(__name__)


class AgeRegressor(nn.Module):
    """Backbone -> projection -> head -> (sigmoid); output (N,) in label units ((N, 101) logits for DEX).

    Parameters
    ----------
    cfg : ModelConfig
        backbone name, projection_dim, head blocks and output kind.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        timm = timm_name(cfg.backbone)
        if timm is None and cfg.backbone not in _BACKBONES:
            raise ConfigError(f"model.backbone '{cfg.backbone}' is not one of {', '.join(_BACKBONES)} or timm/<name>")
        # random init here: published weights are loaded by build_model only, so that a trained model
        # (whose checkpoint replaces them) loads without them on an offline machine
        backbone = timm_backbone(timm) if timm else _BACKBONES[cfg.backbone](weights=None)
        if timm:
            self.backbone_dim = int(backbone.num_features)
        elif isinstance(backbone, VGGFace2ResNet50):
            self.backbone_dim = backbone.out_features
        else:
            self.backbone_dim = backbone.fc.in_features
            backbone.fc = nn.Identity()
        self.backbone = backbone
        if cfg.projection_dim is not None:
            self.projection: nn.Module = nn.Linear(self.backbone_dim, cfg.projection_dim)
            self.feature_dim = cfg.projection_dim
        else:
            self.projection = nn.Identity()
            self.feature_dim = self.backbone_dim
        # the VGGFace2 model's dim_proj is Dense(512, relu); a projection without a
        # nonlinearity would merge with the head's first layer into one linear map
        self.projection_act: nn.Module = nn.ReLU() if cfg.backbone == "vggface2_resnet50" else nn.Identity()
        self.head = build_head(
            self.feature_dim, cfg.head, HEAD_OUTPUTS[cfg.output], last="coral" if cfg.output == "coral" else "linear"
        )
        if cfg.head_init == "keras":
            for module in [self.projection, *self.head]:
                if isinstance(module, nn.Linear):  # Keras Dense defaults: glorot-uniform kernel, zero bias
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        if cfg.output == "corn" and cfg.corn_shared_init:
            with torch.no_grad():
                self.head[-1].weight.copy_(self.head[-1].weight[:1].expand_as(self.head[-1].weight))
        if cfg.output in ("coral", "corn"):  # after the init: it sets the tensors themselves
            scale_bias_lr(self.head[-1], self._threshold_name(cfg.output), cfg.ordinal_bias_lr)
        if cfg.input_norm == "pretrained":
            if not timm:
                raise ConfigError(f"model.input_norm 'pretrained' needs a timm backbone, not '{cfg.backbone}'")
            pretrained = backbone.pretrained_cfg
            self.input_norm = InputNorm.from_mean_std(
                pretrained.get("mean", IMAGENET_MEAN), pretrained.get("std", IMAGENET_STD)
            )
        else:
            self.input_norm = InputNorm(cfg.input_norm)
        self.output = cfg.output
        self.label_scale = LABEL_SCALE[cfg.output]
        self.flip_average = cfg.flip_average

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB images in [0, 1] -> (N, feature_dim) features (backbone + projection)."""
        return self.project(self.pooled(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB images in [0, 1] -> (N, backbone_dim) pooled backbone output."""
        return self.backbone(self.input_norm(x))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, backbone_dim) pooled output -> (N, feature_dim) projected features (with its ReLU, if any)."""
        return self.projection_act(self.projection(pooled))

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) features -> (N,) outputs in label units ((N, 101) logits for DEX, (N, 100) for CORAL/CORN)."""
        if self.output in DISTRIBUTION_HEADS:
            return self.head(features)
        out = self.head(features).squeeze(-1)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head_forward(self.features(x))
        if self.flip_average and not self.training:
            # (N, 3, S, S): the mirror image flips the width axis; the mean is of label units
            # (logits for the distribution heads), so every path that calls the model agrees
            out = (out + self.head_forward(self.features(torch.flip(x, dims=[3])))) / 2
        return out

    def years(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs -> years (N,): label units times the scale; DEX logits (N, 101) -> expected age;
        CORAL/CORN logits (N, 100) -> the number of thresholds passed."""
        if self.output == "dex":
            return dex_expectation(out)
        if self.output in ("coral", "corn"):
            return ordinal_ages(out, self.output)
        return out.float() * self.label_scale

    def init_output_bias(self, train_ages) -> bool:
        """Start a distribution head at the training ages' distribution (its last layer's biases); True if done.

        ``train_ages``: (N,) years. DEX: ``b_k = log p_k``, CORAL: ``b_k = logit P(age > k)``,
        CORN: ``b_k = logit P(age > k | age > k-1)``, the probabilities counted over the ages
        rounded to 0..100 with half a face added to every count (no infinite logit). At torch's
        init every bias is near 0: DEX's softmax starts uniform over 0..100 and CORAL's 100
        thresholds start within 1 logit of each other, so the first epochs only spread them
        out; from the prior they start where a mean predictor ends and learn the faces at
        once. The regression heads are left alone (False).
        """
        if self.output not in DISTRIBUTION_HEADS:
            return False
        ages = torch.as_tensor(np.asarray(train_ages, dtype=np.float32)).reshape(-1)
        counts = torch.bincount(ages.round().clamp(0, DEX_AGES - 1).long(), minlength=DEX_AGES).double() + 0.5
        if self.output == "dex":
            bias = (counts / counts.sum()).log()
        else:
            above = counts.sum() - counts.cumsum(0)[:-1]  # faces older than k, k = 0..99
            if self.output == "coral":
                p = above / counts.sum()
            else:  # conditional on being older than k-1
                p = above / torch.cat([counts.sum().reshape(1), above[:-1]])
            bias = (p / (1 - p)).log()
        from torch.nn.utils import parametrize

        last, name = self.head[-1], self._threshold_name(self.output)
        with torch.no_grad():
            if parametrize.is_parametrized(last, name):  # scale_bias_lr: assigning sets the parameter behind it
                setattr(last, name, bias.float().clone())
            else:
                getattr(last, name).copy_(bias.float())
        return True

    @staticmethod
    def _threshold_name(output: str) -> str:
        """The name of the last layer's bias vector: CoralLayer's ``coral_bias``, else Linear's ``bias``."""
        return "coral_bias" if output == "coral" else "bias"

    @property
    def has_spread(self) -> bool:
        """Whether the head gives a distribution over the ages (``spread`` is defined)."""
        return self.output in DISTRIBUTION_HEADS

    def spread(self, out: torch.Tensor) -> torch.Tensor | None:
        """Outputs -> (N,) standard deviation in years of each face's predicted age distribution
        (DEX's softmax; CORAL's and CORN's threshold probabilities); None for the regression heads."""
        if self.output == "dex":
            return dex_spread(out)
        if self.output in ("coral", "corn"):
            return ordinal_spread(out, self.output)
        return None

    def ages(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs -> predicted ages in years (N,): ``years`` clamped into ``PREDICTION_RANGE`` (0-150).

        A linear output can fall a little below 0 for a baby's face; what the model reports
        (predictions files, photos, the service, exports) is clamped so that it is always an age.
        Training and its logged MAE use ``years`` (a clamp would zero the gradient out there).
        """
        return clamp_ages(self.years(out))

    # Stage I split. ``trainable`` (``StageConfig.trainable``) says what trains on top of
    # the frozen part: "head" (backbone and projection frozen) or "projection+head" (the
    # kit's stage I: only the backbone frozen, dim_proj trains with the head).

    def frozen_modules(self, trainable: str) -> list[nn.Module]:
        """The modules stage I freezes (``requires_grad=False``, eval mode)."""
        _check_trainable(trainable)
        return [self.backbone, self.projection] if trainable == "head" else [self.backbone]

    def frozen_features(self, x: torch.Tensor, trainable: str) -> torch.Tensor:
        """What the frozen part computes (cacheable): (N, frozen_dim(trainable)) for images (N, 3, S, S)."""
        _check_trainable(trainable)
        return self.features(x) if trainable == "head" else self.pooled(x)

    def trainable_forward(self, frozen: torch.Tensor, trainable: str) -> torch.Tensor:
        """``frozen_features`` output -> (N,) outputs in label units, through the trainable part."""
        _check_trainable(trainable)
        return self.head_forward(frozen if trainable == "head" else self.project(frozen))

    def frozen_dim(self, trainable: str) -> int:
        """Width of ``frozen_features``: feature_dim ("head") or backbone_dim ("projection+head")."""
        _check_trainable(trainable)
        return self.feature_dim if trainable == "head" else self.backbone_dim


TRAINABLE = ("head", "projection+head")


def _check_trainable(trainable: str) -> None:
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")


def build_model(cfg: ModelConfig) -> tuple[AgeRegressor, dict]:
    """Build the model and load ``cfg.weights`` when given.

    Returns ``(model, info)`` where ``info`` is ``{"weights_loaded": bool}`` plus, when
    weights were given, ``"weights"`` (the file's path; for ``imagenet`` the cached file;
    for timm's ``pretrained`` the model's name), ``"missing_keys"`` and ``"unexpected_keys"``
    (recorded in the run's ``run.json``).
    """
    model = AgeRegressor(cfg)
    if cfg.weights is None:
        return model, {"weights_loaded": False}
    if cfg.weights in ("pretrained", "imagenet"):
        if cfg.weights == "pretrained":
            name = timm_name(cfg.backbone)
            state, source = timm_backbone(name, pretrained=True).state_dict(), f"timm pretrained {name}"
        else:
            state, path = torchvision_imagenet_state(cfg.backbone)
            source = str(path)
        result = model.backbone.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ConfigError(
                f"model.weights {cfg.weights}: {source} lacks {len(result.missing_keys)} tensors of "
                f"{cfg.backbone} (e.g. {result.missing_keys[0]}); delete the cached file so that it is "
                "fetched again"
            )
        missing = [k for k in model.state_dict() if not k.startswith("backbone.")]
        return model, {
            "weights_loaded": True,
            "weights": source,
            "missing_keys": missing,
            "unexpected_keys": list(result.unexpected_keys),
        }
    missing, unexpected = load_weights(model, cfg.weights)
    return model, {
        "weights_loaded": True,
        "weights": str(Path(cfg.weights).resolve()),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from ..store.checkpoint import MODEL_PREFIX, strip_model_prefix
    from ..store.model_folder import WEIGHTS as MODEL_FOLDER_WEIGHTS

    if path.is_dir():  # a model folder: config.yaml + model.safetensors
        if not (path / MODEL_FOLDER_WEIGHTS).is_file():
            raise ConfigError(
                f"model.weights {path} is a folder without {MODEL_FOLDER_WEIGHTS}: not a fairage "
                "model folder (fairage import-keras writes one)"
            )
        path = path / MODEL_FOLDER_WEIGHTS
    if not path.is_file():
        raise ConfigError(
            f"model.weights file not found: {path}. Supply a local state dict (.pth/.pt, e.g. "
            "torch.save(model.state_dict(), path)) or a .safetensors file of a torchvision "
            "ResNet or of a fairage model, a model folder (fairage import-keras), or set model.weights to "
            "null for random init; "
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
    except Exception as err:  # noqa: BLE001 - corrupt file, pickled objects refused by weights_only
        raise ConfigError(f"model.weights {path} could not be read as a state dict: {load_error_reason(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights {path} is not a state dict (a mapping of names to tensors)")
    # a fairage Lightning checkpoint prefixes the model's keys with "model."
    if state and all(k.startswith(MODEL_PREFIX) for k in state):
        state = strip_model_prefix(state)
    return state


def load_error_reason(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry unsafely.

    torch's message suggests turning the safe loading off, which would run whatever the
    file's pickle holds; fairage never does that, so only the sentences saying what was
    refused are kept.
    """
    text = str(err)
    if "weights_only" not in text and "Weights only load failed" not in text:
        return text
    advice = (
        "weights_only",
        "weights only",
        "trusted source",
        "re-running",
        "documentation",
        "safe_globals",
        "pytorch 2.6",
        "please check",
        "you have two options",
        "do those steps",
    )
    kept = [
        sentence.strip()
        for line in text.splitlines()
        for sentence in re.split(r"(?<=\.)\s+", line)
        if sentence.strip() and not any(a in sentence.lower() for a in advice)
    ]
    reason = " ".join(kept).strip()
    return "the file holds pickled Python objects, not only tensors, and fairage never unpickles them" + (
        f" ({reason.rstrip('.')})" if reason else ""
    )


def load_weights(model: AgeRegressor, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local state dict into ``model``; return ``(missing_keys, unexpected_keys)``.

    Accepted files: ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or
    ``.safetensors``, holding either a whole fairage model (keys ``backbone.*``,
    ``projection.*``, ``head.*``; also a fairage checkpoint) or a plain torchvision
    ResNet state dict (``conv1.weight``, ...; loaded into the backbone, its ``fc.*``
    reported as unexpected, the projection and head as missing), or a model folder
    (``fairage import-keras``: its ``model.safetensors``; the head is loaded only when all
    its tensors fit this model's head, else it stays at random init). Mismatched keys are returned and logged; a file that
    matches no key at all, or whose tensor shapes disagree, is a ConfigError.
    """
    path = Path(path)
    state = _read_state_dict(path)
    whole = any(k.split(".", 1)[0] in ("backbone", "projection", "head") for k in state)
    target: nn.Module = model if whole else model.backbone
    own = target.state_dict()
    if path.is_dir():
        state = _matching_head_only(path, state, own)
    shape_errors = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if shape_errors:
        raise ConfigError(
            f"model.weights {path}: tensor shapes do not match the model: {', '.join(shape_errors[:5])}"
            + (f" and {len(shape_errors) - 5} more" if len(shape_errors) > 5 else "")
        )
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
        log.warning(
            "model.weights %s: %d missing keys (left at random init): %s",
            path,
            len(surprising),
            ", ".join(surprising[:10]),
        )
    if unexpected:
        log.warning(
            "model.weights %s: %d unexpected keys (ignored): %s", path, len(unexpected), ", ".join(unexpected[:10])
        )
    return missing, unexpected


def _matching_head_only(path: Path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict:
    """A model folder's state without its head when that head does not fit the model's (all or nothing).

    A folder's backbone and projection must fit; its head is kept only when every head
    tensor has the model's name and shape (another head config starts at random init).
    """
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    own_head = {k: v for k, v in own.items() if k.startswith("head.")}
    if head and (set(head) != set(own_head) or any(own_head[k].shape != v.shape for k, v in head.items())):
        log.warning(
            "model.weights %s: its head (%s) does not fit this model's head; the head starts at random init",
            path,
            ", ".join(f"{k} {tuple(v.shape)}" for k, v in head.items() if k.endswith("weight")),
        )
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    return state

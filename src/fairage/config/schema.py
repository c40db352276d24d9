"""Validated experiment configs (pydantic). Presets are YAML files in ``config/yaml/`` (``presets``).

An experiment is a model, a data set-up and one or two training stages:

* ``stage1``: backbone frozen (BatchNorm in eval mode too), head trained.
* ``stage2``: all layers trainable; starts from stage I's best checkpoint when
  ``stage1`` is present, otherwise from the initial weights (the report's
  "strategy 1" single-stage baseline).

At least one stage must be given. Unknown keys anywhere are rejected with a message
that names the key and lists the valid ones.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError

#: bounds of settings whose extremes cost memory or time out of proportion (each message names its range)
MAX_IMAGE_SIZE = 1024  # px; the VGGFace2 network is 224
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_NUM_WORKERS = 64
MAX_UNITS = 65_536
#: bootstrap resamples: the resample matrix is (n_boot, N) integers
MAX_N_BOOT = 10_000
#: label permutations per bias score
MAX_N_PERM = 100_000


class StrictModel(BaseModel):
    # NaN and infinity are refused in every float setting (a learning rate of inf trains NaNs)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class GroupingConfig(StrictModel):
    """How training faces are grouped (``fairage.fairness.weighting.face_group_names``): by ``scheme``;
    a custom scheme crosses ``attributes`` ("age" = age bins with inner edges ``age_edges``) and merges
    groups by ``merges``. Shared by ``WeightingConfig`` (the groups weighted) and ``DROConfig`` (the
    groups Group DRO balances); each names its own schemes and default."""

    scheme: str = "none"
    #: custom scheme: attributes to cross; "age" means age bins with ``age_edges``
    attributes: list[str] = Field(default_factory=list)
    #: inner age-bin edges in years for "age" in custom schemes
    age_edges: list[float] = Field(default_factory=lambda: [20.0, 40.0, 60.0])
    #: custom scheme: new group name -> list of group names merged into it
    merges: dict[str, list[str]] = Field(default_factory=dict)


class WeightingConfig(GroupingConfig):
    """How training faces are weighted (see ``fairage.fairness.weighting``).

    Group part: faces are grouped by ``scheme``; each group gets a weight from
    ``formula`` applied to its count. LDS part (``lds: true``): a per-face factor
    1/smoothed-age-density. With both, a face's weight is the product. The result is
    rescaled to mean 1 over the training set, then clipped at ``max_weight``.
    """

    scheme: Literal["none", "age", "age_ethnicity", "age_ethnicity_expression", "custom"] = "none"
    formula: Literal["inverse", "sqrt_inverse", "effective_number"] = "inverse"
    #: added to every group count before the formula (the report used 1)
    pseudo_count: float = Field(0.0, ge=0)
    #: effective_number's beta in [0, 1)
    beta: float = Field(0.999, ge=0, lt=1)
    lds: bool = False
    lds_kernel_size: int = Field(5, ge=1, le=1001)
    lds_sigma: float = Field(2.0, gt=0)
    lds_sqrt: bool = False
    #: clip weights after the mean-1 rescaling (None: no clip)
    max_weight: float | None = Field(None, gt=0)
    #: "loss": weights multiply per-face loss; "sampler": weighted sampling, unweighted loss
    mode: Literal["loss", "sampler"] = "loss"

    @property
    def active(self) -> bool:
        return self.scheme != "none" or self.lds


class AugmentConfig(StrictModel):
    """Training augmentation (off by default; the report's Task 2 forbids it).

    ``mode: random``: random transforms drawn per image at every step (the fields below).
    ``mode: replicate``: the course kit's Task 1, offline: before training, every face aged
    ``min_age`` or more (the kit: 60) gets 4 extra copies (horizontal flip, brightness x0.5 in
    HSV V, 5x5 Gaussian blur sigma 1, a shift of up to 25/224 of the side), seeded by the run's
    seed (``fairage.training.augment.replicate_faces``); the other fields are not used.
    """

    enabled: bool = False
    mode: Literal["random", "replicate"] = "random"
    hflip: float = Field(0.5, ge=0, le=1)  # probability
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    blur_sigma: float = Field(1.0, ge=0)  # max Gaussian blur sigma in pixels; 0 disables
    translate: float = Field(0.05, ge=0, le=0.5)  # fraction of the image side
    #: only augment faces at least this old (the kit used 60); None = everyone
    min_age: float | None = None


class DROConfig(GroupingConfig):
    """Group DRO (Sagawa et al. 2020): the loss is ``sum_g q_g loss_g`` over per-group mean losses.

    Groups are those of a weighting scheme (``fairage.fairness.weighting``: ``scheme``,
    ``attributes``, ``age_edges``, ``merges`` mean the same there). After each training
    batch ``q_g <- q_g exp(eta (loss_g + size_adjustment / sqrt(n_g)))``, normalised to sum
    1; ``loss_g`` is in the stage's loss units and ``n_g`` the group's training faces.
    """

    enabled: bool = False
    scheme: Literal["age", "age_ethnicity", "age_ethnicity_expression", "custom"] = "age_ethnicity"
    #: step size of the exponentiated-gradient update of q
    eta: float = Field(1.0, gt=0)
    #: the group adjustment C (0 = none), in loss units times sqrt(faces)
    size_adjustment: float = Field(0.0, ge=0)

    def grouping(self) -> WeightingConfig:
        """The groups as a ``WeightingConfig`` (for ``fairage.fairness.weighting.face_group_names``)."""
        return WeightingConfig(**{key: getattr(self, key) for key in GroupingConfig.model_fields})


class StageConfig(StrictModel):
    lr: float = Field(1e-5, gt=0)
    amsgrad: bool = False
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE)
    max_epochs: int = Field(50, ge=1, le=MAX_EPOCHS)
    #: upper bound on the training images the stage sees (faces x epochs): the stage runs
    #: min(max_epochs, floor(max_images / training faces)) epochs (at least one), so its time does
    #: not grow with the dataset (None: max_epochs alone)
    max_images: int | None = Field(None, ge=1)
    #: early stopping on validation loss
    patience: int = Field(20, ge=1, le=MAX_EPOCHS)
    #: "plateau": ReduceLROnPlateau on validation loss (``lr_factor``, ``lr_patience``, ``min_lr``);
    #: "cosine": per-step cosine decay from ``lr`` (after any warm-up) to ``min_lr`` at ``max_epochs``
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    lr_factor: float = Field(0.1, gt=0, lt=1)
    lr_patience: int = Field(10, ge=1, le=MAX_EPOCHS)
    min_lr: float = Field(1e-7, ge=0)
    #: ReduceLROnPlateau improvement threshold: None = torch's (relative, 1e-4); a number =
    #: an absolute change of the validation loss (label units), Keras's ``min_delta`` (1e-4)
    lr_min_delta: float | None = Field(None, ge=0)
    #: "bmc": Balanced MSE (batch Monte-Carlo); "ce": cross-entropy, only with ``model.output: dex``;
    #: "coral" / "corn": the ordinal heads' losses, each only with its head. Unset in an experiment
    #: config, the loss follows the head (``HEAD_LOSS``: mse for sigmoid and linear, ce for dex, ...)
    loss: Literal["mse", "mae", "huber", "bmc", "ce", "coral", "corn"] = "mse"
    #: Huber transition point in years
    huber_delta: float = Field(5.0, gt=0)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    #: clip the gradients' global norm to this before each step (None: no clipping)
    grad_clip: float | None = Field(None, gt=0)
    #: raise the learning rate linearly from lr / steps to lr over this many epochs (0: no warm-up):
    #: the head of a two-stage run meets a newly trainable backbone gently
    warmup_epochs: float = Field(0.0, ge=0)
    #: stop the stage after an epoch whose validation predictions collapsed (``training.CollapseStop``)
    stop_on_collapse: bool = True
    #: stage I only: train the head on backbone features computed once
    cache_features: bool = True
    #: the loop a cached stage I trains in: "auto" (the lean loop, ``fairage.training.lean``, where
    #: it supports the setup, else Lightning's), "lean" (an error where it does not) or "lightning"
    loop: Literal["auto", "lean", "lightning"] = "auto"
    #: stage I only: what trains on the frozen backbone: "head" (projection frozen too) or
    #: "projection+head" (the kit's stage I: dim_proj trains; cached features are then the
    #: pooled backbone output). Stage II trains every layer whatever this says.
    trainable: Literal["head", "projection+head"] = "head"
    #: Adam's epsilon (torch default 1e-8; Keras's default 1e-7)
    adam_eps: float = Field(1e-8, gt=0)
    # mitigation methods beyond weighting (``fairage.models.losses``); all off by default
    #: loss bmc: initial noise sigma in years (learned with the stage's optimizer)
    bmc_sigma: float = Field(8.0, gt=0)
    #: loss ce (DEX): Gaussian label-distribution sigma in years; 0 = one-hot target class (the
    #: DEX paper's). 2 by default: one-hot targets over 101 classes teach no order between them, and
    #: at --scale cpu DEX then learns three times slower than the regression head (measured)
    dex_sigma: float = Field(2.0, ge=0)
    #: loss ce (DEX): weight of the L1 error (years) of the softmax's expected age, added to the
    #: cross-entropy (DLDL-v2, Gao et al. 2018); 0 = the plain cross-entropy of DEX
    dex_l1: float = Field(1.0, ge=0)
    #: per-face rater spread (face table column ``age_std``): "sample" draws each epoch's
    #: targets from N(age, age_std); "weight" multiplies the loss by 1/age_std^2 (mean 1)
    label_std: Literal["off", "sample", "weight"] = "off"
    #: age_std values below this (years) are raised to it, so 1/age_std^2 stays bounded
    age_std_floor: float = Field(1.0, gt=0)
    dro: DROConfig = Field(default_factory=DROConfig)

    def epochs_for(self, n_train: int) -> int:
        """The stage's epoch count on ``n_train`` training faces (``max_epochs`` capped by ``max_images``)."""
        if self.max_images is None or n_train <= 0:
            return self.max_epochs
        return max(1, min(self.max_epochs, self.max_images // n_train))


class HeadBlock(StrictModel):
    dropout: float = Field(0.0, ge=0, lt=1)
    units: int = Field(..., ge=1, le=MAX_UNITS)


#: the torchvision backbones (``model.weights: imagenet`` loads their ImageNet weights)
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50")
#: ``model.backbone: timm/<name>``: any timm model (``timm.create_model(name, num_classes=0)``)
TIMM_PREFIX = "timm/"


def timm_name(backbone: str) -> str | None:
    """The timm model name of ``timm/<name>``, else None."""
    return backbone[len(TIMM_PREFIX) :] if backbone.startswith(TIMM_PREFIX) else None


class ModelConfig(StrictModel):
    #: torchvision ResNets, "vggface2_resnet50": the VGGFace2 authors' Keras ResNet50 (the
    #: course kit's network; its projection is dim_proj, Dense(projection_dim) + ReLU), or
    #: "timm/<name>": a timm model's pooled features (e.g. timm/convnext_tiny.fb_in22k)
    backbone: str = "resnet50"
    #: a local .pth/.pt state dict, .safetensors file or model folder; "pretrained" (timm backbones:
    #: timm's own weights through its cache, ``timm.create_model(pretrained=True)``); "imagenet"
    #: (torchvision backbones: the weights enum's DEFAULT through the torch hub cache); None =
    #: random init (recorded in the run). An offline machine needs the cached file (the error says which)
    weights: Literal["pretrained", "imagenet"] | Path | None = None
    #: optional linear projection after pooling (VGGFace2's dim_proj); None = none
    projection_dim: int | None = Field(512, ge=1, le=MAX_UNITS)
    head: list[HeadBlock] = Field(default_factory=lambda: [HeadBlock(units=128), HeadBlock(units=32)])
    #: "sigmoid": output in [0, 100] years (labels /100 internally); "linear": raw years;
    #: "dex": 101 age classes 0..100, softmax, prediction = expected value (trains with loss ce);
    #: "coral" / "corn": 100 ordinal thresholds "age > k" (coral-pytorch), prediction = thresholds passed
    output: Literal["sigmoid", "linear", "dex", "coral", "corn"] = "sigmoid"
    #: the network's input convention, applied inside the model (``fairage.models.backbones.InputNorm``):
    #: "imagenet" (RGB, ImageNet mean/std), "vggface2" (BGR 0-255 minus the VGGFace2 mean),
    #: "caffe" (BGR 0-255 minus 103.939/116.779/123.68, Keras resnet50.preprocess_input),
    #: "pretrained" (timm backbones, their default: the mean and std of the model's pretrained config)
    input_norm: Literal["imagenet", "vggface2", "caffe", "pretrained"] = "imagenet"
    #: initialisation of the Dense layers fairage creates (projection, head): "torch" (nn.Linear's
    #: default) or "keras" (Keras Dense's default: glorot-uniform kernel, zero bias)
    head_init: Literal["torch", "keras"] = "torch"
    #: in eval mode (validation, test, predict, serve, export) the output is the mean of the
    #: outputs for the image and its mirror image: one more forward pass per face
    flip_average: bool = False
    #: output coral / corn: learning-rate multiplier of the ordinal thresholds (the last layer's 100
    #: biases; ``fairage.models.heads.scale_bias_lr``). Adam moves a parameter by about ``lr`` a step, and
    #: CORAL can narrow its age distribution only by spacing its thresholds apart: at 1 (the papers',
    #: every parameter at the stage's rate) they stay at their start (measured, docs/training.md)
    ordinal_bias_lr: float = Field(100.0, gt=0)
    #: output corn: start the 100 tasks' weight vectors equal (one random row copied): the tasks start
    #: rank-consistent like CORAL's and their gradients on the features add up instead of cancelling
    #: (random rows: the first epochs barely learn, measured); False = torch's init of every row
    corn_shared_init: bool = True

    @model_validator(mode="before")
    @classmethod
    def _timm_input_norm(cls, data: Any) -> Any:
        # a timm model's input convention is in its pretrained config (mean/std differ between models)
        if (
            isinstance(data, dict)
            and str(data.get("backbone", "")).startswith(TIMM_PREFIX)
            and "input_norm" not in data
        ):
            data = {**data, "input_norm": "pretrained"}
        return data

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        name = timm_name(value)
        if name is None:
            known = (*TORCHVISION_BACKBONES, "vggface2_resnet50")
            if value not in known:
                raise ValueError(f"'{value}' is not one of {', '.join(known)} or timm/<name> (a timm model)")
            return value
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            hint = f" (did you mean 'timm/{close[0]}'?)" if close else ""
            raise ValueError(f"'{name}' is not a timm model{hint}; timm.list_models() lists them")
        return value

    @model_validator(mode="after")
    def _weights_fit_backbone(self) -> ModelConfig:
        timm = timm_name(self.backbone) is not None
        if self.weights == "pretrained" and not timm:
            raise ValueError(
                f"model.weights 'pretrained' needs a timm backbone (timm/<name>), not '{self.backbone}'; "
                f"for {', '.join(TORCHVISION_BACKBONES)} use model.weights: imagenet"
            )
        if self.weights == "imagenet" and self.backbone not in TORCHVISION_BACKBONES:
            raise ValueError(
                f"model.weights 'imagenet' needs a torchvision backbone ({', '.join(TORCHVISION_BACKBONES)}), "
                f"not '{self.backbone}'" + ("; for timm models use model.weights: pretrained" if timm else "")
            )
        if self.input_norm == "pretrained" and not timm:
            raise ValueError(
                f"model.input_norm 'pretrained' reads a timm model's pretrained config; backbone "
                f"'{self.backbone}' has none (use imagenet, vggface2 or caffe)"
            )
        return self

    @model_validator(mode="after")
    def _vggface2_has_dim_proj(self) -> ModelConfig:
        if self.backbone == "vggface2_resnet50" and self.projection_dim is None:
            raise ValueError(
                "backbone vggface2_resnet50 includes its dim_proj layer: projection_dim must be set "
                "(512 for the VGGFace2 weights)"
            )
        return self


#: each head's default training loss, used when a stage does not set ``loss``
HEAD_LOSS: dict[str, str] = {"sigmoid": "mse", "linear": "mse", "dex": "ce", "coral": "coral", "corn": "corn"}
#: the losses each head trains with (the regression losses fit the two regression heads)
HEAD_LOSSES: dict[str, tuple[str, ...]] = {
    "sigmoid": ("mse", "mae", "huber", "bmc"),
    "linear": ("mse", "mae", "huber", "bmc"),
    "dex": ("ce",),
    "coral": ("coral",),
    "corn": ("corn",),
}


def loss_conflict(stage_name: str, loss: str, output: str) -> str | None:
    """One line naming both keys when ``stage_name``'s loss cannot train ``model.output``, else None."""
    if loss in HEAD_LOSSES[output]:
        return None
    fits = [head for head, losses in HEAD_LOSSES.items() if loss in losses]
    return (
        f"{stage_name}.loss '{loss}' does not fit model.output '{output}': the {output} head trains with loss "
        f"{' or '.join(HEAD_LOSSES[output])}, and loss {loss} needs output {' or '.join(fits)} "
        f"(leave {stage_name}.loss unset and it follows the head)"
    )


class DataConfig(StrictModel):
    image_size: int = Field(224, ge=8, le=MAX_IMAGE_SIZE)
    layout: Literal["appa", "npy", "utkface", "csv"] | None = None
    target: Literal["apparent", "real"] = "apparent"
    full_images: bool = False
    #: decoded-image cache folder; None = ``<data>/.fairage_cache``
    cache_dir: Path | None = None
    num_workers: int = Field(0, ge=0, le=MAX_NUM_WORKERS)
    #: drop faces whose image is missing or cannot be decoded (listed in a warning) instead of failing
    skip_bad: bool = False
    #: attribute values outside the vocabulary: error, keep, unknown, or a mapping such as
    #: ``indian=asian,others=unknown`` (text) or ``{indian: asian, others: unknown}``
    extra_categories: str | dict[str, str] = "keep"
    #: csv layout: accept absolute image paths (otherwise every path stays inside the dataset folder)
    allow_absolute_paths: bool = False

    @field_validator("extra_categories")
    @classmethod
    def _known_extra_categories(cls, value):
        from ..data.loaders import parse_extra_categories
        from ..errors import DataError

        try:
            return parse_extra_categories(value)
        except DataError as err:
            raise ValueError(str(err)) from None

    def loader_options(self) -> dict[str, Any]:
        """Keyword arguments of ``fairage.data.load_faces`` that this section sets."""
        return {
            "layout": self.layout,
            "target": self.target,
            "full_images": self.full_images,
            "extra_categories": self.extra_categories,
            "skip_bad": self.skip_bad,
            "allow_absolute_paths": self.allow_absolute_paths,
        }


#: MLflow tracking URI schemes ``trainer.tracking_uri`` takes (MLflow's own stores and servers)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def normalize_tracking_uri(uri: str) -> str:
    """Check an MLflow tracking URI; a relative ``sqlite:///x.db`` or ``file:x`` is made absolute (cwd).

    ValueError (the message names the URI) for an empty URI, spaces or control characters, an
    unknown scheme, a server URL without a host, or a plain path (MLflow would read it as a file store).

    >>> normalize_tracking_uri("http://127.0.0.1:5000")
    'http://127.0.0.1:5000'
    >>> normalize_tracking_uri("sqlite:////data/mlflow.db")
    'sqlite:////data/mlflow.db'
    """
    from urllib.parse import urlsplit

    text = str(uri)
    if not text.strip() or any(c.isspace() or ord(c) < 32 for c in text):
        raise ValueError(f"tracking URI {clip(text)!r}: empty, or holds spaces or control characters")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", text)
    scheme = match.group(1).lower() if match else None
    if scheme is None or len(scheme) == 1:  # "C:\..." is a path, not a scheme
        raise ValueError(
            f"tracking URI {clip(text)!r} is not a URL; give e.g. http://HOST:5000 or sqlite:////abs/path/mlflow.db"
        )
    base = scheme.split("+")[0]  # postgresql+psycopg2, mysql+pymysql
    if base not in TRACKING_SCHEMES:
        raise ValueError(
            f"tracking URI {clip(text)!r}: unknown scheme '{scheme}'; use one of {', '.join(TRACKING_SCHEMES)}"
        )
    if base in ("http", "https") and not urlsplit(text).hostname:
        raise ValueError(f"tracking URI {clip(text)!r}: no host (e.g. http://127.0.0.1:5000)")
    if base == "sqlite":
        path = text[len("sqlite:///") :] if text.startswith("sqlite:///") else None
        if not path:
            raise ValueError(
                f"tracking URI {clip(text)!r}: a SQLite URI is sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        if not path.startswith("/"):
            text = f"sqlite:///{Path(path).resolve()}"
    elif base == "file":
        path = text[len("file://") :] if text.startswith("file://") else text[len("file:") :]
        if not path:
            raise ValueError(f"tracking URI {clip(text)!r}: no folder")
        if not path.startswith("/"):
            text = Path(path).resolve().as_uri()
    return text


class TrainerConfig(StrictModel):
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    #: "auto": bf16-mixed where bf16 is native (bf16 GPUs, CPUs with AVX512-BF16/AMX), else 32-true
    precision: str = "auto"
    #: NHWC images and weights: oneDNN's and cuDNN's faster convolution layout, in float32 and bf16
    channels_last: bool = True
    deterministic: bool = False
    #: Lightning logger of the epoch metrics, written inside the run folder under ``logs/``:
    #: "csv" (CSVLogger), "tensorboard" (TensorBoardLogger; ``tensorboard --logdir RUN/logs``),
    #: "mlflow" (MLFlowLogger; one MLflow run per stage) or "none"
    logger: Literal["none", "csv", "tensorboard", "mlflow"] = "none"
    #: MLflow tracking URI (``http://host:5000``, ``sqlite:////abs/mlflow.db``, ...); None: the run
    #: folder's own store ``sqlite:///RUN/logs/mlflow.db``. Relative sqlite/file paths are made absolute.
    tracking_uri: str | None = None
    #: MLflow experiment the runs go to; None: "fairage" (``fairage tune``: the study's name)
    experiment_name: str | None = Field(None, min_length=1, max_length=500)
    #: extra MLflow tags of every run (``fairage tune`` adds ``fairage.study`` and ``fairage.trial``)
    tracking_tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("tracking_uri")
    @classmethod
    def _known_tracking_uri(cls, value):
        return None if value is None else normalize_tracking_uri(value)

    @field_validator("tracking_tags", mode="before")
    @classmethod
    def _tag_text(cls, value):
        # "--set trainer.tracking_tags.trial=3" arrives as the YAML integer 3
        if isinstance(value, dict):
            return {
                k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in value.items()
            }
        return value

    @model_validator(mode="after")
    def _tracking_needs_mlflow(self):
        given = [k for k in ("tracking_uri", "experiment_name") if getattr(self, k) is not None]
        given += ["tracking_tags"] if self.tracking_tags else []
        if given and self.logger != "mlflow":
            raise ValueError(
                f"{', '.join(given)} only apply to trainer.logger: mlflow (trainer.logger is '{self.logger}')"
            )
        return self

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, value):
        # "--set trainer.precision=32" arrives as the YAML integer 32
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ConformalConfig(StrictModel):
    """Conformal age intervals (``fairage.fairness.conformal``), calibrated on the validation split."""

    enabled: bool = True
    #: miscoverage: intervals aim to hold the true age for 1 - alpha of the faces
    alpha: float = Field(0.1, gt=0, lt=1)
    #: groups whose coverage is calibrated separately (``age`` = true age bins; several = their intersection)
    by: list[str] = Field(default_factory=lambda: ["age"])
    #: inner edges of the age bins of ``by: [age]``, years
    age_edges: list[float] = Field(default_factory=lambda: [20.0, 40.0, 60.0])
    #: fewest calibration faces a group needs for its own quantile (0: the fewest the level allows)
    min_group: int = Field(0, ge=0)
    #: lower the age groups' quantiles where the interval's hull over-covers (fairage.fairness.conformal.fit_calibration)
    tighten: bool = True

    @field_validator("by")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"attributes listed twice: {value}")
        return value

    @field_validator("age_edges")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(e <= 0 for e in value) or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"age edges must be positive and increasing, got {value}")
        return value


class EvalConfig(StrictModel):
    """How a prediction set is scored (``fairage.fairness.metrics.evaluate``'s arguments, one place)."""

    n_boot: int = Field(1000, ge=0, le=MAX_N_BOOT)
    #: confidence level of bootstrap intervals
    level: float = Field(0.95, gt=0, lt=1)
    #: label permutations for each bias score's p-value (0: no test)
    n_perm: int = Field(1000, ge=0, le=MAX_N_PERM)
    #: attributes with a bias score; null: age, gender, ethnicity, expression. Any column of the
    #: face table may be named (APPA-REAL's makeup and time, a csv layout's skin_tone)
    attributes: list[str] | None = None
    #: attribute combinations scored cell by cell; those whose columns the data lacks are left out
    intersections: list[list[str]] = Field(default_factory=lambda: [["age", "ethnicity"], ["gender", "ethnicity"]])
    #: groups and cells with fewer faces are flagged, and left out of worst-group MAE and group-MAE std
    min_group: int = Field(20, ge=1)
    #: k (years) of CS@k, the share of faces within k years
    cs_k: list[float] = Field(default_factory=lambda: [5.0])
    #: inner edges (years) of the MAE-by-age table, shown first: children [0,13) then the report's groups
    age_edges: list[float] = Field(default_factory=lambda: [13.0, 20.0, 40.0, 60.0])

    @field_validator("intersections")
    @classmethod
    def _two_attributes(cls, value):
        for parts in value:
            if len(set(parts)) < 2:
                raise ValueError(f"an intersection names at least two different attributes, got {parts}")
        return value

    def metric_settings(self, seed: int, columns=None) -> dict[str, Any]:
        """Keyword arguments of ``fairage.fairness.metrics.evaluate`` (``seed``: the run's seed).

        ``columns``: the scored table's columns; intersections naming a column it lacks are left out.
        """
        intersections = [
            list(p) for p in self.intersections if columns is None or all(a == "age" or a in columns for a in p)
        ]
        return {
            "n_boot": self.n_boot,
            "level": self.level,
            "n_perm": self.n_perm,
            "seed": seed,
            "attributes": None if self.attributes is None else list(self.attributes),
            "intersections": intersections,
            "min_group": self.min_group,
            "cs_k": list(self.cs_k),
            "age_bin_edges": list(self.age_edges),
        }

    #: conformal age intervals with per-group coverage
    conformal: ConformalConfig = Field(default_factory=ConformalConfig)


class ExperimentConfig(StrictModel):
    name: str = "experiment"
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and Lightning's seed range
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    stage1: StageConfig | None = None
    stage2: StageConfig | None = None
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _at_least_one_stage(self) -> ExperimentConfig:
        if self.stage1 is None and self.stage2 is None:
            raise ValueError("a config needs at least one of stage1 (head only) and stage2 (all layers)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _loss_follows_head(cls, data: Any) -> Any:
        # a stage that does not set its loss trains with its head's (output dex -> ce, ...)
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        output = model.get("output") if isinstance(model, dict) else getattr(model, "output", None)
        if output not in HEAD_LOSS:
            return data  # the default head, or a bad value the field's own check reports
        data = dict(data)
        for name in ("stage1", "stage2"):
            stage = data.get(name)
            if isinstance(stage, dict) and "loss" not in stage:
                data[name] = {**stage, "loss": HEAD_LOSS[output]}
            elif isinstance(stage, StageConfig) and "loss" not in stage.model_fields_set:
                data[name] = stage.model_copy(update={"loss": HEAD_LOSS[output]})
        return data

    @model_validator(mode="after")
    def _loss_fits_output(self) -> ExperimentConfig:
        for name, stage in self.stages():
            conflict = loss_conflict(name, stage.loss, self.model.output)
            if conflict:
                raise ValueError(conflict)
        return self

    @property
    def strategy(self) -> str:
        """Human description of the training strategy."""
        if self.stage1 and self.stage2:
            return "stage I (head) + stage II (all layers)"
        if self.stage1:
            return "stage I only (backbone frozen)"
        return "single stage (all layers)"

    def stages(self) -> list[tuple[str, StageConfig]]:
        """The configured stages in order, as (name, config): name is "stage1"/"stage2"."""
        return [(n, s) for n, s in (("stage1", self.stage1), ("stage2", self.stage2)) if s is not None]


# --------------------------------------------------------------------------- bounded YAML

#: the longest piece of a user's value a message quotes
MAX_QUOTED = 200


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters (with how much was left out), for messages."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` within ``model`` (best effort)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = _model_in(ann)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def _allowed_range(model: type[BaseModel], loc: tuple) -> str:
    """``"; allowed: 8 <= value <= 1024"`` for the numeric field at ``loc`` (best effort, else "")."""
    import annotated_types as at

    current: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            break
        info = fields[part]
        current = _model_in(info.annotation)
    if info is None:
        return ""
    low = high = ""
    for m in info.metadata:
        if isinstance(m, at.Ge):
            low = f"{m.ge} <= "
        elif isinstance(m, at.Gt):
            low = f"{m.gt} < "
        elif isinstance(m, at.Le):
            high = f" <= {m.le}"
        elif isinstance(m, at.Lt):
            high = f" < {m.lt}"
    return f"; allowed: {low}value{high}" if low or high else "; allowed: a finite number"


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = ExperimentConfig) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, loc)
            hint = ""
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            lines.append(f"  unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # a check across keys: its message names them; the input would be a whole section
            message = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"  {message}" if not loc or message.startswith(f"{key}.") else f"  {key}: {message}")
        else:
            allowed = _allowed_range(model, loc) if e["type"] in _RANGE_ERRORS else ""
            lines.append(f"  {key}: {e['msg']}{allowed} (got {clip(repr(e.get('input')))})")
    return "\n".join(lines)


def validate_config(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain dict into an ExperimentConfig, raising ConfigError with clear text."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


# --------------------------------------------------------------------------- overrides

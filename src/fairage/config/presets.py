"""The shipped presets (YAML in ``config/yaml/``) and the scales (``apply_scale``, ``load_preset``)."""

from __future__ import annotations

import copy
import difflib
from importlib import resources

import yaml

from ..errors import ConfigError
from .files import apply_overrides
from .schema import ExperimentConfig, validate_config


def _preset_dir():
    return resources.files("fairage.config") / "yaml"


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description; each base preset before its variants (M4, M4-48)."""
    out = {}
    for entry in sorted(_preset_dir().iterdir(), key=lambda p: (p.stem.split("-")[0], p.stem)):
        if entry.name.endswith(".yaml"):
            raw = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            out[entry.name[: -len(".yaml")]] = (
                str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
            )
    return out


def preset_raw(name: str) -> dict:
    # only names of the shipped list: a name is never turned into a path of its own
    names = list(list_presets())
    entry = _preset_dir() / f"{name}.yaml"
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; available: {', '.join(names)}")
    return yaml.safe_load(entry.read_text(encoding="utf-8")) or {}


SCALES = ("full", "cpu", "tiny")
#: preset keys that only apply at scale "full" (the kit's VGGFace2 network and Keras defaults)
_FULL_SCALE_MODEL_KEYS = ("input_norm", "head_init")
_FULL_SCALE_STAGE_KEYS = ("trainable", "adam_eps", "lr_factor", "min_lr", "lr_min_delta")


def full_scale_warning(cfg: ExperimentConfig, scale: str) -> str | None:
    """A warning when a ``full``-scale preset has no pretrained weights (``model.weights``), else None.

    The report's numbers start from the kit's VGGFace2 ResNet50 weights; without them the
    network trains from random initialisation and its numbers are not the report's setting.
    """
    if scale != "full" or cfg.model.weights is not None or cfg.model.backbone != "vggface2_resnet50":
        return None
    return (
        "scale full reproduces the report's setting, which starts from the VGGFace2 ResNet50 weights "
        "(the course kit's weights.h5); model.weights is not set, so this run starts from random "
        "initialisation and its numbers are not comparable with the report's. Import the weights with "
        "`fairage import-keras weights.h5 --out models/vggface2` and add --set model.weights=models/vggface2"
    )


def apply_scale(raw: dict, scale: str) -> dict:
    """Return a copy of a raw preset dict adapted to ``scale``.

    ``full``: as written (the kit's VGGFace2 ResNet50 and schedules). ``cpu``: resnet18 at
    80 px with ImageNet input, torch defaults (init, Adam epsilon, plateau schedule) and a
    frozen projection in stage I, fewer epochs, smaller patience, so the M1..M5 suite runs in
    minutes on a laptop. ``tiny``: the same for tests (32 px, one or two epochs,
    200-resample bootstrap).
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; choose one of {', '.join(SCALES)}")
    raw = copy.deepcopy(raw)
    if scale == "full":
        return raw
    model = raw.setdefault("model", {})
    raw.setdefault("data", {})
    raw.setdefault("eval", {})
    model["backbone"] = "resnet18"
    # the kit's settings that belong to its VGGFace2 network and Keras (input convention, Keras
    # init and Adam epsilon, dim_proj training in stage I, the authors' plateau schedule) give way
    # to the defaults the small scales were tuned with: the demo's table depends on them
    for key in _FULL_SCALE_MODEL_KEYS:
        model.pop(key, None)
    for name in ("stage1", "stage2"):
        if isinstance(raw.get(name), dict):
            for key in _FULL_SCALE_STAGE_KEYS:
                raw[name].pop(key, None)
    stage_set, stage1_set, lr_floor = _cpu_scale(raw) if scale == "cpu" else _tiny_scale(raw)
    for name, extra in (("stage1", stage1_set), ("stage2", stage_set)):
        st = raw.get(name)
        if isinstance(st, dict):
            st.update(extra)
            st["lr"] = max(float(st.get("lr", 1e-5)), lr_floor)
    return raw


def _cpu_scale(raw: dict) -> tuple[dict, dict, float]:
    """``--scale cpu``'s model, data and stage II settings, set in ``raw`` in place; returns the stage
    settings of stage II and stage I and the smallest learning rate."""
    model, data = raw["model"], raw["data"]
    # Measured on 2 CPU cores (fairage demo, 1200 training faces at 64 px): an
    # all-layers resnet18 epoch costs ~8-10 s; stage I trains on cached features (~1 s/epoch),
    # so it can afford 40 epochs. Random-init backbones barely move at the report's 1e-5;
    # Adam at 1e-3 learns. On real faces (UTKFace, docs/training.md) the all-layers stage
    # needs more: up to 20 epochs with flips and small shifts (8 epochs without them stop
    # near 7.9 years), a one-epoch warm-up and gradient clipping, without which stage II
    # of a two-stage preset can saturate the sigmoid output in its first epoch and never
    # recover (the head meets a backbone whose BatchNorm statistics suddenly move).
    # The all-layers stage runs a budget of 100,000 training images (14 epochs of 7,000 faces,
    # about 12 minutes at ~140 images/s on 2 cores; fewer epochs on a larger set) under a per-step
    # cosine schedule, which spends its last epochs at small steps where the plateau schedule
    # waited for a stall; early stopping is off within that budget (the best epoch is kept).
    # Unweighted regression heads train with L1, the metric itself (_regression_loss_at_scale).
    # averaging each face with its mirror image at evaluation: -0.12 to -0.16 years of test MAE
    # for M1 on UTKFace (docs/training.md), for one more forward pass per face
    model["flip_average"] = True
    # 80 px: M1 on UTKFace 5.81 test MAE against 6.13 at 64 px, for ~1.45x the time per image
    # (which the batched shift augmentation had freed: an idle 2-core epoch of 7,000 faces
    # went from 49 s to ~27 s at 64 px)
    data["image_size"] = 80
    stage_set = {
        "max_epochs": 20,
        "max_images": 100_000,
        "patience": 20,
        "lr_patience": 3,
        "batch_size": 64,
        "warmup_epochs": 1.0,
        "grad_clip": 1.0,
        "lr_schedule": "cosine",
    }
    stage1_set = {"max_epochs": 40, "patience": 6, "lr_patience": 3, "batch_size": 64}
    lr_floor = 1e-3  # random-init backbones on CPU need a larger step than 1e-5
    stage2 = raw.get("stage2")
    if isinstance(stage2, dict) and not (stage2.get("augment") or {}).get("enabled"):
        stage2["augment"] = {
            "enabled": True,
            "mode": "random",
            "hflip": 0.5,
            "translate": 0.05,
            "brightness": 0.1,
            "contrast": 0.1,
            "blur_sigma": 0.0,
        }
    return stage_set, stage1_set, lr_floor


def _tiny_scale(raw: dict) -> tuple[dict, dict, float]:
    """``--scale tiny``'s data and eval settings, set in ``raw`` in place; returns the stage settings
    of stage II and stage I and the smallest learning rate."""
    data, ev = raw["data"], raw["eval"]
    data["image_size"] = 32
    stage_set = {"max_epochs": 2, "patience": 2, "lr_patience": 1, "batch_size": 16}
    stage1_set = dict(stage_set)
    lr_floor = 1e-3
    ev["n_boot"] = 200
    ev["n_perm"] = 200
    return stage_set, stage1_set, lr_floor


def _weighs_faces(stage: dict) -> bool:
    """Whether a raw stage config weights its faces' losses (a weighting scheme, LDS or group DRO)."""
    weighting = stage.get("weighting") or {}
    dro = stage.get("dro") or {}
    return weighting.get("scheme", "none") != "none" or bool(weighting.get("lds")) or bool(dro.get("enabled"))


def _regression_loss_at_scale(raw: dict, scale: str) -> dict:
    """``--scale cpu``: stage II of a regression head trains with L1 unless its loss is set or the
    stage weights its faces. Applied after the overrides, so ``--set model.output=dex`` alone still
    leaves the loss to the head.

    A weighted stage keeps the head's mean-squared loss: weights fitted to a squared error move a
    face's prediction towards its group's in proportion to the weight, but under L1 the optimum is a
    weighted median, which jumps a whole age band towards its up-weighted neighbour (on real faces
    M5's L1 run nearly doubled the error of faces aged 60+, see docs/training.md)."""
    stage2 = raw.get("stage2")
    output = (raw.get("model") or {}).get("output", "sigmoid")
    if (
        scale == "cpu"
        and isinstance(stage2, dict)
        and "loss" not in stage2
        and output in ("sigmoid", "linear")
        and not _weighs_faces(stage2)
    ):
        stage2["loss"] = "mae"
    return raw


def load_preset(name: str, scale: str = "full", overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a shipped preset, adapted to ``scale`` and with overrides applied."""
    raw = _regression_loss_at_scale(apply_overrides(apply_scale(preset_raw(name), scale), overrides), scale)
    return validate_config(raw, f"preset {name} (scale {scale})")

"""Shipped presets: all validate at every scale and say what the issue says they are."""

from __future__ import annotations

import pytest
import yaml

from fairage.config.files import dump_config
from fairage.config.presets import SCALES, list_presets, load_preset
from fairage.config.schema import validate_config
from fairage.errors import ConfigError

KIT_HEAD = [(128, 0.0), (32, 0.0)]
DEEP_HEAD = [(256, 0.1), (128, 0.1), (64, 0.05), (32, 0.05)]
# preset -> (head, stage1 weighting or None if no stage1, stage2 weighting or None if no stage2)
# a weighting is (scheme, lds, mode); ("none", False, "loss") means unweighted
UNWEIGHTED = ("none", False, "loss")
EXPECTED = {
    "M1": (KIT_HEAD, None, UNWEIGHTED),
    "M2": (KIT_HEAD, ("age", False, "loss"), None),
    "M3": (KIT_HEAD, UNWEIGHTED, ("age", False, "loss")),
    "M4": (KIT_HEAD, ("age_ethnicity", False, "loss"), None),
    "M5": (DEEP_HEAD, UNWEIGHTED, ("age_ethnicity", False, "loss")),
    "M4-48": (KIT_HEAD, ("age_ethnicity_expression", False, "loss"), None),
    "M5-48": (DEEP_HEAD, UNWEIGHTED, ("age_ethnicity_expression", False, "loss")),
    "M5-lds": (DEEP_HEAD, UNWEIGHTED, ("age_ethnicity", True, "loss")),
    "M5-sampler": (DEEP_HEAD, UNWEIGHTED, ("age_ethnicity", False, "sampler")),
    "M5-dro": (DEEP_HEAD, UNWEIGHTED, UNWEIGHTED),
    "M5-bmc": (DEEP_HEAD, UNWEIGHTED, ("age_ethnicity", False, "loss")),
    "M5-std": (DEEP_HEAD, UNWEIGHTED, ("age_ethnicity", False, "loss")),
    "M5-dex": (DEEP_HEAD, ("none", False, "loss"), ("age_ethnicity", False, "loss")),
    "M5-coral": (DEEP_HEAD, ("none", False, "loss"), ("age_ethnicity", False, "loss")),
    "M5-corn": (DEEP_HEAD, ("none", False, "loss"), ("age_ethnicity", False, "loss")),
}
#: presets whose stages train with another loss than MSE: (stage1 loss, stage2 loss)
LOSSES = {"M5-bmc": ("mse", "bmc"), "M5-dex": ("ce", "ce"), "M5-coral": ("coral", "coral"), "M5-corn": ("corn", "corn")}
#: presets with another head than the kit's sigmoid
OUTPUTS = {"M5-dex": "dex", "M5-coral": "coral", "M5-corn": "corn"}


def test_every_preset_is_listed_with_a_one_line_description():
    listed = list_presets()
    assert set(listed) == set(EXPECTED)
    for name, line in listed.items():
        assert line and "\n" not in line and len(line) <= 100, name


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_validates_and_round_trips(name, scale):
    cfg = load_preset(name, scale)
    assert cfg.name == name
    again = validate_config(yaml.safe_load(dump_config(cfg)), "round trip")
    assert again == cfg


# the kit's schedules (stage I) and the authors' (stage II), worked out from the kit and the report:
# (lr, batch, max_epochs, patience, lr_factor, lr_patience, min_lr, adam_eps, loss, lr_min_delta)
KIT_STAGE1 = (1e-5, 32, 50, 5, 0.1, 10, 1e-7, 1e-7, "mse", None)
AUTHORS_STAGE2 = (1e-5, 16, 50, 20, 0.1, 6, 1e-6, 1e-7, "mse", 1e-4)


def _schedule(st):
    return (
        st.lr,
        st.batch_size,
        st.max_epochs,
        st.patience,
        st.lr_factor,
        st.lr_patience,
        st.min_lr,
        st.adam_eps,
        st.loss,
        st.lr_min_delta,
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_scale_is_the_kit_and_report_setting(name):
    head, w1, w2 = EXPECTED[name]
    cfg = load_preset(name, "full")
    m = cfg.model
    assert (m.backbone, m.projection_dim, m.input_norm, m.head_init, m.output) == (
        "vggface2_resnet50",
        512,
        "vggface2",
        "keras",
        OUTPUTS.get(name, "sigmoid"),
    )
    assert m.weights is None  # the user's own weights.h5, imported
    assert cfg.data.image_size == 224
    assert [(b.units, b.dropout) for b in m.head] == head
    for k, (stage, want, schedule) in enumerate((("stage1", w1, KIT_STAGE1), ("stage2", w2, AUTHORS_STAGE2))):
        st = getattr(cfg, stage)
        if want is None:
            assert st is None
            continue
        loss = LOSSES.get(name, ("mse", "mse"))[k]  # the methods' presets change only the loss
        assert _schedule(st) == schedule[:8] + (loss,) + schedule[9:]
        if stage == "stage1":
            assert st.trainable == "projection+head"  # the kit trains dim_proj with the head
        w = st.weighting
        assert (w.scheme, w.lds, w.mode) == want
        assert w.formula == "inverse"
        # the authors' 48-group counts start at 1, their 4- and 10-group counts at 0
        assert w.pseudo_count == (1.0 if w.scheme == "age_ethnicity_expression" else 0.0)


def test_every_full_scale_value_says_where_it_comes_from():
    from importlib import resources

    for name in EXPECTED:
        text = (resources.files("fairage.config") / "yaml" / f"{name}.yaml").read_text()
        body = text[text.index("\nmodel:") :]
        for line in body.splitlines():
            if ":" in line and not line.rstrip().endswith(":") and not line.lstrip().startswith("#"):
                assert "#" in line, f"{name}: {line.strip()!r} has no comment saying where it comes from"


# today's cpu/tiny settings (the demo's table depends on them), per stage:
# (lr, batch, max_epochs, patience, lr_factor, lr_patience, min_lr, adam_eps, loss, lr_min_delta)
SMALL_SCALES = {
    "cpu": (
        80,
        {
            "stage1": (1e-3, 64, 40, 6, 0.1, 3, 1e-7, 1e-8, "mse", None),
            "stage2": (1e-3, 64, 20, 20, 0.1, 3, 1e-7, 1e-8, "mae", None),
        },
    ),
    "tiny": (
        32,
        {
            "stage1": (1e-3, 16, 2, 2, 0.1, 1, 1e-7, 1e-8, "mse", None),
            "stage2": (1e-3, 16, 2, 2, 0.1, 1, 1e-7, 1e-8, "mse", None),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("scale", sorted(SMALL_SCALES))
def test_cpu_and_tiny_scales_keep_their_torchvision_settings(name, scale):
    full = load_preset(name, "full")
    size, schedules = SMALL_SCALES[scale]
    cfg = load_preset(name, scale)
    m = cfg.model
    assert (m.backbone, m.input_norm, m.head_init, m.projection_dim) == ("resnet18", "imagenet", "torch", 512)
    assert cfg.data.image_size == size
    assert m.head == full.model.head
    for stage in ("stage1", "stage2"):
        a, b = getattr(full, stage), getattr(cfg, stage)
        assert (a is None) == (b is None)
        if b is not None:
            assert b.weighting == a.weighting
            assert b.trainable == "head"
            # the methods' presets change only the loss; elsewhere the scale's own loss, except that
            # cpu's L1 in stage II gives way to the head's mse where the stage weights its faces
            loss = LOSSES[name][stage == "stage2"] if name in LOSSES else schedules[stage][8]
            weighted = a.weighting.scheme != "none" or a.weighting.lds or a.dro.enabled
            if loss == "mae" and weighted:
                loss = "mse"
            assert _schedule(b) == schedules[stage][:8] + (loss,) + schedules[stage][9:]
            # cpu's all-layers stage: a cosine schedule over a budget of 100,000 images
            cosine = scale == "cpu" and stage == "stage2"
            assert (b.lr_schedule, b.max_images) == (("cosine", 100_000) if cosine else ("plateau", None))


def test_demo_settings_unchanged():
    from fairage.workflows.suite import REPORT_PRESETS, suite_configs

    for name, cfg in suite_configs(REPORT_PRESETS, "cpu"):
        assert cfg.model.backbone == "resnet18" and cfg.model.input_norm == "imagenet", name
        assert all(st.trainable == "head" and st.adam_eps == 1e-8 for _, st in cfg.stages()), name


def test_full_scale_without_weights_warns_how_to_import():
    from fairage.config.presets import full_scale_warning

    message = full_scale_warning(load_preset("M3", "full"), "full")
    assert "VGGFace2" in message and "fairage import-keras" in message and "model.weights" in message
    assert full_scale_warning(load_preset("M3", "full", ["model.weights=models/vggface2"]), "full") is None
    assert full_scale_warning(load_preset("M3", "cpu"), "cpu") is None


def test_overrides_apply_after_the_scale():
    cfg = load_preset("M3", "cpu", ["stage2.lr=5e-5", "seed=3"])
    assert cfg.stage2.lr == 5e-5 and cfg.seed == 3


def test_unknown_preset_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean 'M5'"):
        load_preset("M5x")


def test_cli_full_scale_without_weights_prints_the_warning(tmp_path):
    from typer.testing import CliRunner

    from fairage.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--preset",
            "M2",
            "--scale",
            "full",
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2  # the missing dataset, after the warning
    text = " ".join(result.output.split())
    assert "WARNING: scale full reproduces the report's setting" in text and "fairage import-keras" in text


def test_the_demo_keeps_64_px_while_cpu_scale_takes_80():
    from fairage.workflows.suite import DEMO_STAGE2

    assert load_preset("M1", "cpu").data.image_size == 80
    for name in ("M1", "M3", "M5"):
        assert load_preset(name, "cpu", list(DEMO_STAGE2)).data.image_size == 64


@pytest.mark.parametrize(
    ("name", "overrides", "loss"),
    [
        ("M1", [], "mae"),  # unweighted: L1
        ("M3", [], "mse"),  # 4 age-group weights
        ("M5", [], "mse"),  # the 10-group weights
        ("M5-lds", [], "mse"),  # LDS alone weights too
        ("M5-dro", [], "mse"),  # group DRO weights its groups' losses
        ("M5-sampler", [], "mse"),  # weighted draws fit a weighted median under L1 just the same
        ("M5", ["stage2.weighting.scheme=none"], "mae"),  # weights off: back to L1
        ("M5", ["stage2.loss=mae"], "mae"),  # a loss the user sets is kept
    ],
)
def test_cpu_scale_keeps_mse_where_stage_two_weights_its_faces(name, overrides, loss):
    assert load_preset(name, "cpu", overrides).stage2.loss == loss

"""Shipped presets: all validate at every scale and say what the issue says they are."""

from __future__ import annotations

import pytest

from fairage.config import SCALES, dump_config, list_presets, load_preset, validate_config
from fairage.errors import ConfigError
import yaml

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
}
#: presets whose stages train with another loss than MSE: (stage1 loss, stage2 loss)
LOSSES = {"M5-bmc": ("mse", "bmc"), "M5-dex": ("ce", "ce")}


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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_scale_is_the_report_setting(name):
    head, w1, w2 = EXPECTED[name]
    cfg = load_preset(name, "full")
    assert cfg.model.backbone == "resnet50"
    assert cfg.data.image_size == 224
    assert [(b.units, b.dropout) for b in cfg.model.head] == head
    for k, (stage, want) in enumerate((("stage1", w1), ("stage2", w2))):
        st = getattr(cfg, stage)
        if want is None:
            assert st is None
            continue
        assert (st.lr, st.loss, st.patience) == (1e-5, LOSSES.get(name, ("mse", "mse"))[k], 20)
        w = st.weighting
        assert (w.scheme, w.lds, w.mode) == want
        assert w.formula == "inverse"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cpu_and_tiny_scales_shrink_the_model_only(name):
    full = load_preset(name, "full")
    for scale, size in (("cpu", 64), ("tiny", 32)):
        cfg = load_preset(name, scale)
        assert cfg.model.backbone == "resnet18"
        assert cfg.data.image_size == size
        assert cfg.model.head == full.model.head
        for stage in ("stage1", "stage2"):
            a, b = getattr(full, stage), getattr(cfg, stage)
            assert (a is None) == (b is None)
            if b is not None:
                assert b.weighting == a.weighting
                assert b.max_epochs <= a.max_epochs and b.patience <= a.patience


def test_overrides_apply_after_the_scale():
    cfg = load_preset("M3", "cpu", ["stage2.lr=5e-5", "seed=3"])
    assert cfg.stage2.lr == 5e-5 and cfg.seed == 3


def test_unknown_preset_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean 'M5'"):
        load_preset("M5x")

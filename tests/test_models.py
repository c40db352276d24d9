"""fairage.models: backbone + projection + head, weights from local files only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18

from fairage.config.schema import HeadBlock, ModelConfig
from fairage.errors import ConfigError
from fairage.models.regressor import build_model, load_weights

M5_HEAD = [
    HeadBlock(dropout=0.1, units=256),
    HeadBlock(dropout=0.1, units=128),
    HeadBlock(dropout=0.05, units=64),
    HeadBlock(dropout=0.05, units=32),
]


def tiny_cfg(**kw) -> ModelConfig:
    base = {"backbone": "resnet18", "projection_dim": 16, "head": [HeadBlock(units=8)], "output": "sigmoid"}
    base.update(kw)
    return ModelConfig(**base)


def test_m5_head_is_expressible():
    model, info = build_model(ModelConfig(backbone="resnet18", projection_dim=512, head=M5_HEAD))
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 128), (128, 64), (64, 32), (32, 1)]
    assert [m.p for m in model.head if isinstance(m, nn.Dropout)] == [0.1, 0.1, 0.05, 0.05]
    assert sum(isinstance(m, nn.ReLU) for m in model.head) == 4
    assert model.projection.in_features == 512 and model.projection.out_features == 512  # resnet18 pools 512-d
    assert info == {"weights_loaded": False}


def test_resnet50_backbone_and_no_projection():
    model, _ = build_model(ModelConfig(backbone="resnet50", projection_dim=None, head=[HeadBlock(units=4)]))
    assert isinstance(model.projection, nn.Identity)
    assert model.feature_dim == 2048
    assert model.head[0].in_features == 2048


def test_outputs_in_label_units():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    sig, _ = build_model(tiny_cfg(output="sigmoid"))
    sig.eval()
    out = sig(x)
    assert out.shape == (3,)
    assert bool(((out > 0) & (out < 1)).all())
    torch.testing.assert_close(sig.years(out), out * 100)
    lin, _ = build_model(tiny_cfg(output="linear"))
    lin.eval()
    torch.testing.assert_close(lin.years(lin(x)), lin.head(lin.features(x)).squeeze(-1))


def test_reported_ages_are_clamped_into_0_150_years():
    import numpy as np

    from fairage.training import predict

    lin, _ = build_model(tiny_cfg(output="linear"))
    lin.eval()
    scale = lin.label_scale
    raw = torch.tensor([-0.5, 0.0, 0.2, 1.0, 4.0]) * (100.0 / scale)  # -50, 0, 20, 100, 400 years
    torch.testing.assert_close(lin.years(raw), torch.tensor([-50.0, 0.0, 20.0, 100.0, 400.0]))
    torch.testing.assert_close(lin.ages(raw), torch.tensor([0.0, 0.0, 20.0, 100.0, 150.0]))
    # a head whose last layer answers -3 years for every face: the predictions say 0, training's years -3
    last = lin.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-3.0 / scale)
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    assert predict(lin, images).tolist() == [0.0] * 4
    x = torch.zeros(4, 3, 32, 32)
    torch.testing.assert_close(lin.years(lin(x)), torch.full((4,), -3.0))


def test_torchvision_backbone_state_dict_loads(tmp_path):
    torch.manual_seed(1)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model, info = build_model(tiny_cfg(weights=path))
    for name, value in reference.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(model.backbone.state_dict()[name], value), name
    assert info["weights_loaded"] is True
    assert sorted(info["unexpected_keys"]) == ["fc.bias", "fc.weight"]
    # the projection and head are not in a backbone file: reported missing
    assert sorted(info["missing_keys"]) == sorted(
        ["projection.weight", "projection.bias", "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    )


def test_whole_model_safetensors_roundtrip_and_mismatch_report(tmp_path):
    torch.manual_seed(2)
    source, _ = build_model(tiny_cfg())
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "full.safetensors"))
    target, info = build_model(tiny_cfg(weights=tmp_path / "full.safetensors"))
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    x = torch.randn(2, 3, 32, 32)
    source.eval(), target.eval()
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)

    partial = dict(state)
    del partial["head.2.bias"]
    partial["head.9.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pt")
    missing, unexpected = load_weights(build_model(tiny_cfg())[0], tmp_path / "partial.pt")
    assert missing == ["head.2.bias"]
    assert unexpected == ["head.9.weight"]


def test_missing_weights_file_says_what_to_supply(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_model(tiny_cfg(weights=tmp_path / "nope.pth"))
    text = str(err.value)
    assert "model.weights" in text and "nope.pth" in text and ".safetensors" in text


def test_bad_weights_files_are_clear_errors(tmp_path):
    model = build_model(tiny_cfg())[0]
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="none of its 1 keys"):
        load_weights(model, tmp_path / "other.pth")
    bad_shape = {k: v for k, v in model.state_dict().items()}
    bad_shape["projection.weight"] = torch.zeros(5, 5)
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match="projection.weight"):
        load_weights(model, tmp_path / "shape.pth")
    # a pickled object is refused by weights_only=True, never unpickled
    torch.save({"w": torch.zeros(1), "obj": nn.Linear(1, 1)}, tmp_path / "pickled.pth")
    with pytest.raises(ConfigError, match="could not be read"):
        load_weights(model, tmp_path / "pickled.pth")
    (tmp_path / "weights.bin").write_bytes(b"xx")
    with pytest.raises(ConfigError, match="unknown file type"):
        load_weights(model, tmp_path / "weights.bin")


def test_flip_average_is_the_mean_over_the_mirror_image_in_eval_mode_only():
    import torch

    from fairage.config.schema import ModelConfig
    from fairage.models.regressor import AgeRegressor

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", projection_dim=None, head=[{"units": 8}], output="linear")
    plain = AgeRegressor(cfg).eval()
    flipped = AgeRegressor(cfg.model_copy(update={"flip_average": True})).eval()
    flipped.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 32, 32)
    mirror = torch.flip(x, dims=[3])
    with torch.no_grad():
        expected = (plain(x) + plain(mirror)) / 2
        assert torch.allclose(flipped(x), expected, atol=1e-6)
        assert torch.allclose(flipped(mirror), flipped(x), atol=1e-6)  # a face and its mirror: one age
        assert not torch.allclose(plain(mirror), plain(x), atol=1e-3)
    flipped.train()
    torch.manual_seed(1)
    a = flipped(x)
    plain.train()
    torch.manual_seed(1)
    assert torch.allclose(a, plain(x), atol=1e-6)  # training steps see one pass

"""The vggface2_resnet50 backbone reproduces the Keras layout item by item; input norms by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fairage.config.schema import ModelConfig
from fairage.errors import ConfigError
from fairage.models.backbones import InputNorm
from fairage.models.regressor import AgeRegressor
from fairage.models.vggface2 import KerasBottleneck, keras_layer_map, tf_same_padding


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AgeRegressor(ModelConfig(backbone="vggface2_resnet50", input_norm="vggface2")).eval()


def _capture(module: nn.Module, run) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def test_tf_same_padding_puts_the_extra_row_after():
    # 224 px, 7x7 stride 2: 112 outputs need (112 - 1) * 2 + 7 - 224 = 5 padding rows: 2 before, 3 after
    assert tf_same_padding(224, 7, 2) == (2, 3)
    # 225 px: 113 outputs, (113 - 1) * 2 + 7 - 225 = 6 -> 3 and 3
    assert tf_same_padding(225, 7, 2) == (3, 3)
    assert tf_same_padding(55, 1, 2) == (0, 0)


@pytest.mark.parametrize("tap, offset", [((0, 0), -2), ((2, 2), 0), ((6, 6), 4)])
def test_stem_convolution_reads_tf_same_padded_input(model, tap, offset):
    # a one-tap kernel at (ky, kx) makes output[i, j] = input[2i + ky - 2, 2j + kx - 2] (zero outside)
    backbone = model.backbone
    saved = backbone.conv1.weight.detach().clone()
    with torch.no_grad():
        backbone.conv1.weight.zero_()
        backbone.conv1.weight[0, 0, tap[0], tap[1]] = 1.0
    x = torch.arange(224 * 224, dtype=torch.float32).view(1, 1, 224, 224).expand(1, 3, 224, 224) + 1.0
    try:
        out = _capture(backbone.conv1, lambda: backbone(x))[0, 0]
    finally:
        with torch.no_grad():
            backbone.conv1.weight.copy_(saved)
    assert out.shape == (112, 112)
    for i, j in [(0, 0), (0, 111), (111, 0), (111, 111), (50, 7)]:
        r, c = 2 * i + offset, 2 * j + offset
        expected = float(x[0, 0, r, c]) if 0 <= r < 224 and 0 <= c < 224 else 0.0
        assert float(out[i, j]) == expected, (tap, i, j)


def test_max_pool_has_no_padding_55_at_224(model):
    x = torch.rand(1, 3, 224, 224)
    pooled = _capture(model.backbone.maxpool, lambda: model(x))
    assert pooled.shape == (1, 64, 55, 55)  # (112 - 3) // 2 + 1
    assert model.backbone.maxpool.padding == 0


def test_stride_two_sits_on_the_1x1_reduce_and_proj(model):
    blocks = {name: m for name, m in model.backbone.named_children() if isinstance(m, KerasBottleneck)}
    assert len(blocks) == 16
    for name, block in blocks.items():
        stage, index = (int(p) for p in name[len("conv") :].split("_"))
        stride = 2 if stage >= 3 and index == 1 else 1
        assert block.reduce.stride == (stride, stride), name
        assert block.conv3x3.stride == (1, 1) and block.conv3x3.padding == (1, 1), name
        assert (block.proj is not None) == (index == 1), name
        if block.proj is not None:
            assert block.proj.stride == (stride, stride), name
    x = torch.rand(1, 3, 224, 224)
    assert _capture(model.backbone.conv3_1.reduce, lambda: model(x)).shape == (1, 128, 28, 28)
    assert _capture(model.backbone.conv5_3, lambda: model(x)).shape == (1, 2048, 7, 7)


def test_no_conv_bias_and_keras_batchnorm(model):
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 53
    assert all(c.bias is None for c in convs)
    assert all(b.eps == 1e-3 and b.momentum == pytest.approx(0.01) for b in bns)
    # eps 1e-3 by hand: (x - mean) / sqrt(var + 1e-3) * gamma + beta
    layer = model.backbone.bn1
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(0.001)
        layer.weight.fill_(2.0)
        layer.bias.fill_(1.0)
        out = layer.eval()(torch.full((1, 64, 1, 1), 1.5))
    layer.load_state_dict(saved)
    assert torch.allclose(out, torch.full_like(out, (1.5 - 0.5) / (0.002**0.5) * 2.0 + 1.0))


def test_pooling_gives_2048_features_and_global_average_at_other_sizes(model):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        last = _capture(model.backbone.conv5_3, lambda: model(x))
        pooled = model.pooled(x)
    assert last.shape == (2, 2048, 2, 2) and pooled.shape == (2, 2048)
    assert torch.allclose(pooled, last.mean(dim=(2, 3)), atol=1e-6)


def test_dim_proj_has_a_relu(model):
    assert isinstance(model.projection, nn.Linear) and isinstance(model.projection_act, nn.ReLU)
    pooled = torch.randn(4, 2048)
    with torch.no_grad():
        projected = model.project(pooled)
        linear = pooled @ model.projection.weight.T + model.projection.bias
    assert torch.allclose(projected, linear.clamp(min=0), atol=1e-5)
    assert bool((projected == 0).any())
    assert bool((linear < 0).any())  # the ReLU did something
    torchvision_model = AgeRegressor(ModelConfig(backbone="resnet18"))
    assert isinstance(torchvision_model.projection_act, nn.Identity)


def test_vggface2_backbone_needs_its_projection():
    with pytest.raises(Exception, match="projection_dim must be set"):
        ModelConfig(backbone="vggface2_resnet50", projection_dim=None)


def test_keras_layer_map_covers_every_parameter_once(model):
    modules = dict(model.named_modules())
    mapped = keras_layer_map()
    assert mapped["conv1/7x7_s2"] == "backbone.conv1" and mapped["conv1/7x7_s2/bn"] == "backbone.bn1"
    assert mapped["conv4_1_1x1_proj/bn"] == "backbone.conv4_1.proj_bn"
    assert all(target in modules for target in mapped.values())
    covered = {f"{target}.{name}" for target in mapped.values() for name, _ in modules[target].named_parameters()}
    own = {name for name, _ in model.named_parameters() if not name.startswith("head.")}
    assert covered == own


# RGB pixel (10, 20, 30) / 255 -> per input norm, worked out by hand
@pytest.mark.parametrize(
    "kind, expected",
    [
        ("vggface2", (30 - 91.4953, 20 - 103.8827, 10 - 131.0912)),  # BGR, 0-255, minus the VGGFace2 mean
        ("caffe", (30 - 103.939, 20 - 116.779, 10 - 123.68)),  # Keras resnet50.preprocess_input
        ("imagenet", ((10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225)),
    ],
)
def test_input_norms_by_hand(kind, expected):
    x = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1) / 255.0
    out = InputNorm(kind)(x).flatten().tolist()
    assert out == pytest.approx(expected, abs=1e-4)


def test_unknown_input_norm():
    with pytest.raises(ConfigError, match="input_norm 'bgr'"):
        InputNorm("bgr")

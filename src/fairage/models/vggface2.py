"""The VGGFace2 ResNet-50 (Keras layout) and its Keras layer-name map."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)


KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01


def _keras_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding along one axis: (before, after) pixels.

    The output has ``ceil(size / stride)`` pixels; when the total padding is odd the
    extra pixel goes *after* (bottom/right), unlike torch's symmetric padding.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasBottleneck(nn.Module):
    """One bottleneck block of the VGGFace2 Keras ResNet50 (caffe layout).

    1x1 ``reduce`` (carries the block's stride) -> 3x3 ``conv3x3`` (stride 1, padding 1)
    -> 1x1 ``increase``, each followed by its BatchNorm (``*_bn``) and, but for the last,
    a ReLU; the shortcut is the identity or, in a stage's first block, the strided 1x1
    ``proj`` + ``proj_bn``. No convolution has a bias.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, project: bool):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, width, 1, stride=stride, bias=False)
        self.reduce_bn = _keras_bn(width)
        self.conv3x3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv3x3_bn = _keras_bn(width)
        self.increase = nn.Conv2d(width, out_channels, 1, bias=False)
        self.increase_bn = _keras_bn(out_channels)
        if project:
            self.proj = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.proj_bn = _keras_bn(out_channels)
        else:
            self.proj = None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.reduce_bn(self.reduce(x)))
        y = self.relu(self.conv3x3_bn(self.conv3x3(y)))
        y = self.increase_bn(self.increase(y))
        y += x if self.proj is None else self.proj_bn(self.proj(x))  # in place: one activation less to allocate
        return self.relu(y)


class VGGFace2ResNet50(nn.Module):
    """The VGGFace2 authors' Keras ResNet50 (the course kit's ``weights.h5``), up to the pooled features.

    Input: (N, 3, S, S) already normalised (BGR, 0-255, minus the VGGFace2 mean: ``InputNorm``
    "vggface2"). Output: (N, 2048) pooled features. Layout, as Keras computes it:

    * stem ``conv1/7x7_s2``: 7x7 stride-2 convolution with TensorFlow "same" padding (at 224 px
      2 rows/columns before and 3 after) -> BN -> ReLU -> 3x3 stride-2 max-pool *without*
      padding (112 -> 55 at 224 px);
    * four stages of bottleneck blocks (3, 4, 6, 3 blocks; widths 64/256, 128/512, 256/1024,
      512/2048); stages 3-5 put their stride 2 on the 1x1 ``_1x1_reduce`` and ``_1x1_proj``
      convolutions (torchvision's ResNet50 puts it on the 3x3);
    * BatchNorm with Keras's epsilon 1e-3 and momentum 0.99 (torch momentum 0.01); no conv bias;
    * Keras ``avg_pool`` (7x7) + Flatten: at 224 px the last map is 7x7, so this is the global
      average; at other sizes this module takes the global average pool (Keras's 7x7 pool
      would leave a larger map and another flattened width).

    Module names map 1:1 to Keras layer names (``keras_layer_map``): ``conv1/7x7_s2`` ->
    ``conv1``, ``conv1/7x7_s2/bn`` -> ``bn1``; ``conv{s}_{b}_1x1_reduce`` ->
    ``conv{s}_{b}.reduce``, ``_3x3`` -> ``.conv3x3``, ``_1x1_increase`` -> ``.increase``,
    ``_1x1_proj`` -> ``.proj``, each ``.../bn`` -> the same name + ``_bn``.
    """

    #: (stage, blocks, width, out channels, stride of the first block)
    STAGES = ((2, 3, 64, 256, 1), (3, 4, 128, 512, 2), (4, 6, 256, 1024, 2), (5, 3, 512, 2048, 2))
    #: the pooled feature width (what Keras's Flatten gives at 224 px)
    out_features = 2048

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, bias=False)
        self.bn1 = _keras_bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2)
        in_channels = 64
        for stage, blocks, width, out_channels, stride in self.STAGES:
            for block in range(1, blocks + 1):
                first = block == 1
                self.add_module(
                    f"conv{stage}_{block}",
                    KerasBottleneck(in_channels, width, out_channels, stride if first else 1, project=first),
                )
                in_channels = out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def blocks(self) -> list[KerasBottleneck]:
        return [m for m in self.children() if isinstance(m, KerasBottleneck)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], 7, 2)
        left, right = tf_same_padding(x.shape[-1], 7, 2)
        x = F.pad(x, (left, right, top, bottom))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for block in self.blocks():
            x = block(x)
        return torch.flatten(self.avgpool(x), 1)


#: Keras layer-name suffix of a bottleneck part -> its module name in ``KerasBottleneck``
_KERAS_BLOCK_PARTS = {"1x1_reduce": "reduce", "3x3": "conv3x3", "1x1_increase": "increase", "1x1_proj": "proj"}


def keras_layer_map() -> dict[str, str]:
    """Keras layer name -> fairage module path (in ``AgeRegressor``) for the VGGFace2 ResNet50.

    Covers every weighted layer of the backbone and ``dim_proj`` (-> ``projection``), e.g.
    ``"conv1/7x7_s2" -> "backbone.conv1"``, ``"conv3_1_1x1_reduce/bn" -> "backbone.conv3_1.reduce_bn"``.
    """
    names = {"conv1/7x7_s2": "backbone.conv1", "conv1/7x7_s2/bn": "backbone.bn1"}
    for stage, blocks, *_ in VGGFace2ResNet50.STAGES:
        for block in range(1, blocks + 1):
            for suffix, part in _KERAS_BLOCK_PARTS.items():
                if suffix == "1x1_proj" and block != 1:
                    continue
                keras = f"conv{stage}_{block}_{suffix}"
                names[keras] = f"backbone.conv{stage}_{block}.{part}"
                names[keras + "/bn"] = f"backbone.conv{stage}_{block}.{part}_bn"
    names["dim_proj"] = "projection"
    return names

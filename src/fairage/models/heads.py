"""The MLP heads, their output kinds (label scale, widths) and the clamp into 0-150 years."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config.schema import HeadBlock
from ..store.predictions import PREDICTION_RANGE
from .losses import (
    DEX_AGES,
    ORDINAL_TASKS,
)

log = logging.getLogger(__name__)


#: label units -> years factor per output kind
LABEL_SCALE: dict[str, float] = {"sigmoid": 100.0, "linear": 1.0, "dex": 1.0, "coral": 1.0, "corn": 1.0}
#: the heads whose output is a distribution over the ages (``AgeRegressor.spread`` is defined)
DISTRIBUTION_HEADS = ("dex", "coral", "corn")
#: width of each head's last layer
HEAD_OUTPUTS: dict[str, int] = {
    "sigmoid": 1,
    "linear": 1,
    "dex": DEX_AGES,
    "coral": ORDINAL_TASKS,
    "corn": ORDINAL_TASKS,
}


def build_head(in_features: int, blocks: list[HeadBlock], outputs: int = 1, last: str = "linear") -> nn.Sequential:
    """MLP head: per block Dropout(p) -> Linear(units) -> ReLU, then Linear(outputs).

    The report's M5 head is ``blocks = [(0.1, 256), (0.1, 128), (0.05, 64), (0.05, 32)]``
    after the 512-d layer: 512 -> 256 -> 128 -> 64 -> 32 -> 1. ``last="coral"``: the last
    layer is ``coral_pytorch``'s ``CoralLayer`` (``outputs`` thresholds sharing one weight
    vector, ``outputs + 1`` classes).
    """
    layers: list[nn.Module] = []
    width = in_features
    for block in blocks:
        if block.dropout > 0:
            layers.append(nn.Dropout(block.dropout))
        layers += [nn.Linear(width, block.units), nn.ReLU(inplace=True)]
        width = block.units
    if last == "coral":
        from coral_pytorch.layers import CoralLayer

        layers.append(CoralLayer(width, outputs + 1))
    else:
        layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class _Scaled(nn.Module):
    """A parametrization: the tensor is ``factor`` times the parameter that trains."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.factor

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value / self.factor


def scale_bias_lr(layer: nn.Module, name: str, factor: float) -> None:
    """Train ``layer.<name>`` ``factor`` times faster under Adam: it becomes ``factor`` times a parameter.

    Adam's step of a parameter is about ``lr`` whatever its gradient's scale, so the tensor
    moves ``factor`` times further a step (the optimizer and its schedule are untouched). The
    state dict keeps the key ``<name>`` with the tensor's value (checkpoints, weights files and
    ONNX export are the same as without it); assigning ``layer.<name> = value`` under
    ``torch.no_grad()`` sets it. ``factor == 1`` leaves the layer alone.
    """
    if factor == 1:
        return
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(layer, name, _Scaled(factor))
    raw = f"parametrizations.{name}.original"

    def save(module, state, prefix, local_metadata):
        if isinstance(state.get(prefix + raw), nn.Parameter):
            return  # state_dict(keep_vars=True): asked for the parameters themselves (the ONNX tracer)
        state[prefix + name] = state.pop(prefix + raw) * factor

    def load(state, prefix, local_metadata, strict, missing, unexpected, errors):
        if prefix + name in state:
            state[prefix + raw] = state.pop(prefix + name) / factor

    layer._register_state_dict_hook(save)
    layer._register_load_state_dict_pre_hook(load)


def clamp_ages(years: torch.Tensor) -> torch.Tensor:
    """Predicted ages clamped into ``PREDICTION_RANGE`` (0-150 years), what the model reports."""
    low, high = PREDICTION_RANGE
    return years.clamp(low, high)

"""Pieces every model family shares: the ReLU(+Dropout) unit, standard init, argument checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def relu(dropout: float) -> nn.Module:
    """ReLU followed by the paper's Dropout baseline; parameter-free, so state_dict keys never move."""
    if dropout > 0:
        return nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
    return nn.ReLU()


class Head(nn.Module):
    """Classifier end shared by the CIFAR nets: [BN-ReLU,] global average pool, linear."""

    def __init__(self, channels: int, num_classes: int, dropout: float, pre_act: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if pre_act else None
        self.act = relu(dropout) if pre_act else None
        self.pool = nn.AdaptiveAvgPool2d(1)  # = the fixed 4x4 / 8x8 pool of 32x32 CIFAR inputs
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = self.act(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def init_weights(model: nn.Module) -> None:
    """The reference CIFAR inits: He-normal (fan_out) convs, unit/zero BN, zero linear biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def check_image_shape(
    name: str, in_channels: int, input_shape: Sequence[int] | None, min_size: int = 1
) -> None:
    """Fail at construction, not at the first batch, when an image model gets the wrong input."""
    if input_shape is None:
        return
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape for {name} must be (channels, height, width), got {shape}")
    if shape[0] != in_channels:
        raise ValueError(f"input_shape {shape} has {shape[0]} channels but in_channels={in_channels}")
    if min(shape[1:]) < min_size:
        raise ValueError(f"input_shape {shape} is too small for {name}: needs at least {min_size}px")

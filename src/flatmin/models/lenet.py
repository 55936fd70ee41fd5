"""A LeNet-style CNN for 28×28 grey images (MNIST, Fashion-MNIST, KMNIST) that a CPU can train.

Two 5×5 conv layers (padding 2) each followed by ReLU and 2×2 max-pooling, then one hidden
fully connected layer: the "2 Conv+pooling" baseline of the Fashion-MNIST benchmark table
(TensorFlow's layers tutorial). No batch norm, so AMP/SAM perturb every parameter the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flatmin.models._common import check_image_shape, relu


class LeNet(nn.Module):
    """conv5-ReLU-pool, conv5-ReLU-pool, linear-ReLU, linear; sized from the input's H×W."""

    def __init__(self, num_classes: int, in_channels: int = 1, size: tuple[int, int] = (28, 28),
                 channels: tuple[int, int] = (32, 64), hidden: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), relu(dropout), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), relu(dropout), nn.MaxPool2d(2))
        h, w = size[0] // 4, size[1] // 4
        self.fc = nn.Sequential(nn.Linear(c2 * h * w, hidden), relu(dropout),
                                nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _lenet(name: str, channels: tuple[int, int], hidden: int, num_classes: int,
           in_channels: int, dropout: float, input_shape: Sequence[int] | None) -> LeNet:
    """Shared builder: the input's H×W fixes the first linear layer's width."""
    check_image_shape(name, in_channels, input_shape, min_size=4)
    size = (28, 28) if input_shape is None else (int(input_shape[1]), int(input_shape[2]))
    return LeNet(num_classes, in_channels, size, channels, hidden, dropout)


def cnn28(num_classes: int, in_channels: int = 1, dropout: float = 0.0,
          input_shape: Sequence[int] | None = None) -> LeNet:
    """32/64 channels, 128 hidden: 454,922 parameters for 28×28×1 and 10 classes."""
    return _lenet("cnn28", (32, 64), 128, num_classes, in_channels, dropout, input_shape)


def cnn28_small(num_classes: int, in_channels: int = 1, dropout: float = 0.0,
                input_shape: Sequence[int] | None = None) -> LeNet:
    """16/32 channels, 64 hidden: 114,314 parameters; the CPU compare's model."""
    return _lenet("cnn28_small", (16, 32), 64, num_classes, in_channels, dropout, input_shape)

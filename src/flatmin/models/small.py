"""CPU-sized models for the spiral, MNIST-1D and digits runs: an MLP and the MNIST-1D CNN."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flatmin.models._common import relu


class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden size, then a linear classifier (PyTorch default init)."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), relu(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """The MNIST-1D paper's ConvNet (Greydanus 2020): 3 strided convs, no batch norm, one linear.

    Kernels 5, 3, 3 with stride 2 and padding 1 turn a length-40 signal into 25x5 features, so the
    model has 5,210 parameters for 10 classes, as in the reference `ConvBase`.
    """

    kernels = (5, 3, 3)

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        length: int = 40,
        channels: int = 25,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        convs: list[nn.Module] = []
        c, size = in_channels, length
        for k in self.kernels:
            convs += [nn.Conv1d(c, channels, k, stride=2, padding=1), relu(dropout)]
            c, size = channels, (size + 2 - k) // 2 + 1
            if size < 1:
                raise ValueError(f"input length {length} is too short for cnn1d (needs >= 3)")
        self.features = nn.Sequential(*convs)
        self.fc = nn.Linear(channels * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and self.in_channels == 1:  # (N, L) signals as the MNIST-1D arrays store them
            x = x.unsqueeze(1)
        return self.fc(torch.flatten(self.features(x), 1))


def mlp(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
    hidden: Sequence[int] = (100, 100),
) -> MLP:
    """Fully connected baseline (spiral, Fig. 6; MNIST-1D; digits); sized from input_shape."""
    del in_channels  # the flattened input_shape is all an MLP needs
    if input_shape is None:
        raise ValueError("input_shape is required for mlp (e.g. (2,), (1, 40) or (1, 8, 8))")
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive, got {hidden}")
    return MLP(math.prod(input_shape), num_classes, hidden, dropout)


def cnn1d(
    num_classes: int,
    in_channels: int = 1,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
    channels: int = 25,
) -> CNN1d:
    """Small convnet for MNIST-1D inputs, (N, 1, 40) or (N, 40); no BN so it stays CPU-cheap."""
    shape = (in_channels, 40) if input_shape is None else tuple(input_shape)
    if len(shape) == 1:
        shape = (in_channels, shape[0])
    if len(shape) != 2 or shape[0] != in_channels:
        raise ValueError(
            f"input_shape for cnn1d must be (length,) or (in_channels={in_channels}, length), "
            f"got {tuple(input_shape or ())}"
        )
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    return CNN1d(num_classes, in_channels, shape[1], channels, dropout)

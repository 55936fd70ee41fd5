"""PyramidNet (Han et al., CVPR 2017), additive widening: the paper's PyramidNet-164 (alpha=270)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from flatmin.models._common import Head, check_image_shape, init_weights, relu


class PyramidBlock(nn.Module):
    """BN-conv-BN-ReLU-...-conv-BN residual (no ReLU at the block's start or end).

    The shortcut is parameter-free: 2x2 average pooling when the block downsamples, then zero
    channels appended to match the (always wider) residual branch.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int, bottleneck: bool, dropout: float
    ) -> None:
        super().__init__()
        out_planes = planes * (4 if bottleneck else 1)
        if bottleneck:  # 1x1 reduce, 3x3 (strided), 1x1 expand x4
            layers = [
                nn.BatchNorm2d(in_planes),
                nn.Conv2d(in_planes, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
                relu(dropout),
                nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(planes),
                relu(dropout),
                nn.Conv2d(planes, out_planes, 1, bias=False),
                nn.BatchNorm2d(out_planes),
            ]
        else:  # two 3x3 convs, the first strided
            layers = [
                nn.BatchNorm2d(in_planes),
                nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(planes),
                relu(dropout),
                nn.Conv2d(planes, out_planes, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(out_planes),
            ]
        self.residual = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else None
        self.extra_channels = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.pool is None else self.pool(x)
        if self.extra_channels > 0:
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.extra_channels))
        return self.residual(x) + skip


class PyramidNet(nn.Module):
    """Widths grow by alpha/N per block (N blocks in all) from 16; three resolution stages."""

    def __init__(
        self,
        depth: int,
        alpha: float,
        bottleneck: bool,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        per_block = 9 if bottleneck else 6
        if (depth - 2) % per_block != 0:
            raise ValueError(f"depth must be {per_block}n+2 for this PyramidNet, got {depth}")
        n = (depth - 2) // per_block
        expansion = 4 if bottleneck else 1
        add_rate = alpha / (3 * n)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes, k = [], 16, 0
        for stage in range(3):
            blocks = []
            for j in range(n):
                k += 1
                planes = int(round(16 + add_rate * k))
                stride = 2 if (stage > 0 and j == 0) else 1
                blocks.append(PyramidBlock(in_planes, planes, stride, bottleneck, dropout))
                in_planes = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.head = Head(in_planes, num_classes, dropout, pre_act=True)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.head(out)


def pyramidnet164_270(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> PyramidNet:
    """The paper's Table 2 PyramidNet: bottleneck blocks, depth 164, alpha 270 (about 27 M)."""
    check_image_shape("pyramidnet164_270", in_channels, input_shape, min_size=4)
    return PyramidNet(164, 270, True, num_classes, in_channels, dropout)


def pyramidnet110_48(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> PyramidNet:
    """The small basic-block PyramidNet (depth 110, alpha 48, about 1.7 M) for cheap runs."""
    check_image_shape("pyramidnet110_48", in_channels, input_shape, min_size=4)
    return PyramidNet(110, 48, False, num_classes, in_channels, dropout)

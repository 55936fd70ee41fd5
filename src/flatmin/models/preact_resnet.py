"""Pre-activation ResNet (He et al., ECCV 2016), CIFAR variant: the paper's PreActResNet18."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from flatmin.models._common import Head, check_image_shape, init_weights, relu


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 projection of the pre-activated input when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = relu(dropout)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = relu(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


def make_stage(in_planes: int, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
    """n blocks at one width; only the first one changes resolution and width."""
    blocks = [PreActBlock(in_planes, planes, stride, dropout)]
    blocks += [PreActBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class PreActResNet(nn.Module):
    """3x3 stem, four stages of pre-activation blocks, final BN-ReLU, global pool, linear."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        n1, n2, n3, n4 = num_blocks
        self.layer1 = make_stage(64, 64, n1, 1, dropout)
        self.layer2 = make_stage(64, 128, n2, 2, dropout)
        self.layer3 = make_stage(128, 256, n3, 2, dropout)
        self.layer4 = make_stage(256, 512, n4, 2, dropout)
        self.head = Head(512, num_classes, dropout, pre_act=True)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.head(out)


def preactresnet18(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> PreActResNet:
    """The paper's main CIFAR/SVHN model (Table 1, Fig. 7): [2, 2, 2, 2] basic blocks."""
    check_image_shape("preactresnet18", in_channels, input_shape, min_size=8)
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, dropout)

"""VGG with batch norm (Simonyan & Zisserman 2015), CIFAR variant: one 512 -> classes linear."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from flatmin.models._common import Head, check_image_shape, init_weights, relu

# Output channels of the 3x3 convs; "M" is a 2x2 max-pool.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class ConvBNReLU(nn.Module):
    """One VGG unit; a named module so Dropout never shifts the state_dict keys."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = relu(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class VGG(nn.Module):
    """Conv/pool feature stack, global average pool, single linear classifier."""

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(ConvBNReLU(channels, int(v), dropout))
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.head = Head(channels, num_classes, dropout, pre_act=False)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def vgg16(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> VGG:
    """The paper's second Table 1 model: 13 conv-BN-ReLU layers, five max-pools."""
    check_image_shape("vgg16", in_channels, input_shape, min_size=32)
    return VGG(VGG16, num_classes, in_channels, dropout)

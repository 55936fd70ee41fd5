"""Wide ResNet (Zagoruyko & Komodakis, BMVC 2016): WRN-28-10 (Table 2) and the small WRN-28-2."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from flatmin.models._common import Head, check_image_shape, init_weights
from flatmin.models.preact_resnet import make_stage


class WideResNet(nn.Module):
    """WRN-depth-k: 16-channel stem, three stages of (depth-4)/6 blocks of width 16k/32k/64k.

    A WRN block is exactly the pre-activation basic block (BN-ReLU-conv3x3 twice, stride on the
    first conv, 1x1 projection of the pre-activated input), so it is reused from preact_resnet.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 for a Wide ResNet, got {depth}")
        n = (depth - 4) // 6
        w1, w2, w3 = 16 * widen_factor, 32 * widen_factor, 64 * widen_factor
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.layer1 = make_stage(16, w1, n, 1, dropout)
        self.layer2 = make_stage(w1, w2, n, 2, dropout)
        self.layer3 = make_stage(w2, w3, n, 2, dropout)
        self.head = Head(w3, num_classes, dropout, pre_act=True)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.head(out)


def wrn28_10(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> WideResNet:
    """The paper's Table 2 Wide ResNet (about 36.5 M parameters)."""
    check_image_shape("wrn28_10", in_channels, input_shape, min_size=4)
    return WideResNet(28, 10, num_classes, in_channels, dropout)


def wrn28_2(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> WideResNet:
    """A 25x cheaper Wide ResNet of the same depth, for runs that cannot afford WRN-28-10."""
    check_image_shape("wrn28_2", in_channels, input_shape, min_size=4)
    return WideResNet(28, 2, num_classes, in_channels, dropout)

"""Batched data augmentation on uint8 NCHW tensors, on whatever device the batch lives.

The recipes follow the AMP authors' ``data_utils.py`` (paper §5.1–5.2):
- standard: random crop with ``padding`` (grey 128 fill, as their ``RandomCrop(fill=128)``),
  horizontal flip for CIFAR only; SVHN pads 2, GTSRB pads 4 and neither flips;
- cutout: standard + one square hole (DeVries & Taylor 2017) of 16/8/20/8 px for
  CIFAR-10/CIFAR-100/SVHN/GTSRB, zeroed on the [0, 255] image *before* normalisation, as the
  authors' code does (so in normalised space the hole holds ``-mean/std``, i.e. black);
- autoaugment: standard + the CIFAR-10 (or SVHN) AutoAugment policy + cutout; for SVHN the
  authors drop the crop and keep only policy + cutout, and so do we.
- the IDX data sets: Fashion-MNIST pads 4 (black fill, the background) and flips, the usual
  recipe for it; MNIST and KMNIST pad 2 and do not flip (digits and characters are not
  mirror-symmetric); ``cutout`` adds an 8-px hole (not tuned); no AutoAugment policy for them.
Other dataset names (e.g. "digits") get normalisation only, whatever ``augment`` says.

Random parameters are drawn on the generator's device (CPU when ``None``) and moved to the
batch, so a seed gives the same batch on CPU and CUDA and no op waits on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flatmin.data.autoaugment import FILL, auto_augment, params_device
from flatmin.errors import FlatminError, UnknownNameError

__all__ = [
    "AUGMENTATIONS",
    "BatchTransform",
    "auto_augment",
    "build_transform",
    "cutout",
    "normalize",
    "random_crop",
    "random_hflip",
]

AUGMENTATIONS: tuple[str, ...] = ("none", "standard", "cutout", "autoaugment")

_CROP_PADDING = {"cifar10": 4, "cifar100": 4, "svhn": 2, "gtsrb": 4,
                 "fashion-mnist": 4, "mnist": 2, "kmnist": 2}
# digits, characters and traffic signs are not mirror-symmetric; clothes are
_FLIPS = frozenset({"cifar10", "cifar100", "fashion-mnist"})
_CUTOUT_SIZE = {"cifar10": 16, "cifar100": 8, "svhn": 20, "gtsrb": 8,
                "fashion-mnist": 8, "mnist": 8, "kmnist": 8}
_BLACK_FILL = frozenset({"fashion-mnist", "mnist", "kmnist"})  # a black background: pad with it
_POLICY = {"cifar10": "cifar10", "cifar100": "cifar10", "svhn": "svhn", "gtsrb": "cifar10"}


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` integers in [0, high) drawn from ``generator``, delivered on ``device``."""
    draw = torch.randint(high, (n,), generator=generator, device=params_device(generator))
    return draw.to(device)


def random_crop(
    x: Tensor, padding: int, generator: torch.Generator | None = None, fill: float = 0
) -> Tensor:
    """Shift each image by up to ``padding`` px, filling with ``fill``: translation invariance."""
    n, c, h, w = x.shape
    if padding <= 0:
        return x
    padded = torch.nn.functional.pad(x, (padding,) * 4, value=fill)
    width = w + 2 * padding
    top = _randint(2 * padding + 1, n, generator, x.device)
    left = _randint(2 * padding + 1, n, generator, x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (N, W)
    # one gather over flattened pixels takes every image's window at once
    flat = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror half of the images, on average: left-right invariance of natural scenes."""
    flip = _randint(2, x.shape[0], generator, x.device).bool().view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def cutout(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero one ``size``-px square per image, centre anywhere, clipped at borders (DeVries)."""
    n, _, h, w = x.shape
    cy = _randint(h, n, generator, x.device)[:, None]
    cx = _randint(w, n, generator, x.device)[:, None]
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    # DeVries' bounds: [c - size // 2, c + size // 2) clipped to the image
    in_rows = (ys >= cy - size // 2) & (ys < cy + size // 2)  # (N, H)
    in_cols = (xs >= cx - size // 2) & (xs < cx + size // 2)  # (N, W)
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)
    return x.masked_fill(hole, 0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [0, 255] -> float32 with the dataset's channel statistics, as ToTensor+Normalize."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {x.shape[1]} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


@dataclass(frozen=True)
class BatchTransform:
    """One dataset's augmentation recipe; calling it turns a uint8 batch into model input."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    flip: bool = False
    policy: str | None = None
    cutout_size: int = 0
    fill: float = FILL

    def __call__(self, x: Tensor, train: bool, generator: torch.Generator | None = None) -> Tensor:
        """Augment (only when ``train``) then normalise, in the authors' order."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected a uint8 NCHW batch, got {x.dtype} {tuple(x.shape)}")
        if train:
            if self.padding:
                x = random_crop(x, self.padding, generator, fill=self.fill)
            if self.flip:
                x = random_hflip(x, generator)
            if self.policy is not None:
                x = auto_augment(x, self.policy, generator)
            if self.cutout_size:
                x = cutout(x, self.cutout_size, generator)
        return normalize(x, self.mean, self.std)


def build_transform(
    dataset: str, augment: str, mean: Sequence[float], std: Sequence[float]
) -> BatchTransform:
    """The paper's augmentation for ``dataset`` by name, so every registry entry shares one path."""
    if augment not in AUGMENTATIONS:
        raise UnknownNameError("augmentation", augment, AUGMENTATIONS)
    stats = {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}
    if augment == "none" or dataset not in _CROP_PADDING:
        return BatchTransform(**stats)
    if augment == "autoaugment" and dataset not in _POLICY:
        raise FlatminError(f"augment='autoaugment' has no policy for {dataset!r}; use none, "
                           "standard or cutout")
    svhn_autoaugment = dataset == "svhn" and augment == "autoaugment"  # authors: no crop here
    return BatchTransform(
        **stats,
        padding=0 if svhn_autoaugment else _CROP_PADDING[dataset],
        flip=dataset in _FLIPS,
        policy=_POLICY[dataset] if augment == "autoaugment" else None,
        cutout_size=_CUTOUT_SIZE[dataset] if augment in ("cutout", "autoaugment") else 0,
        fill=0 if dataset in _BLACK_FILL else FILL,
    )

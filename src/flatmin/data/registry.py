"""The dataset registry: one `load_dataset(name, ...)` for every dataset, held as whole tensors."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatmin.data import files, idx, synthetic
from flatmin.data.augment import build_transform
from flatmin.data.download import IDX_MIRRORS, default_data_dir, ensure_files
from flatmin.data.files import Arrays
from flatmin.errors import FlatminError, UnknownNameError

Transform = Callable[[Tensor, bool, "torch.Generator | None"], Tensor]


@dataclass
class Split:
    """Inputs and int64 labels of one split, whole, so the trainer can move it to the device."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A loaded dataset plus what a run needs to know about it (model, defaults, normalisation)."""

    name: str
    train: Split
    val: Split | None
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    default_model: str
    defaults: dict
    mean: tuple[float, ...] | None = None  # per channel, in [0,1] pixel units; images only
    std: tuple[float, ...] | None = None
    augment: str = "none"
    classes: list[str] | None = None  # class names by id, when the data names them (folders, CSV text)
    _transform: Transform | None = field(default=None, repr=False, compare=False)

    def transform(self, x: Tensor, train: bool, generator: torch.Generator | None = None
                  ) -> Tensor:
        """Batch -> model input on x's device: augment (train only) and normalise images."""
        if self._transform is None:
            return x.float()
        return self._transform(x, train, generator)


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise FlatminError(f"val_fraction must be in [0, 1), got {val_fraction}")


def holdout(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Hold out a seeded, deterministic val_fraction of the training set (paper: 10%)."""
    _check_fraction(val_fraction)
    if val_fraction == 0.0:
        return split, None
    n_val = max(1, round(len(split) * val_fraction))
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Split(split.x[train], split.y[train]), Split(split.x[val], split.y[val])


def subset(split: Split, size: int | None, seed: int) -> Split:
    """A seeded random `size` examples of the training split, for CPU-sized runs on big data sets."""
    if size is None:
        return split
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= len(split):
        raise FlatminError(f"train_size must be an integer in 1..{len(split)} (the training split "
                           f"after the validation holdout), got {size!r}")
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))[:size]
    keep = keep.sort().values
    return Split(split.x[keep], split.y[keep])


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 NCHW images in [0,1] units, exact, via 256-bin histograms."""
    v = torch.arange(256, dtype=torch.float64)
    hist = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256)
                        for c in range(x.shape[1])]).double()
    n = hist.sum(1).clamp_min(1)
    mean = (hist * v).sum(1) / n
    var = (hist * (v - mean[:, None]) ** 2).sum(1) / n
    std = var.clamp_min(1.0).sqrt()  # >= 1/255, so a flat channel cannot divide by zero
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


@dataclass(frozen=True)
class Loader:
    """What a dataset is (classes, shape, model, defaults) and how to read it, before reading it."""

    name: str
    read: Callable[..., Arrays]
    num_classes: int
    input_shape: tuple[int, ...]
    default_model: str
    defaults: dict
    options: tuple[str, ...] = ()  # extra keyword arguments the reader accepts

    def __call__(self, *, data_dir: str | Path | None = None, val_fraction: float = 0.1,
                 seed: int = 0, augment: str = "standard", download: bool = False,
                 train_size: int | None = None, **kwargs) -> Dataset:
        """Read, hold out val, subsample train if asked, attach the transform; see `load_dataset`."""
        if unknown := sorted(set(kwargs) - set(self.options)):
            raise FlatminError(f"dataset {self.name!r} takes no option(s) {', '.join(unknown)}; "
                               f"its options: {', '.join(self.options) or 'none'}")
        _check_fraction(val_fraction)  # before a read that may take seconds
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        x, y, xt, yt = self.read(data_dir=root, seed=seed, download=download, **kwargs)
        train, val = holdout(Split(x, y.long()), val_fraction, seed)
        train = subset(train, train_size, seed)
        return with_transform(Dataset(self.name, train, val, Split(xt, yt.long()), self.num_classes,
                                      self.input_shape, self.default_model, dict(self.defaults)), augment)


def with_transform(ds: Dataset, augment: str) -> Dataset:
    """uint8 images get per-channel statistics of the training split and the dataset's augmentation."""
    ds.augment = augment
    if ds.train.x.dtype == torch.uint8:
        ds.mean, ds.std = channel_stats(ds.train.x)
        ds._transform = build_transform(ds.name, augment, ds.mean, ds.std)
    elif augment not in ("none", "standard"):
        raise FlatminError(f"augment={augment!r} applies to image datasets; {ds.name!r} "
                           "takes 'none' or 'standard' (both mean no augmentation)")
    return ds


def _official(name: str, read: Callable[..., Arrays]) -> Callable[..., Arrays]:
    """A reader that finds (or downloads) and verifies the official files, then parses them."""

    def load(*, data_dir: Path, download: bool, verify: bool = True, **_: object) -> Arrays:
        return read(*ensure_files(name, data_dir, download_missing=download, check=verify))

    return load


def _svhn(train: Path, test: Path) -> Arrays:
    return (*files.read_svhn_mat(train), *files.read_svhn_mat(test))


def _spiral(*, seed: int, data_dir: Path, download: bool, **options: Any) -> Arrays:
    return synthetic.spiral(seed, **options)  # n_samples, noise, turns


PAPER = {"epochs": 200, "lr": 0.1, "batch_size": 50, "weight_decay": 1e-4}  # paper §5.1
_IMG, _CHECK = (3, 32, 32), ("verify",)
# CPU-sized (cnn28, 2 cores): docs/fashion_mnist.md; a GPU run takes the paper's protocol instead.
FASHION = {"epochs": 8, "lr": 0.05, "batch_size": 100, "weight_decay": 5e-4}


def _idx(name: str) -> Loader:
    """An MNIST-style data set: data_dir/NAME/, then a system package's folder, then the mirror."""
    return Loader(name, _official(name, idx.read_idx_dataset), 10, (1, 28, 28), "cnn28",
                  FASHION, _CHECK)


DATASETS: dict[str, Loader] = {
    "cifar10": Loader("cifar10", _official("cifar10", files.read_cifar), 10, _IMG,
                      "preactresnet18", PAPER, _CHECK),
    "cifar100": Loader("cifar100", _official("cifar100", partial(files.read_cifar, fine=True)),
                       100, _IMG, "preactresnet18", PAPER, _CHECK),
    "svhn": Loader("svhn", _official("svhn", _svhn), 10, _IMG, "preactresnet18", PAPER, _CHECK),
    "gtsrb": Loader("gtsrb", _official("gtsrb", files.read_gtsrb), 43, _IMG, "preactresnet18",
                    PAPER, _CHECK),
    # CPU-sized defaults: a default run is short but meaningful (to be tuned with the trainer).
    "mnist1d": Loader("mnist1d", lambda **_: synthetic.mnist1d(), 10, (1, 40), "cnn1d",
                      {"epochs": 60, "lr": 0.1, "batch_size": 100, "weight_decay": 5e-4}),
    "spiral": Loader("spiral", _spiral, 2, (2,), "mlp",
                     {"epochs": 200, "lr": 0.1, "batch_size": 50, "weight_decay": 0.0},
                     ("n_samples", "noise", "turns")),
    "digits": Loader("digits", lambda **_: synthetic.digits(), 10, (1, 8, 8), "mlp",
                     {"epochs": 30, "lr": 0.05, "batch_size": 50, "weight_decay": 1e-4}),
    **{name: _idx(name) for name in IDX_MIRRORS},
}


USER_FORMS = "npz:PATH, folder:PATH, csv:PATH"


# "npz" -> a loader of the user's files at a path; filled by flatmin.data.user (which builds on
# this module, so the arrow points from it to here, never back).
USER_KINDS: dict[str, Callable[[str], Any]] = {}


def get_loader(name: str) -> Loader | Any:
    """A registry entry, or a loader for the user's own files (`npz:`, `folder:`, `csv:` + a path)."""
    kind, sep, path = name.partition(":")
    if sep and name not in DATASETS and kind in USER_KINDS:
        return USER_KINDS[kind](path)
    if name not in DATASETS:
        err = UnknownNameError("dataset", name, list(DATASETS))
        err.args = (f"{err.args[0]}; or your own data: {USER_FORMS}",)
        raise err
    return DATASETS[name]


def canonical_name(name: str) -> str:
    """User data with its absolute path (``npz:data.npz`` -> ``npz:/home/me/data.npz``), so a saved
    config still finds the files from another working directory; other names unchanged."""
    loader = get_loader(name)
    return f"{loader.kind}:{loader.path}" if hasattr(loader, "kind") else name


def folder_name(name: str) -> str:
    """A dataset name safe in a folder name: the user's files by kind and file name
    (``npz:/a/b.npz`` -> ``npz-b.npz``), other names as they are."""
    kind, _, path = name.partition(":")
    return re.sub(r"[^\w.-]+", "-", f"{kind}-{Path(path).name}" if path else kind)


def load_dataset(name: str, *, data_dir: str | Path | None = None, val_fraction: float = 0.1,
                 seed: int = 0, augment: str = "standard", download: bool = False,
                 train_size: int | None = None, **kwargs) -> Dataset:
    """Every dataset through one call, so the trainer and CLI never special-case a dataset.

    `train_size` keeps a seeded random subset of the training split after the validation
    holdout (so validation keeps its full size); normalisation is computed on that subset.
    """
    size = {} if train_size is None else {"train_size": train_size}
    return get_loader(name)(data_dir=data_dir, val_fraction=val_fraction, seed=seed,
                            augment=augment, download=download, **size, **kwargs)

"""Datasets that need no files: MNIST-1D (generated locally), the Fig. 6 spiral, sklearn digits."""

from __future__ import annotations

import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatmin.data.download import cache_dir
from flatmin.errors import FlatminError

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The canonical 4000/1000 MNIST-1D, from the package's own generator, never its download."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise FlatminError("mnist1d needs the mnist1d package: pip install flatmin[data]") from err
    state = random.getstate(), np.random.get_state()  # make_dataset reseeds the global RNGs
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    return {k: np.asarray(d[k]) for k in _MNIST1D_KEYS}


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is absent or damaged (it is then regenerated)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in _MNIST1D_KEYS}
    except Exception:  # absent, truncated, not a zip, missing keys: all mean "regenerate"
        return None
    ok = d["x"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
    return d if ok and len(d["y"]) == 4000 and len(d["y_test"]) == 1000 else None


def mnist1d(cache: Path | None = None) -> Arrays:
    """MNIST-1D as (N,1,40) float32, generated once (~1 s) and then read from the user cache."""
    path = (cache or cache_dir()) / "mnist1d_default.npz"
    d = _load_cached(path)
    if d is None:
        d = _generate_mnist1d()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".mnist1d.", suffix=".npz", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **d)
            os.replace(tmp, path)  # atomic, so parallel runs never read half a file
        except OSError:  # an unwritable cache only costs regenerating next time
            pass
    x, xt = (torch.from_numpy(d[k].astype(np.float32)).unsqueeze(1) for k in ("x", "x_test"))
    y, yt = (torch.from_numpy(d[k].astype(np.int64)) for k in ("y", "y_test"))
    return x, y, xt, yt


def make_spiral(n: int, *, noise: float, turns: float, generator: torch.Generator
                ) -> tuple[Tensor, Tensor]:
    """Two interleaved Archimedean spirals r ∝ θ (class 1 is class 0 turned by π), plus noise."""
    y = torch.arange(n) % 2
    t = torch.rand(n, generator=generator).sqrt() * 0.95 + 0.05  # even density along the arms
    angle = 2 * math.pi * turns * t + math.pi * y
    x = torch.stack([t * angle.cos(), t * angle.sin()], dim=1)
    x += noise * torch.randn(n, 2, generator=generator)
    return x.float(), y


def spiral(seed: int = 0, n_samples: int = 600, noise: float = 0.05, turns: float = 1.5) -> Arrays:
    """The Fig. 6 toy problem: n_samples train and as many test points, fixed by seed."""
    if n_samples < 2 or noise < 0 or turns <= 0:
        raise FlatminError(f"spiral needs n_samples>=2, noise>=0, turns>0; got {n_samples}, "
                           f"{noise}, {turns}")
    g = torch.Generator().manual_seed(seed)
    return (*make_spiral(n_samples, noise=noise, turns=turns, generator=g),
            *make_spiral(n_samples, noise=noise, turns=turns, generator=g))


def digits(test_fraction: float = 0.2) -> Arrays:
    """sklearn's bundled 8×8 digits as (N,1,8,8) in [0,1]; the test split is fixed (seed 0)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise FlatminError("digits needs scikit-learn: pip install flatmin[data]") from err
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = round(len(y) * test_fraction)
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[train], y[train], x[test], y[test]

"""flatmin.data registry and the embedded datasets (mnist1d, spiral, digits)."""

from __future__ import annotations

import random
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from flatmin.data import DATASETS, Dataset, Split, load_dataset, synthetic
from flatmin.data.registry import holdout
from flatmin.errors import FlatminError, UnknownNameError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One MNIST-1D cache for the module, so it is generated once and never in the user's home."""
    path = tmp_path_factory.mktemp("flatmin_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLATMIN_CACHE", str(path))
        yield path


def test_registry_lists_every_dataset_with_its_metadata():
    assert set(DATASETS) == {"cifar10", "cifar100", "svhn", "gtsrb", "mnist1d", "spiral", "digits",
                             "fashion-mnist", "mnist", "kmnist"}
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["gtsrb"].num_classes == 43
    for name in ("cifar10", "cifar100", "svhn", "gtsrb"):
        d = DATASETS[name]
        assert d.input_shape == (3, 32, 32) and d.default_model == "preactresnet18"
        assert d.defaults == {"epochs": 200, "lr": 0.1, "batch_size": 50, "weight_decay": 1e-4}
    for d in DATASETS.values():
        assert set(d.defaults) == {"epochs", "lr", "batch_size", "weight_decay"}


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("cifar11")
    assert "cifar11" in str(err.value) and "cifar10, cifar100, digits" in str(err.value)


def test_unknown_option_is_named():
    with pytest.raises(FlatminError, match="bogus.*n_samples, noise, turns"):
        load_dataset("spiral", bogus=1)


@pytest.mark.parametrize("name", ["mnist1d", "spiral", "digits"])
def test_embedded_datasets_load_with_consistent_shapes(cache, name):
    ds = load_dataset(name)
    assert isinstance(ds, Dataset) and ds.name == name
    for split in (ds.train, ds.val, ds.test):
        assert isinstance(split, Split) and len(split) > 0
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == ds.input_shape
        assert 0 <= int(split.y.min()) and int(split.y.max()) < ds.num_classes
    assert set(ds.train.y.tolist()) == set(range(ds.num_classes))
    assert ds.default_model == DATASETS[name].default_model
    out = ds.transform(ds.train.x[:5].double(), train=True)  # vectors: identity, as float32
    assert out.dtype == torch.float32 and torch.equal(out, ds.train.x[:5])


def test_mnist1d_is_the_canonical_4000_1000_split(cache):
    ds = load_dataset("mnist1d", val_fraction=0.0)
    assert ds.val is None and (len(ds.train), len(ds.test)) == (4000, 1000)
    assert ds.input_shape == (1, 40) and ds.num_classes == 10 and ds.default_model == "cnn1d"
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    assert torch.equal(ds.train.x[:, 0], torch.from_numpy(ref["x"].astype(np.float32)))
    assert torch.equal(ds.test.y, torch.from_numpy(ref["y_test"]).long())


def test_mnist1d_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATMIN_CACHE", str(tmp_path))
    rng_state = random.getstate(), np.random.get_state()[1].copy()
    first = synthetic.mnist1d()
    assert random.getstate() == rng_state[0]  # the generator's reseeding is undone
    assert np.array_equal(np.random.get_state()[1], rng_state[1])
    assert (tmp_path / "mnist1d_default.npz").is_file()

    def boom():
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(synthetic, "_generate_mnist1d", boom)
    second = synthetic.mnist1d()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATMIN_CACHE", str(tmp_path))
    good = synthetic.mnist1d()
    path = tmp_path / "mnist1d_default.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    again = synthetic.mnist1d()
    assert all(torch.equal(a, b) for a, b in zip(good, again))
    assert synthetic._load_cached(path) is not None  # rewritten whole


def test_holdout_is_seeded_deterministic_and_disjoint():
    split = Split(torch.arange(100).float(), torch.arange(100))
    train, val = holdout(split, 0.1, seed=3)
    train2, val2 = holdout(split, 0.1, seed=3)
    _, val3 = holdout(split, 0.1, seed=4)
    assert torch.equal(val.y, val2.y) and torch.equal(train.y, train2.y)
    assert not torch.equal(val.y, val3.y)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train.y.tolist() + val.y.tolist()) == list(range(100))
    assert holdout(split, 0.0, seed=0) == (split, None)
    with pytest.raises(FlatminError, match="val_fraction"):
        holdout(split, 1.0, seed=0)


def test_val_split_of_a_loaded_dataset_is_deterministic_and_covers_train(cache):
    full = load_dataset("digits", val_fraction=0.0)
    a, b = load_dataset("digits", seed=7), load_dataset("digits", seed=7)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert len(a.train) + len(a.val) == len(full.train) == 1797 - len(full.test)
    rows = Counter(map(tuple, full.train.x.flatten(1).tolist()))  # a partition of the rows
    assert Counter(map(tuple, a.train.x.flatten(1).tolist() + a.val.x.flatten(1).tolist())) == rows
    assert torch.equal(load_dataset("digits", seed=1).test.x, full.test.x)  # test fixed


def test_spiral_is_deterministic_given_seed_and_takes_its_options():
    a = load_dataset("spiral", seed=5, val_fraction=0.0, n_samples=100, noise=0.0, turns=2)
    b = load_dataset("spiral", seed=5, val_fraction=0.0, n_samples=100, noise=0.0, turns=2)
    c = load_dataset("spiral", seed=6, val_fraction=0.0, n_samples=100, noise=0.0, turns=2)
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert a.train.x.shape == (100, 2) and len(a.test) == 100 and a.num_classes == 2
    assert a.train.y.bincount().tolist() == [50, 50]
    # noise-free: both classes lie on r = θ / (2π·turns) arms, turned by π from each other
    r = a.train.x.norm(dim=1)
    ang = torch.atan2(a.train.x[:, 1], a.train.x[:, 0]) - np.pi * a.train.y
    assert torch.allclose(torch.cos(ang), torch.cos(2 * np.pi * 2 * r), atol=1e-4)
    with pytest.raises(FlatminError, match="n_samples"):
        load_dataset("spiral", n_samples=1)


def test_vector_datasets_refuse_image_augmentations(cache):
    with pytest.raises(FlatminError, match="cutout"):
        load_dataset("spiral", augment="cutout")
    assert load_dataset("spiral", augment="none").augment == "none"


def test_digits_needs_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(FlatminError, match=r"pip install flatmin\[data\]"):
        load_dataset("digits")

"""The user's own data (npz:, folder:, csv:) and model (module:factory), on files made here."""

from __future__ import annotations

import csv
import json
import os
import textwrap
import warnings

import numpy as np
import pytest
import torch

from flatmin.cli import main
from flatmin.data import load_dataset
from flatmin.errors import FlatminError, FlatminWarning, UnknownNameError
from flatmin.models import create_model

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Caches go to a temporary folder, never the user's home."""
    monkeypatch.setenv("FLATMIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data" / "user-cache"


def save_npz(path, n=60, shape=(5,), classes=3, seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.normal(2.0, 3.0, (n, *shape)).astype(np.float32),
              "y_train": np.arange(n) % classes, "x_test": rng.normal(size=(20, *shape)).astype(np.float32),
              "y_test": np.arange(20) % classes}
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


# -- npz ---------------------------------------------------------------------------------------

def test_npz_vectors_infer_classes_shape_and_standardise_from_train(tmp_path):
    save_npz(tmp_path / "d.npz", n=100, shape=(5,), classes=4)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", val_fraction=0.2, seed=1)
    assert ds.num_classes == 4 and ds.input_shape == (5,) and ds.default_model == "mlp"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80, 20, 20)
    assert torch.allclose(ds.train.x.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(ds.train.x.std(0), torch.ones(5), atol=1e-5)
    assert ds.val.x.mean().abs() > 1e-3  # val and test use the training split's statistics
    assert ds.train.y.dtype == torch.int64


def test_npz_given_val_split_is_used_instead_of_a_holdout(tmp_path):
    save_npz(tmp_path / "d.npz", n=40, x_val=np.zeros((7, 5), np.float32), y_val=np.arange(7) % 3)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", val_fraction=0.1)
    assert (len(ds.train), len(ds.val)) == (40, 7)


def test_npz_images_channels_last_and_first_give_the_same_tensors(tmp_path):
    a = save_npz(tmp_path / "nchw.npz", shape=(3, 6, 5))
    np.savez(tmp_path / "nhwc.npz", **{k: v.transpose(0, 2, 3, 1) if k.startswith("x") else v
                                       for k, v in a.items()})
    first = load_dataset(f"npz:{tmp_path / 'nchw.npz'}")
    last = load_dataset(f"npz:{tmp_path / 'nhwc.npz'}")
    assert first.input_shape == last.input_shape == (3, 6, 5)
    assert torch.equal(first.train.x, last.train.x) and torch.equal(first.test.x, last.test.x)
    # per channel: every channel of the training split has mean 0
    assert torch.allclose(first.train.x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_npz_ambiguous_layout_is_channels_first_unless_overridden(tmp_path):
    save_npz(tmp_path / "d.npz", shape=(3, 4, 3))  # both axis 1 and the last axis could be channels
    path = f"npz:{tmp_path / 'd.npz'}"
    assert load_dataset(path).input_shape == (3, 4, 3)
    assert load_dataset(path, layout="nhwc").input_shape == (3, 3, 4)
    with pytest.raises(FlatminError, match="layout must be one of nchw, nhwc"):
        load_dataset(path, layout="hwc")


def test_npz_uint8_images_take_the_image_path(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", x_train=x, y_train=np.arange(30) % 2, x_test=x[:6], y_test=np.arange(6) % 2)
    ds = load_dataset(f"npz:{tmp_path / 'u.npz'}", val_fraction=0.0)
    assert ds.train.x.dtype == torch.uint8 and ds.input_shape == (3, 8, 8)
    mean = ds.train.x.double().mean((0, 2, 3)) / 255
    assert np.allclose(ds.mean, mean.numpy())
    out = ds.transform(ds.train.x, train=False)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    ({"y_test": None}, "lacks y_test"),
    ({"y_train": np.arange(59) % 3}, "x_train has 60 examples and y_train 59"),
    ({"x_test": np.zeros((0, 5), np.float32), "y_test": np.zeros(0, int)}, "x_test has 0 examples"),
    ({"y_train": np.full(60, 1.5)}, r"not a class id \(1.5\)"),
    ({"y_train": np.array(["cat", "dog"] * 30)}, "non-numeric labels.*'cat'"),
    ({"y_train": np.full(60, -1)}, "negative label"),
    ({"y_train": np.zeros(60, int)}, "single class"),
    ({"x_test": np.zeros((20, 4), np.float32)}, "x_test examples have shape"),
    ({"x_val": np.zeros((3, 5), np.float32)}, "only one of x_val, y_val"),
])
def test_npz_bad_input_is_one_clear_message(tmp_path, extra, message):
    arrays = save_npz(tmp_path / "ok.npz")
    arrays.update(extra)
    np.savez(tmp_path / "d.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(FlatminError, match=message):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_not_an_npz_and_missing_files_are_named(tmp_path):
    (tmp_path / "bad.npz").write_text("hello")
    with pytest.raises(FlatminError, match="cannot read .*bad.npz"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(FlatminError, match="no such file.*nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(FlatminError, match="needs a path"):
        load_dataset("npz:")
    with pytest.raises(UnknownNameError, match="or your own data: npz:PATH, folder:PATH, csv:PATH"):
        load_dataset("nzp:x")


# -- folder ------------------------------------------------------------------------------------

def make_folder(root, size=(6, 5), per_class=3, mode="RGB", splits=("train", "test"), classes=("ant", "bee")):
    """PNGs with known pixels; returns {path: array}."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                path = root / split / c / f"{i}.png"
                Image.fromarray(a, mode).save(path)
                pixels[path] = a
    return pixels


def test_folder_of_pngs_and_a_jpeg_decodes_exactly(tmp_path):
    pixels = make_folder(tmp_path / "img", splits=("train", "val", "test"))
    Image.fromarray(np.full((5, 6, 3), 200, np.uint8)).save(tmp_path / "img/train/bee/z.jpg", quality=95)
    ds = load_dataset(f"folder:{tmp_path / 'img'}")
    assert ds.num_classes == 2 and ds.input_shape == (3, 5, 6) and ds.train.x.dtype == torch.uint8
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7, 6, 6)  # val/ used, no holdout
    first = pixels[tmp_path / "img/train/ant/0.png"]  # sorted: ant before bee, 0.png first
    assert torch.equal(ds.train.x[0], torch.from_numpy(first).permute(2, 0, 1))
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    jpeg = ds.train.x[-1].float()  # lossy, but close to the flat 200 it was
    assert (jpeg - 200).abs().max() <= 3
    assert ds.mean is not None and len(ds.mean) == 3  # images normalised per channel from train
    (tmp_path / "img/train/ant/._0.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    assert len(load_dataset(f"folder:{tmp_path / 'img'}").train) == 7
    with pytest.raises(FlatminError, match="augment='cutout' is defined for the paper datasets"):
        load_dataset(f"folder:{tmp_path / 'img'}", augment="cutout")


def test_folder_greyscale_is_one_channel_and_image_size_resizes(tmp_path):
    make_folder(tmp_path / "g", mode="L", size=(7, 7))
    Image.fromarray(np.zeros((9, 4), np.uint8), "L").save(tmp_path / "g/train/ant/odd.png")
    with pytest.raises(FlatminError, match=r"differ in size: .* is 7x7, .*odd.png is 4x9; pass --image-size"):
        load_dataset(f"folder:{tmp_path / 'g'}")
    ds = load_dataset(f"folder:{tmp_path / 'g'}", image_size=5, val_fraction=0.0)
    assert ds.input_shape == (1, 5, 5) and ds.train.x.shape == (7, 1, 5, 5)


def test_folder_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, cache, monkeypatch):
    make_folder(tmp_path / "c")
    name = f"folder:{tmp_path / 'c'}"
    a = load_dataset(name)
    assert len(list(cache.glob("folder-*.pt"))) == 1
    import flatmin.data.images as images

    def no_decoding(*_, **__):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(images, "read_folder", no_decoding)
    b = load_dataset(name)
    assert torch.equal(a.train.x, b.train.x)
    monkeypatch.undo()
    monkeypatch.setenv("FLATMIN_CACHE", str(cache.parent.parent))
    path = tmp_path / "c/train/ant/0.png"
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))  # even with an old mtime the size differs
    c = load_dataset(name)
    assert len(list(cache.glob("folder-*.pt"))) == 2
    assert not torch.equal(a.train.x, c.train.x)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: __import__("shutil").rmtree(r / "test"), "has no test/ folder"),
    (lambda r: [p.unlink() for p in (r / "train/bee").iterdir()], "class folder .*train/bee holds no images"),
    (lambda r: (r / "train/ant/1.png").write_bytes(b"not a png"), "cannot read image .*train/ant/1.png"),
    (lambda r: (r / "train/ant/1.png").write_bytes((r / "train/ant/1.png").read_bytes()[:60]),
     "cannot read image .*train/ant/1.png"),
    (lambda r: (r / "test/wasp").mkdir() or Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(
        r / "test/wasp/0.png"), "class folder.*wasp that train/ lacks"),
])
def test_folder_bad_input_is_one_clear_message(tmp_path, breakage, message):
    make_folder(tmp_path / "b")
    breakage(tmp_path / "b")
    with pytest.raises(FlatminError, match=message):
        load_dataset(f"folder:{tmp_path / 'b'}")


# -- csv ---------------------------------------------------------------------------------------

def write_csv(path, rows, header=("a", "b", "label")):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_csv_numeric_columns_and_label_column(tmp_path):
    write_csv(tmp_path / "train.csv", [(i, i * 0.5, i % 3) for i in range(30)])
    write_csv(tmp_path / "test.csv", [(i, 1.0, i % 3) for i in range(9)])
    ds = load_dataset(f"csv:{tmp_path}", val_fraction=0.0)
    assert ds.num_classes == 3 and ds.input_shape == (2,) and len(ds.train) == 30
    assert ds.train.y.tolist() == [i % 3 for i in range(30)]
    assert torch.allclose(ds.train.x.mean(0), torch.zeros(2), atol=1e-5)
    write_csv(tmp_path / "train.csv", [(i % 2, i, 7) for i in range(30)], header=("target", "x", "z"))
    write_csv(tmp_path / "test.csv", [(1, 2, 3)], header=("target", "x", "z"))
    ds = load_dataset(f"csv:{tmp_path}", label_column="target", val_fraction=0.0)
    assert ds.input_shape == (2,) and ds.num_classes == 2


ABL = ("a", "b", "label")


@pytest.mark.parametrize("train_rows, header, message", [
    ([(1, "red", 0), (2, "blue", 1)], ABL, "column 'b' is not numeric.*line 2: 'red'.*--categorical onehot"),
    ([(1, 2, "cat"), (2, 3, "dog")], ABL, r"test.csv: label '0' is not among .*labels \(cat, dog\)"),
    ([(1, 2, 0.5), (2, 3, 1)], ABL, "label '0.5'"),
    ([(1, 2, 0), (2, 3, 1)], ("a", "b", "y"),
     r"no label column 'label' \(columns: a, b, y\).*--label-column"),
    ([(1, 2, 0), (2, 3)], ABL, "line 3: 2 fields, the header has 3"),
    ([(1, "", 0), (2, 3, 1)], ABL, "line 2: column 'b' has a missing value"),
    ([(1, 2, 0), (2, "nan", 1)], ABL, "line 3: column 'b' has a missing value"),
    ([], ABL, r"has no rows \(only a header\)"),
])
def test_csv_bad_input_is_one_clear_message(tmp_path, train_rows, header, message):
    write_csv(tmp_path / "train.csv", train_rows, header)
    write_csv(tmp_path / "test.csv", [(1, 2, 0)], header)
    with pytest.raises(FlatminError, match=message):
        load_dataset(f"csv:{tmp_path}")


def test_csv_text_labels_are_sorted_class_names_saved_with_the_run(tmp_path, capsys):
    names = ("setosa", "versicolor", "virginica")
    header = ("a", "b", "species")
    write_csv(tmp_path / "train.csv", [(i, i % 5, names[(i + 1) % 3]) for i in range(30)], header)
    write_csv(tmp_path / "test.csv", [(1, 2, "virginica"), (2, 1, "setosa")], ("a", "b", "species"))
    ds = load_dataset(f"csv:{tmp_path}", label_column="species", val_fraction=0.0)
    assert ds.classes == list(names) and ds.num_classes == 3
    assert ds.train.y[:3].tolist() == [1, 2, 0] and ds.test.y.tolist() == [2, 0]
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"csv:{tmp_path}", "--label-column", "species", "--epochs", "1",
                 "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["classes"] == list(names)


@pytest.mark.parametrize("name, start", [("", 0), ("Unnamed: 0", 0), ("index", 0), ("id", 1), ("id", 100)])
def test_csv_index_column_is_not_a_feature_and_is_named(tmp_path, name, start):
    """pandas' row index (unnamed, ``Unnamed: 0`` after a re-save, or index/id holding the row numbers) is
    not a feature; an ``id`` column that is not the row numbers (100, 101, ...) is an ordinary feature."""
    header = (name, "a", "b", "label")
    write_csv(tmp_path / "train.csv", [(start + i, i * 0.5, 1.0, i % 2) for i in range(20)], header)
    write_csv(tmp_path / "test.csv", [(start, 1.0, 2.0, 1)], header)
    index = start in (0, 1)
    for _ in range(2):  # decoded, then from the cache: the warning both times
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ds = load_dataset(f"csv:{tmp_path}", val_fraction=0.0)
        said = [str(w.message) for w in seen if "read as the row index" in str(w.message)]
        assert len(said) == index and (not said or repr(name) in said[0])
        assert ds.input_shape == ((2,) if index else (3,))
    write_csv(tmp_path / "train.csv", [(i, "", i % 2) for i in range(4)], ("a", "", "label"))
    write_csv(tmp_path / "test.csv", [(0, 1.0, 1)], ("a", "", "label"))
    with pytest.raises(FlatminError, match="column 2 has no name"):
        load_dataset(f"csv:{tmp_path}")


def test_labels_that_skip_zero_are_warned_about(tmp_path):
    write_csv(tmp_path / "train.csv", [(i, 1.0, 1 + i % 3) for i in range(30)])
    write_csv(tmp_path / "test.csv", [(1, 2.0, 3)])
    with pytest.warns(FlatminWarning, match=r"skip class id\(s\) 0; the model gets 4 outputs"):
        ds = load_dataset(f"csv:{tmp_path}")
    assert ds.num_classes == 4


def test_csv_categorical_columns_one_hot_when_asked(tmp_path):
    header = ("size", "colour", "label")
    colours = ("red", "blue", "green")
    write_csv(tmp_path / "train.csv", [(i, colours[i % 3], i % 2) for i in range(12)], header)
    write_csv(tmp_path / "test.csv", [(1, "blue", 0), (2, "purple", 1)], header)
    with pytest.raises(FlatminError, match="column 'colour' is not numeric"):
        load_dataset(f"csv:{tmp_path}")
    ds = load_dataset(f"csv:{tmp_path}", categorical="onehot", val_fraction=0.0)
    assert ds.input_shape == (4,)  # size + colour=blue, colour=green, colour=red
    onehot_train = (ds.train.x[:, 1:] > 0).int()  # standardised, but 1s stay above the mean
    assert onehot_train[:3].tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # red, blue, green
    assert (ds.test.x[1, 1:] < 0).all()  # an unseen colour: all zeros, below every column mean
    with pytest.raises(FlatminError, match="categorical must be one of error, onehot"):
        load_dataset(f"csv:{tmp_path}", categorical="ordinal")


def test_csv_missing_split_and_mismatched_header(tmp_path):
    write_csv(tmp_path / "train.csv", [(1, 2, 0), (2, 3, 1)])
    with pytest.raises(FlatminError, match="has no test.csv"):
        load_dataset(f"csv:{tmp_path}")
    write_csv(tmp_path / "test.csv", [(1, 2, 0)], header=("a", "c", "label"))
    with pytest.raises(FlatminError, match="test.csv has columns"):
        load_dataset(f"csv:{tmp_path}")
    with pytest.raises(FlatminError, match="no option.*image_size; their options: label_column, categorical"):
        load_dataset(f"csv:{tmp_path}", image_size=3)


# -- the user's model ----------------------------------------------------------------------------

MODULE = textwrap.dedent("""
    import math
    from torch import nn

    CALLS = []

    def factory(num_classes, input_shape):
        CALLS.append((num_classes, input_shape))
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

    def broken(num_classes, input_shape):
        raise RuntimeError("no GPU here")

    def not_a_model(num_classes, input_shape):
        return 3
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `usernets_<id>` on a temporary sys.path entry."""
    name = f"usernets_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**6}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_model_factory_is_called_with_classes_and_shape(user_module, tmp_path):
    model = create_model(f"{user_module}:factory", num_classes=4, in_channels=1, input_shape=[1, 3, 3])
    assert model(torch.zeros(2, 1, 3, 3)).shape == (2, 4)
    assert __import__(user_module).CALLS[-1] == (4, (1, 3, 3))
    from_file = create_model(f"{tmp_path / user_module}.py:factory", num_classes=2, input_shape=(5,))
    assert from_file(torch.zeros(1, 5)).shape == (1, 2)
    assert create_model("mlp", num_classes=2, input_shape=(5,))(torch.zeros(1, 5)).shape == (1, 2)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("{m}:factroy", "has no attribute 'factroy'; its callables: broken, factory, not_a_model"),
    ("{m}:broken", r"{m}:broken\(num_classes=3, input_shape=\(5,\)\) failed: RuntimeError: no GPU here"),
    ("{m}:not_a_model", "returned int, not a torch.nn.Module"),
    ("{m}:CALLS", "CALLS is a list, not a function"),
    ("{m}:", "expected module.path:function"),
    ("/nowhere/x.py:f", "no such file"),
])
def test_model_factory_errors_are_named(user_module, spec, message):
    with pytest.raises(FlatminError, match=message.format(m=user_module)):
        create_model(spec.format(m=user_module), num_classes=3, input_shape=(5,))


def test_a_module_that_fails_to_import_is_told_apart_from_a_missing_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "needs_dep_xyz.py").write_text("import not_installed_dep_xyz\n")
    (tmp_path / "broken_xyz.py").write_text("def f(:\n")
    with pytest.raises(FlatminError, match="importing needs_dep_xyz failed: .*not_installed_dep_xyz"):
        create_model("needs_dep_xyz:f", num_classes=2, input_shape=(3,))
    with pytest.raises(FlatminError, match="importing broken_xyz failed: SyntaxError"):
        create_model("broken_xyz:f", num_classes=2, input_shape=(3,))


def test_dropout_needs_a_factory_that_takes_it(user_module):
    with pytest.raises(FlatminError, match="dropout method needs a factory that takes dropout="):
        create_model(f"{user_module}:factory", num_classes=3, input_shape=(5,), dropout=0.1)


# -- end to end ------------------------------------------------------------------------------------

def test_train_cli_on_user_npz_and_user_model(tmp_path, user_module, capsys):
    save_npz(tmp_path / "d.npz", n=60, shape=(1, 4, 4), classes=3)
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--model", f"{user_module}:factory",
            "--method", "amp", "--epochs", "1", "--batch-size", "20", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == f"{user_module}:factory" and metrics["epochs_completed"] == 1
    assert 0 <= metrics["test"]["error"] <= 100
    capsys.readouterr()
    assert main([*argv[:-3], "--model", f"{user_module}:broken", "--quiet"]) == 2
    assert "RuntimeError: no GPU here" in capsys.readouterr().err
    assert main(["train", "--dataset", f"folder:{tmp_path / 'none'}", "--epochs", "1", "--quiet"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_compare_on_an_image_folder_and_analysis_reload(tmp_path, user_module, capsys):
    """`flatmin compare` with the user's folder and factory; the run reloads for the analyses."""
    from flatmin.train.checkpoint import load_run

    make_folder(tmp_path / "img", per_class=6)
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", f"folder:{tmp_path / 'img'}", "--model", f"{user_module}:factory",
                 "--methods", "erm,amp", "--seeds", "1", "--epochs", "1", "--workers", "1",
                 "--out", str(out), "--no-figures"]) == 0
    assert "| amp | 1 |" in capsys.readouterr().out
    (ckpt,) = sorted(out.glob("runs/amp_folder-*/checkpoint.pt"))
    run = load_run(ckpt)
    assert run.dataset.input_shape == (3, 5, 6) and run.dataset.num_classes == 2
    assert run.model(run.dataset.transform(run.dataset.test.x, False)).shape == (12, 2)


def test_run_key_follows_the_files_and_folder_names_are_safe(tmp_path, monkeypatch):
    from flatmin.experiments.runner import config_key, make_task
    from flatmin.train.config import TrainConfig

    save_npz(tmp_path / "d.npz")
    cfg = TrainConfig(dataset=f"npz:{tmp_path / 'd.npz'}", epochs=1)
    key = config_key(cfg)
    task = make_task(cfg, "erm", tmp_path / "out")
    assert task.run_dir.parent == tmp_path / "out" / "runs"
    assert task.run_dir.name.startswith("erm_npz-d.npz_s0_")
    save_npz(tmp_path / "d.npz", n=61)
    assert config_key(cfg) != key  # changed data: a new run, not the stale result
    assert config_key(cfg.replace(tensorboard=True)) == config_key(cfg)
    monkeypatch.chdir(tmp_path)
    assert config_key(cfg.replace(dataset="npz:d.npz")) == config_key(cfg)  # a relative path: same run


def test_cli_stores_user_data_with_an_absolute_path(tmp_path, monkeypatch):
    import argparse

    from flatmin.cli.options import add_config_arguments, config_overrides

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    monkeypatch.chdir(tmp_path)
    given = config_overrides(parser.parse_args(["--dataset", "npz:sub/d.npz", "--layout", "nhwc"]))
    assert given == {"dataset": f"npz:{tmp_path / 'sub' / 'd.npz'}", "dataset_options": {"layout": "nhwc"}}
    assert config_overrides(parser.parse_args(["--dataset", "digits"]))["dataset"] == "digits"

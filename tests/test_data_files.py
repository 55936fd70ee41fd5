"""The paper datasets from small files in their real formats, checksums and download errors."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import types
import zipfile
from urllib.error import URLError

import numpy as np
import pytest
import torch

from flatmin.data import download as dl
from flatmin.data import files, load_dataset
from flatmin.errors import FlatminError


@pytest.fixture(autouse=True)
def _augment(monkeypatch):
    """Normalise-only stand-in, used only if the colleague's augment module is not there yet."""
    try:
        import flatmin.data.augment  # noqa: F401
    except ImportError:
        def build_transform(dataset, augment, mean, std):
            m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
            return lambda x, train, generator=None: (x.float() / 255 - m) / s

        fake = types.ModuleType("flatmin.data.augment")
        fake.build_transform = build_transform
        monkeypatch.setitem(sys.modules, "flatmin.data.augment", fake)


def _pickle(obj) -> bytes:
    """Protocol 2 from Python 3 (bytes via _codecs.encode), numpy.core names as numpy 1 wrote."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


class _Py2Pickler(pickle._Pickler):
    """Writes str as Python 2 byte strings (BINSTRING), as the official CIFAR batches hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        op = pickle.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else (
            pickle.BINSTRING + struct.pack("<i", len(b)))
        self.write(op + b)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_str


def _py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_cifar10(path, n=20, n_test=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (5 * n + n_test, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, 5 * n + n_test)
    batches = {f"cifar-10-batches-py/data_batch_{i + 1}": {
        "batch_label": "training batch", "labels": y[i * n:(i + 1) * n].tolist(),
        "data": x[i * n:(i + 1) * n], "filenames": ["f.png"] * n} for i in range(5)}
    batches["cifar-10-batches-py/test_batch"] = {"labels": y[5 * n:].tolist(), "data": x[5 * n:]}
    batches["cifar-10-batches-py/batches.meta"] = {"label_names": ["airplane"] * 10}
    _tar(path, {k: _py2_pickle(v) for k, v in batches.items()})
    return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y)


def test_cifar10_round_trips_pixels_and_labels(tmp_path):
    x, y = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0, verify=False)
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (100, 3, 32, 32)
    assert torch.equal(ds.train.x, x[:100]) and torch.equal(ds.train.y, y[:100])
    assert torch.equal(ds.test.x, x[100:]) and torch.equal(ds.test.y, y[100:])
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    # normalised by the training split's own statistics (paper §5.1), in [0,1] pixel units
    f = x[:100].double() / 255
    assert np.allclose(ds.mean, f.mean((0, 2, 3))) and np.allclose(ds.std, f.std((0, 2, 3)), 1e-3)
    out = ds.transform(ds.test.x[:4], train=False)
    ref = (ds.test.x[:4].float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(
        ds.std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert ds.transform(ds.train.x[:8], train=True, generator=g).shape == (8, 3, 32, 32)


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 3072), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, 50), rng.integers(0, 20, 50)
    _tar(tmp_path / "cifar-100-python.tar.gz", {
        f"cifar-100-python/{n}": _pickle({b"data": x[s], b"fine_labels": fine[s].tolist(),
                                          b"coarse_labels": coarse[s].tolist()})
        for n, s in (("train", slice(0, 40)), ("test", slice(40, 50)))})
    ds = load_dataset("cifar100", data_dir=tmp_path, val_fraction=0.1, verify=False)
    assert ds.num_classes == 100 and len(ds.train) == 36 and len(ds.val) == 4
    assert torch.equal(ds.test.y, torch.from_numpy(fine[40:])) and ds.test.x.shape[0] == 10


def test_checksum_passes_is_cached_and_rejects_a_tampered_file(tmp_path, monkeypatch):
    path = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10(path)
    monkeypatch.setitem(dl.CHECKSUMS, path.name, hashlib.md5(path.read_bytes()).hexdigest())
    load_dataset("cifar10", data_dir=tmp_path)  # verify=True by default
    monkeypatch.setattr(dl, "md5sum", lambda p: pytest.fail("rehashed an unchanged file"))
    load_dataset("cifar10", data_dir=tmp_path)
    monkeypatch.undo()
    monkeypatch.setitem(dl.CHECKSUMS, path.name, hashlib.md5(path.read_bytes()).hexdigest())
    path.write_bytes(path.read_bytes()[:-100])  # truncated download
    with pytest.raises(FlatminError, match=f"{path}.*corrupt or truncated.*cs.toronto.edu"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_official_checksum_rejects_a_file_that_is_not_the_official_one(tmp_path):
    make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(FlatminError, match="expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_truncated_archive_is_an_error_naming_it(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FlatminError, match=str(path)):
        load_dataset("cifar10", data_dir=tmp_path, verify=False)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    _tar(tmp_path / "cifar-10-python.tar.gz", {
        "cifar-10-batches-py/data_batch_1": pickle.dumps({b"data": _Evil(marker)}, protocol=2)})
    with pytest.raises(FlatminError, match="data_batch_1.*refusing to load"):
        load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert not marker.exists()
    with pytest.raises(FlatminError, match="builtins.eval"):
        files.safe_load_pickle(pickle.dumps(eval), "x.pkl")


def test_missing_file_says_where_to_put_it(tmp_path):
    with pytest.raises(FlatminError) as err:
        load_dataset("svhn", data_dir=tmp_path)
    msg = str(err.value)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        assert str(tmp_path / name) in msg
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in msg and "download" in msg


def test_svhn_round_trips_and_maps_label_10_to_digit_0(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for name, n in (("train_32x32.mat", 40), ("test_32x32.mat", 12)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.r_[10, rng.integers(1, 11, n - 1)].astype(np.uint8).reshape(n, 1)
        savemat(tmp_path / name, {"X": X, "y": y})
        x_t, y_t = files.read_svhn_mat(tmp_path / name)
        assert torch.equal(x_t, torch.from_numpy(X.transpose(3, 2, 0, 1).copy()))
        assert y_t.dtype == torch.int64 and int(y_t[0]) == 0 and int(y_t.max()) <= 9
        assert torch.equal(y_t, torch.from_numpy(y.ravel().astype(np.int64) % 10))
    ds = load_dataset("svhn", data_dir=tmp_path, val_fraction=0.25, verify=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 12)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(FlatminError, match="test_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path, verify=False)


def _ppm(img: np.ndarray, comment: bool = False) -> bytes:
    h, w, _ = img.shape
    return (b"P6\n" + (b"# made by a test\n" if comment else b"") + f"{w} {h}\n255\n".encode()
            + img.astype(np.uint8).tobytes())


def make_gtsrb(root):
    """Three classes (0, 5, 42) of constant-colour images of odd sizes, plus one 32×32 photo."""
    rng = np.random.default_rng(3)
    colours, train_labels, sizes = [], [], [(30, 35), (45, 40), (64, 51)]
    photo = rng.integers(0, 256, (32, 32, 3))
    with zipfile.ZipFile(root / "GTSRB_Final_Training_Images.zip", "w") as zf:
        for cls in (0, 5, 42):
            d = f"GTSRB/Final_Training/Images/{cls:05d}"
            rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
            for i, (h, w) in enumerate(sizes):
                c = rng.integers(0, 256, 3)
                img = photo if (cls, i) == (5, 1) else np.broadcast_to(c, (h, w, 3))
                zf.writestr(f"{d}/00000_{i:05d}.ppm", _ppm(img, comment=i == 0))
                rows.append(f"00000_{i:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{cls}")
                colours.append(photo if img is photo else np.broadcast_to(c, (32, 32, 3)))
                train_labels.append(cls)
            zf.writestr(f"{d}/GT-{cls:05d}.csv", "\n".join(rows) + "\n")
    test = [(f"{i:05d}.ppm", int(rng.integers(0, 43)), rng.integers(0, 256, 3)) for i in range(4)]
    with zipfile.ZipFile(root / "GTSRB_Final_Test_Images.zip", "w") as zf:
        for name, _, c in test:
            zf.writestr(f"GTSRB/Final_Test/Images/{name}", _ppm(np.broadcast_to(c, (40, 33, 3))))
    order = [2, 0, 3, 1]  # the GT file need not follow the zip's order
    with zipfile.ZipFile(root / "GTSRB_Final_Test_GT.zip", "w") as zf:
        zf.writestr("GT-final_test.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                    + "".join(f"{test[i][0]};33;40;1;1;30;37;{test[i][1]}\n" for i in order))
    return colours, train_labels, [test[i] for i in order]


def test_gtsrb_round_trips_through_its_official_zip_layout(tmp_path):
    colours, labels, test = make_gtsrb(tmp_path)
    ds = load_dataset("gtsrb", data_dir=tmp_path, val_fraction=0.0, verify=False)
    assert ds.num_classes == 43 and ds.train.x.shape == (9, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.tolist() == labels
    # constant colours survive the antialiased resize exactly; a 32×32 image is left as it is
    expect = torch.from_numpy(np.stack(colours).astype(np.uint8)).permute(0, 3, 1, 2)
    assert torch.equal(ds.train.x, expect)
    assert ds.test.y.tolist() == [c for _, c, _ in test]
    expect = torch.tensor(np.stack([c for _, _, c in test]), dtype=torch.uint8)
    assert torch.equal(ds.test.x[:, :, 0, 0], expect) and torch.equal(ds.test.x[:, :, -1, -1], expect)


def test_ppm_decoder_rejects_damage_and_scales_16_bit():
    img = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    assert torch.equal(files.decode_ppm(_ppm(img)), torch.from_numpy(img).to(torch.uint8).permute(
        2, 0, 1))
    with pytest.raises(FlatminError, match="truncated"):
        files.decode_ppm(_ppm(img)[:-1], "a.ppm")
    with pytest.raises(FlatminError, match="not a binary PPM"):
        files.decode_ppm(b"P3\n1 1\n255\n0 0 0", "a.ppm")
    deep = b"P6 1 1 65535\n" + np.array([65535, 0, 32896], ">u2").tobytes()
    assert files.decode_ppm(deep).flatten().tolist() == [255, 0, 128]


def test_download_without_network_says_what_to_put_where(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise URLError("Temporary failure in name resolution")

    monkeypatch.setattr(dl, "urlopen", offline)
    with pytest.raises(FlatminError) as err:
        load_dataset("gtsrb", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert "could not download" in msg and "name resolution" in msg
    for r in dl.FILES["gtsrb"]:  # every file still to fetch: its full path and its URL
        assert str(tmp_path / r.name) in msg and r.url in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_writes_the_verified_file_atomically(tmp_path, monkeypatch):
    payload = b"not really svhn" * 1000
    monkeypatch.setattr(dl, "urlopen", lambda url, timeout=None: _Response(payload))
    dest = tmp_path / "sub" / "train_32x32.mat"
    with pytest.raises(FlatminError, match="md5"):  # the official checksum does not match
        dl.download("http://x/train_32x32.mat", dest, progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    monkeypatch.setitem(dl.CHECKSUMS, dest.name, hashlib.md5(payload).hexdigest())
    assert dl.download("http://x/train_32x32.mat", dest, progress=False) == dest
    assert dest.read_bytes() == payload

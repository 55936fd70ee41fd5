"""Readers for the paper datasets' official distribution files, straight from the archives."""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flatmin.errors import FlatminError

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train (uint8 NCHW), y_train, x_test, y_test


def _numpy_core():
    """numpy>=2 renamed numpy.core to numpy._core; the CIFAR pickles name the old one."""
    return getattr(np, "_core", None) or np.core


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a data file must never run code."""

    def find_class(self, module: str, name: str):
        core = _numpy_core()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): __import__("codecs").encode,  # bytes under pickle protocol 2
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return allowed[(module, name)]


def safe_load_pickle(data: bytes, where: str) -> object:
    """Load a CIFAR batch; anything beyond arrays and containers is an error naming the file."""
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # UnpicklingError, EOFError, ValueError from a damaged array
        raise FlatminError(f"{where} is not a CIFAR data pickle ({err})") from err


def read_cifar(path: Path, fine: bool = False) -> Arrays:
    """Read cifar-10/100-python.tar.gz member by member in one pass; CIFAR-100 uses fine labels."""
    label_key = b"fine_labels" if fine else b"labels"
    train_names = ("train",) if fine else tuple(f"data_batch_{i}" for i in range(1, 6))
    wanted = {*train_names, "test" if fine else "test_batch"}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                base = PurePosixPath(member.name).name
                if not (member.isfile() and base in wanted):
                    continue
                where = f"{path}:{member.name}"
                batch = safe_load_pickle(tar.extractfile(member).read(), where)
                if not isinstance(batch, dict) or not {b"data", label_key} <= batch.keys():
                    raise FlatminError(f"{where} lacks the keys b'data' and {label_key!r}")
                found[base] = batch
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise FlatminError(f"{path} is not a readable tar.gz archive ({err}); "
                           "delete it and download it again") from err
    if missing := wanted - set(found):
        raise FlatminError(f"{path} lacks the members {sorted(missing)}")

    def stack(names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        x = np.concatenate([np.asarray(found[n][b"data"], dtype=np.uint8) for n in names])
        y = np.concatenate([np.asarray(found[n][label_key], dtype=np.int64) for n in names])
        return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y)

    return (*stack(train_names), *stack(("test",) if fine else ("test_batch",)))


def read_svhn_mat(path: Path) -> tuple[Tensor, Tensor]:
    """SVHN stores X as H×W×C×N and labels 1..10, where 10 is the digit 0."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise FlatminError("SVHN needs scipy: pip install flatmin[data]") from err
    try:
        mat = loadmat(path, variable_names=["X", "y"])
        x, y = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"]).reshape(-1)
    except Exception as err:  # scipy raises ValueError/MatReadError/OSError/KeyError on damage
        raise FlatminError(f"{path} is not a readable SVHN .mat file ({err}); "
                           "delete it and download it again") from err
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise FlatminError(f"{path}: X has shape {x.shape}, expected 32x32x3xN with N={len(y)}")
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64) % 10)


def decode_ppm(data: bytes, where: str = "PPM") -> Tensor:
    """Decode a binary (P6) PPM to a uint8 3×H×W tensor; GTSRB ships nothing else."""
    fields: list[bytes] = []
    pos = 2
    if data[:2] != b"P6":
        raise FlatminError(f"{where} is not a binary PPM (P6) image")
    while len(fields) < 3:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        end = pos
        while end < len(data) and data[end : end + 1].isdigit():
            end += 1
        if end == pos:
            raise FlatminError(f"{where} has a malformed PPM header")
        fields.append(data[pos:end])
        pos = end
    w, h, maxval = (int(f) for f in fields)
    pos += 1  # the single whitespace byte after maxval
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
    n = w * h * 3
    if len(data) - pos < n * dtype.itemsize or not 0 < maxval < 65536:
        raise FlatminError(f"{where} is truncated or has a bad PPM header")
    px = np.frombuffer(data, dtype=dtype, count=n, offset=pos).astype(np.float64)
    if maxval != 255:
        px = np.round(px * (255.0 / maxval))
    return torch.from_numpy(px.astype(np.uint8).reshape(h, w, 3).transpose(2, 0, 1).copy())


def resize32(img: Tensor) -> Tensor:
    """Bilinear, antialiased resize of a uint8 3×H×W image to 3×32×32 (GTSRB sizes vary)."""
    out = F.interpolate(img[None].float(), size=(32, 32), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def _read_gt_csv(text: str, where: str) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of a GTSRB ground-truth CSV (';'-separated, with a header)."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter=";"))
    try:
        return [(r["Filename"], int(r["ClassId"])) for r in rows]
    except (KeyError, TypeError, ValueError) as err:
        raise FlatminError(f"{where} lacks the Filename;...;ClassId columns ({err})") from err


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise FlatminError(f"{path} is not a readable zip archive ({err}); "
                           "delete it and download it again") from err


def _images(zf: zipfile.ZipFile, path: Path, names: list[str]) -> Tensor:
    """Decode and resize one by one on one thread: for tiny images, thread start-up costs 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.stack([resize32(decode_ppm(zf.read(n), f"{path}:{n}")) for n in names])
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as err:
        raise FlatminError(f"{path}: cannot read an image ({err}); the archive is damaged") from err
    finally:
        torch.set_num_threads(threads)


def read_gtsrb(train_zip: Path, test_zip: Path, gt_zip: Path) -> Arrays:
    """GTSRB from its three official zips: per-class GT-000NN.csv for training, one CSV for test."""
    with _open_zip(train_zip) as zf:
        names, labels = [], []
        for csv_name in sorted(n for n in zf.namelist() if PurePosixPath(n).name.startswith("GT-")
                               and n.endswith(".csv")):
            folder = PurePosixPath(csv_name).parent
            text = zf.read(csv_name).decode("utf-8-sig")
            for fname, cls in _read_gt_csv(text, f"{train_zip}:{csv_name}"):
                names.append(str(folder / fname))
                labels.append(cls)
        if not names:
            raise FlatminError(f"{train_zip} has no Final_Training/Images/000NN/GT-000NN.csv")
        x_train, y_train = _images(zf, train_zip, names), torch.tensor(labels)
    with _open_zip(gt_zip) as zf:
        csvs = [n for n in zf.namelist() if n.endswith("GT-final_test.csv")]
        if not csvs:
            raise FlatminError(f"{gt_zip} does not contain GT-final_test.csv")
        rows = _read_gt_csv(zf.read(csvs[0]).decode("utf-8-sig"), f"{gt_zip}:{csvs[0]}")
    with _open_zip(test_zip) as zf:
        by_base = {PurePosixPath(n).name: n for n in zf.namelist() if n.endswith(".ppm")}
        if missing := [f for f, _ in rows if f not in by_base][:3]:
            raise FlatminError(f"{test_zip} lacks images listed in GT-final_test.csv: {missing}")
        x_test = _images(zf, test_zip, [by_base[f] for f, _ in rows])
    return x_train, y_train, x_test, torch.tensor([c for _, c in rows])

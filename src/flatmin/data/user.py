"""The user's own data — `npz:PATH`, `folder:PATH`, `csv:PATH` — behind the same `load_dataset`.

Every form gives train and test splits (val optional: without it `val_fraction` of train is held
out, as for the registry datasets), integer class ids 0..K−1 (K = the largest id + 1), and:
- uint8 images N×C×H×W (from `folder:`, or a uint8 4-D `npz:` array) normalised per channel from
  the training split, as the registry's images are;
- anything else as float32, standardised from the training split: per feature for N×D, per
  channel (axis 1) for N×C×…, so a model sees zero-mean, unit-variance inputs.
Decoded tensors are cached under `<data_dir>/user-cache/`, keyed by the sha256 of the resolved path,
the options and every source file's relative path, size and mtime (no content hash: a changed file
changes size or mtime; reading every image to hash it would cost what the cache saves).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatmin.checks import MAX_CLASSES, check_bytes, digest
from flatmin.data.decoded import SPLITS, Arrays
from flatmin.data.download import default_data_dir
from flatmin.data.images import read_folder
from flatmin.data.registry import USER_KINDS, Dataset, Split, holdout, with_transform
from flatmin.data.tabular import read_csv
from flatmin.errors import FlatminError, FlatminWarning

KINDS = ("npz", "folder", "csv")
OPTIONS = {"npz": ("layout",), "folder": ("image_size",), "csv": ("label_column", "categorical")}
# CPU-sized like `digits`; every one overridable on the command line.
DEFAULTS = {"epochs": 30, "lr": 0.05, "batch_size": 50, "weight_decay": 1e-4}
DEFAULT_MODEL = "mlp"  # works on any input shape; images usually want --model preactresnet18 or yours
LAYOUTS = ("nchw", "nhwc")
CACHE_VERSION = 2  # 2: inputs checked finite, CSV text labels mapped, index column dropped, digest


def class_ids(name: str, y: np.ndarray) -> Tensor:
    """Labels as int64 class ids; anything else (strings, 2.5, −1) is the user's to fix, named."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise FlatminError(f"{name} must be a vector of class ids, got shape {tuple(y.shape)}")
    if y.dtype.kind not in "iubf":
        raise FlatminError(f"{name} holds non-numeric labels (dtype {y.dtype}, e.g. {y.flat[0].item()!r}); "
                           "labels must be integer class ids 0..K-1")
    if y.dtype.kind == "f" and (bad := ~np.isfinite(y) | (y != np.round(y))).any():
        raise FlatminError(f"{name} holds a label that is not a class id ({y[np.argmax(bad)].item()!r}); "
                           "labels must be integer class ids 0..K-1")
    if len(y) and y.min() < 0:
        raise FlatminError(f"{name} holds a negative label ({y.min()}); labels must be class ids 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


def features(name: str, x: np.ndarray) -> Tensor:
    """Numeric inputs as float32 (uint8 kept for images); object/string arrays are named."""
    if x.dtype.kind not in "iufb":
        raise FlatminError(f"{name} has dtype {x.dtype}; inputs must be numeric arrays")
    if x.dtype == np.uint8 and x.ndim == 4:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind == "f" and not (finite := np.isfinite(x)).all():
        where = np.unravel_index(np.argmin(finite), x.shape)
        raise FlatminError(f"{name} holds {x[where].item()} at index {tuple(int(i) for i in where)}; inputs "
                           "must be finite (fill or drop the missing values first)")
    x = np.ascontiguousarray(x, dtype=np.float32)  # a transposed (NHWC) array: one memory order
    return torch.from_numpy(x.reshape(len(x), 1) if x.ndim == 1 else x)


def declared_sizes(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each array's shape and byte size as its .npy header declares them, read before any array is:
    a header that claims more than the member holds, or more than `memory_limit`, is named."""
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                    start = f.tell()
                nbytes = math.prod(shape) * dtype.itemsize
                name = info.filename[:-4]
                check_bytes(nbytes, f"{path}: {name} (shape {shape}, {dtype})")
                if nbytes != info.file_size - start:
                    raise FlatminError(f"{path}: {name} declares shape {shape} of {dtype} ({nbytes:,} bytes) "
                                       f"but holds {max(info.file_size - start, 0):,} bytes; the file is "
                                       "damaged or not written by numpy.savez")
                out[name] = (shape, nbytes)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise FlatminError(f"cannot read {path} as .npz of numeric arrays: "
                           f"{err or type(err).__name__} (an .npz is a zip written by numpy.savez)") from None
    check_bytes(sum(n for _, n in out.values()), f"{path} (all arrays)")
    return out


def read_npz(path: Path, layout: str | None = None) -> Arrays:
    """x_train, y_train, x_test, y_test (+ x_val, y_val); 4-D x is images, channels-first unless
    the last axis has 1, 3 or 4 entries and axis 1 does not (``layout`` overrides)."""
    if layout is not None and layout not in LAYOUTS:
        raise FlatminError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    declared_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            present = set(z.files)
            need = ["x_train", "y_train", "x_test", "y_test"]
            if missing := [k for k in need if k not in present]:
                raise FlatminError(f"{path} lacks {', '.join(missing)} "
                                   f"(it has: {', '.join(sorted(present))})")
            if ("x_val" in present) != ("y_val" in present):
                raise FlatminError(f"{path} has only one of x_val, y_val; give both or neither")
            raw = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in SPLITS if f"x_{s}" in present}
    except (OSError, ValueError, EOFError) as err:  # not a zip, or object arrays (allow_pickle=False)
        raise FlatminError(f"cannot read {path} as .npz of numeric arrays: {err}") from None
    shape = raw["train"][0].shape
    if layout is not None and len(shape) != 4:
        raise FlatminError(f"layout={layout!r} applies to 4-D image arrays; x_train has shape {shape}")
    if len(shape) == 4 and (layout == "nhwc" or layout is None and shape[3] in (1, 3, 4)
                            and shape[1] not in (1, 3, 4)):
        raw = {s: (x.transpose(0, 3, 1, 2), y) for s, (x, y) in raw.items()}
    splits = {}
    for s, (x, y) in raw.items():
        if len(x) != len(y) or not len(x):
            raise FlatminError(f"{path}: x_{s} has {len(x)} examples and y_{s} {len(y)}; need the same "
                               "number, at least one")
        if x.shape[1:] != raw["train"][0].shape[1:]:
            raise FlatminError(f"{path}: x_{s} examples have shape {x.shape[1:]}, x_train's "
                               f"{raw['train'][0].shape[1:]}")
        splits[s] = (features(f"{path}: x_{s}", x), class_ids(f"{path}: y_{s}", y))
    return Arrays(splits)


class UserLoader:
    """`Loader`'s interface for files the user names; classes and shape come from the files."""

    defaults = DEFAULTS
    default_model = DEFAULT_MODEL

    def __init__(self, kind: str, path: str) -> None:
        if not path:
            raise FlatminError(f"--dataset {kind}: needs a path, e.g. {kind}:~/my_data")
        self.kind, self.name = kind, f"{kind}:{path}"
        self.path = Path(path).expanduser().resolve()
        self.options = OPTIONS[kind]

    def source_files(self) -> list[Path]:
        """The files whose size and mtime key the cache (missing splits are named by the reader)."""
        if self.kind == "npz":
            if not self.path.is_file():
                raise FlatminError(f"no such file: {self.path}")
            return [self.path]
        if not self.path.is_dir():
            raise FlatminError(f"no such folder: {self.path}")
        if self.kind == "csv":
            return sorted(self.path / f"{s}.csv" for s in SPLITS if (self.path / f"{s}.csv").is_file())
        return sorted(p for s in SPLITS if (self.path / s).is_dir() for p in (self.path / s).rglob("*")
                      if p.is_file())

    def fingerprint(self, **options: Any) -> str:
        """The cache key: path, options, and each file's relative path, size and mtime."""
        h = hashlib.sha256(json.dumps([CACHE_VERSION, self.kind, str(self.path),
                                       sorted(options.items())]).encode())
        for p in self.source_files():
            st = p.stat()
            h.update(f"{p.relative_to(self.path.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]

    def read(self, cache: Path, **options: Any) -> Arrays:
        """Decoded splits, from the cache when the key matches, else decoded and cached."""
        file = cache / f"{self.kind}-{self.fingerprint(**options)}.pt"
        if file.is_file():
            try:
                p = torch.load(file, weights_only=True)
                if p.pop("digest") == digest(p):  # a changed byte: rebuilt, never trusted
                    return Arrays({k: tuple(v) for k, v in p["splits"].items()}, p["classes"], p["notes"])
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never trusted
                pass
        if self.kind == "npz":
            arrays = read_npz(self.path, options.get("layout"))
        elif self.kind == "csv":
            arrays = read_csv(self.path, options.get("label_column"), options.get("categorical", "error"))
        else:
            arrays = read_folder(self.path, options.get("image_size"))
        cache.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        payload = arrays.to_payload()
        torch.save({**payload, "digest": digest(payload)}, tmp)
        os.replace(tmp, file)  # atomic: a concurrent reader sees the old entry or the whole new one
        return arrays

    def __call__(self, *, data_dir: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0,
                 augment: str = "standard", download: bool = False, **options: Any) -> Dataset:
        """Read (or reuse the cache), hold out val if the files have none, normalise from train."""
        if unknown := sorted(set(options) - set(self.options)):
            raise FlatminError(f"{self.kind}: datasets take no option(s) {', '.join(unknown)}; "
                               f"their options: {', '.join(self.options)}")
        if augment not in ("none", "standard"):  # the paper's augmentations are per paper dataset
            raise FlatminError(f"augment={augment!r} is defined for the paper datasets; your data takes "
                               "'none' or 'standard' (both: no augmentation)")
        options = {k: v for k, v in options.items() if v is not None}
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        arrays = self.read(root / "user-cache", **options)
        for note in arrays.notes:
            warnings.warn(note, FlatminWarning, stacklevel=2)
        x, y = arrays.splits["train"]
        if "val" in arrays.splits:
            train, val = Split(x, y), Split(*arrays.splits["val"])
        else:
            train, val = holdout(Split(x, y), val_fraction, seed)
        test = Split(*arrays.splits["test"])
        num_classes = check_label_ranges(self.name, {"train": train, "val": val, "test": test},
                                         arrays.classes)
        if x.dtype != torch.uint8:
            standardise(train, val, test)
        ds = Dataset(self.name, train, val, test, num_classes, tuple(x.shape[1:]), self.default_model,
                     dict(self.defaults), classes=arrays.classes)
        return with_transform(ds, augment)


def check_label_ranges(name: str, splits: dict[str, Split | None], classes: list[str] | None = None) -> int:
    """The number of classes K (train's largest id + 1), once every split's labels are checked against
    train's before any allocation: ids below `MAX_CLASSES`, no split with an id train never had, at
    least two classes; ids train skips (labels 1..K, say) are a warning: an empty class is an output
    the model learns to never predict."""
    top = {s: int(sp.y.max()) for s, sp in splits.items() if sp is not None and len(sp)}
    worst = max(top, key=top.get)
    if top[worst] >= MAX_CLASSES:
        raise FlatminError(f"{name}: y_{worst} holds label {top[worst]}; class ids must be "
                           f"0..{MAX_CLASSES - 1} (at most {MAX_CLASSES} classes)")
    present = torch.unique(splits["train"].y)
    if len(present) < 2:
        raise FlatminError(f"{name}: the training split has a single class; need at least two")
    k = top["train"] + 1
    if extra := [s for s in top if top[s] >= k]:
        raise FlatminError(f"{name}: y_{extra[0]} holds label {top[extra[0]]}, which the training split "
                           f"never has (its labels are 0..{k - 1}); a model cannot learn a class it never "
                           "sees")
    if len(present) < k:
        missing = sorted(set(range(k)) - set(present.tolist()))
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        names = f" ({', '.join(classes)})" if classes else ""
        warnings.warn(f"{name}: the training labels skip class id(s) {shown}{names}; the model gets {k} "
                      f"outputs, {len(missing)} of them for classes with no example (labels are class "
                      "ids 0..K-1: subtract the smallest, or map them)", FlatminWarning, stacklevel=2)
    return k


def standardise(train: Split, *others: Split | None) -> None:
    """Zero mean, unit variance from the training split: per feature (N×D), per channel (N×C×…)."""
    x = train.x
    dims = [0] if x.dim() == 2 else [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature becomes 0, not NaN
    for s in (train, *others):
        if s is not None:
            s.x = (s.x - mean) / std


USER_KINDS.update({kind: partial(UserLoader, kind) for kind in KINDS})  # what get_loader resolves

"""A table (`csv:DIR` with train.csv, test.csv, optional val.csv) as float32 features and class ids.

Every column but the label column is a feature, except a first column that is pandas' row index: no
name (``to_csv`` writes the index there), ``Unnamed: 0`` (a table read by pandas and saved again), or
``index``/``id`` holding exactly the row numbers; it is read as the index (named ``(index)``, with a
warning), never as a feature. Labels are class ids 0..K-1, or text (``versicolor``): then the sorted
names of train.csv are the classes, a name's id is its index, and the mapping is saved with the run. A
column is categorical when some value in train.csv is not a number: with ``categorical="error"`` (default)
that is an error naming it; with ``"onehot"`` it becomes one 0/1 feature per value seen in
train.csv (a value seen only in val/test gets all zeros). Empty cells in numeric columns are
errors, never silently 0.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatmin.checks import check_bytes
from flatmin.data.decoded import SPLITS, Arrays
from flatmin.errors import FlatminError

CATEGORICAL = ("error", "onehot")
INDEX = "(index)"  # the name given to an unnamed leading column (pandas' row index)


def _number(value: str) -> float | None:
    """The cell as a number; None for text; empty and NaN/inf cells are missing values (NaN)."""
    try:
        v = float(value) if value.strip() else float("nan")
    except ValueError:
        return None
    return v if np.isfinite(v) else float("nan")


def _missing(path: Path, column: str, line: int) -> FlatminError:
    """A gap in a numeric column: never silently 0."""
    return FlatminError(f"{path} line {line}: column {column!r} has a missing value (empty, nan or inf); "
                        "fill or drop it first")


def read_csv(root: Path, label_column: str | None = None, categorical: str = "error") -> Arrays:
    """The splits of ``root``; a missing file, column or bad cell is named with file and line."""
    label = label_column or "label"
    if categorical not in CATEGORICAL:
        raise FlatminError(f"categorical must be one of {', '.join(CATEGORICAL)}, got {categorical!r}")
    header: list[str] | None = None
    tables: dict[str, tuple[Path, list[list[str]]]] = {}
    for s in SPLITS:
        path = root / f"{s}.csv"
        if not path.is_file():
            if s == "val":
                continue
            raise FlatminError(f"{root} has no {s}.csv (csv: datasets need train.csv and test.csv, "
                               "val.csv optional)")
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as err:
            raise FlatminError(f"{path} is not a text CSV file ({type(err).__name__}: {err}); "
                               "save it as UTF-8 text with a header row") from None
        if len(rows) < 2:
            raise FlatminError(f"{path} has no rows" + (" (only a header)" if rows else ""))
        names = [n.strip() for n in rows[0]]
        if names and _index_name(names[0], [r[0] for r in rows[1:] if r]):
            names[0] = INDEX  # pandas' to_csv: a leading column holding the row index
        if unnamed := [i + 1 for i, n in enumerate(names) if not n]:
            raise FlatminError(f"{path}: column {unnamed[0]} has no name in the header; name every column")
        if header is None:
            header = names
            if label not in header:
                raise FlatminError(f"{path} has no label column {label!r} (columns: "
                                   f"{', '.join(header)}); choose one with --label-column")
        elif names != header:
            raise FlatminError(f"{path} has columns {names}, train.csv has {header}")
        for line, row in enumerate(rows[1:], 2):
            if len(row) != len(header):
                raise FlatminError(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
        tables[s] = (path, rows[1:])
    li = header.index(label)
    notes = [f"{root}: the first column ({_first_name(root)!r}) is read as the row index (pandas' to_csv "
             "writes one) and not used as a feature; give it another name in the header to use it"
             ] if _index(header, label) else []
    features = [i for i in range(len(header)) if i not in (li, *_index(header, label))]
    path, train_rows = tables["train"]
    names = label_names(tables, li)
    categories: dict[int, list[str]] = {}
    for i in features:
        values = [_number(row[i]) for row in train_rows]
        bad = next((r for r, v in enumerate(values) if v is None), None)
        if bad is None:
            if (gap := next((r for r, v in enumerate(values) if np.isnan(v)), None)) is not None:
                raise _missing(path, header[i], gap + 2)
            continue
        if categorical == "error":
            raise FlatminError(f"{path}: column {header[i]!r} is not numeric (line {bad + 2}: "
                               f"{train_rows[bad][i]!r}); flatmin reads numeric columns only: drop it, "
                               "encode it, or pass --categorical onehot")
        categories[i] = sorted({row[i] for row in train_rows})
    splits = {s: _parse(p, header, rows, li, features, categories, names) for s, (p, rows) in tables.items()}
    return Arrays(splits, names, notes)


def _index_name(name: str, column: list[str]) -> bool:
    """A leading column pandas wrote as the row index: no name (``to_csv``), ``Unnamed: 0`` (a table read
    with pandas and saved again), or ``index``/``id`` holding exactly the row numbers 0..n-1 or 1..n."""
    if not name or re.fullmatch(r"Unnamed: \d+", name):
        return True
    if name.lower() not in ("index", "id"):
        return False
    try:
        values = [int(v) for v in column]
    except ValueError:
        return False
    return values == list(range(len(values))) or values == list(range(1, len(values) + 1))


def _first_name(root: Path) -> str:
    """The train.csv header's first name as written (for the note)."""
    with open(root / "train.csv", newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f))[0].strip()


def _index(header: list[str], label: str) -> tuple[int, ...]:
    """The position of the unnamed row-index column, if the table has one (and it is not the label)."""
    return (0,) if header[0] == INDEX and label != INDEX else ()


def label_names(tables: dict[str, tuple[Path, list[list[str]]]], li: int) -> list[str] | None:
    """Text labels (``versicolor``) as class names, sorted, so that a name's class id is its index;
    None when every label in train.csv is a number (class ids as written). A split naming a class
    train.csv lacks is named."""
    path, rows = tables["train"]
    if all(_number(row[li]) is not None for row in rows):
        return None
    names = sorted({row[li].strip() for row in rows})
    for p, other in tables.values():
        if unknown := sorted({r[li].strip() for r in other} - set(names)):
            raise FlatminError(f"{p}: label {unknown[0]!r} is not among train.csv's labels "
                               f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
    return names


def _parse(path: Path, header: list[str], rows: list[list[str]], li: int, features: list[int],
           categories: dict[int, list[str]], names: list[str] | None) -> tuple[Tensor, Tensor]:
    """Features (one-hot blocks for categorical columns) and integer labels of one file (text labels:
    their index in ``names``)."""
    width = sum(len(categories[i]) if i in categories else 1 for i in features)
    check_bytes(len(rows) * width * 4, f"{path} ({len(rows)} rows x {width} features)")
    x = np.zeros((len(rows), width), dtype=np.float32)
    y = np.empty(len(rows), dtype=np.int64)
    index = {i: {v: k for k, v in enumerate(c)} for i, c in categories.items()}
    ids = {n: k for k, n in enumerate(names)} if names is not None else None
    for r, row in enumerate(rows):
        j = 0
        for i in features:
            if i in categories:
                k = index[i].get(row[i])
                if k is not None:
                    x[r, j + k] = 1.0
                j += len(categories[i])
                continue
            if (v := _number(row[i])) is None:
                raise FlatminError(f"{path}: column {header[i]!r} is not numeric (line {r + 2}: "
                                   f"{row[i]!r})")
            if np.isnan(v):
                raise _missing(path, header[i], r + 2)
            x[r, j] = v
            j += 1
        if ids is not None:
            y[r] = ids[row[li].strip()]
            continue
        v = _number(row[li])
        if v is None or np.isnan(v) or not v.is_integer() or v < 0:
            raise FlatminError(f"{path} line {r + 2}: label {row[li]!r} in column {header[li]!r} is "
                               "not a class id (labels must be integers 0..K-1)")
        y[r] = int(v)
    return torch.from_numpy(x), torch.from_numpy(y)

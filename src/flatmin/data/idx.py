"""IDX files (LeCun's format; MNIST, Fashion-MNIST, KMNIST), gzip-compressed or plain.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian int32 per dimension, then the values in C order. The data sets here use only the
unsigned-byte type (0x08): images N×28×28 (idx3) and labels N (idx1).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatmin.data.files import Arrays
from flatmin.errors import FlatminError

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    """The file's IDX bytes, gunzipped when it starts with the gzip magic."""
    try:
        data = Path(path).read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise FlatminError(f"{path} is not a readable IDX file ({err}); it is truncated or "
                           "corrupt: delete it and download it again") from err


def read_idx(path: Path) -> Tensor:
    """One IDX file as a tensor of its own shape; any damage is an error naming the file."""
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _TYPES:
        raise FlatminError(f"{path} is not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim, dtype = data[3], np.dtype(_TYPES[data[2]])
    if len(data) < 4 + 4 * ndim:
        raise FlatminError(f"{path} is truncated: its header ends after {len(data)} bytes")
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    need = math.prod(shape) * dtype.itemsize
    have = len(data) - 4 - 4 * ndim
    if min(shape, default=0) < 0 or have != need:
        raise FlatminError(f"{path} is truncated or corrupt: shape {shape} needs {need} bytes of "
                           f"values, the file has {have}")
    values = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


def _pair(images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    """Images as uint8 N×1×H×W and labels as int64, checked to belong together."""
    x, y = read_idx(images), read_idx(labels)
    if x.dim() != 3 or x.dtype != torch.uint8:
        raise FlatminError(f"{images} holds {x.dtype} {tuple(x.shape)}, expected uint8 N×H×W images")
    if y.dim() != 1 or len(y) != len(x):
        raise FlatminError(f"{labels} holds {len(y)} labels of shape {tuple(y.shape)} for the "
                           f"{len(x)} images of {images}")
    return x.unsqueeze(1), y.long()


def read_idx_dataset(train_x: Path, train_y: Path, test_x: Path, test_y: Path,
                     num_classes: int = 10) -> Arrays:
    """The four files of an MNIST-style data set, in the official order; labels must fit."""
    out = (*_pair(train_x, train_y), *_pair(test_x, test_y))
    for y, where in ((out[1], train_y), (out[3], test_y)):
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
            raise FlatminError(f"{where} has labels outside 0..{num_classes - 1}")
    return out

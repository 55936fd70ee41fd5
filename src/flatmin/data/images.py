"""An image folder (`PATH/{train,test[,val]}/<class>/*.png|jpg…`) decoded with Pillow into uint8 NCHW.

Classes are the sorted folder names under train/; val/ and test/ may lack a class but not add one.
Channels: 1 when every image is greyscale (Pillow modes 1, L, LA, I, I;16, F), else 3 (RGB; alpha
and palettes converted by Pillow). Sizes must all match unless ``image_size`` resizes every image
to image_size × image_size (bilinear).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flatmin.checks import IMAGE_SIZE, check_bytes
from flatmin.data.decoded import Arrays
from flatmin.errors import FlatminError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _pillow():
    """Pillow, or the install line for it."""
    try:
        from PIL import Image
    except ImportError:
        raise FlatminError("folder: datasets need Pillow: pip install 'flatmin[images]'") from None
    return Image


def list_images(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split, (file, class id); a missing split or empty class is named."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        missing = [s for s in ("train", "test") if not (root / s).is_dir()]
        raise FlatminError(f"{root} has no {' or '.join(s + '/' for s in missing)} folder "
                           "(folder: datasets need train/<class>/ and test/<class>/, val/ optional)")
    classes: list[str] = []
    splits: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "val", "test"):
        d = root / split
        if not d.is_dir():
            continue
        names = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise FlatminError(f"{d} has no class folders (expected {d}/<class>/*.png)")
        if split == "train":
            classes = names
        elif extra := [n for n in names if n not in classes]:
            raise FlatminError(f"{d} has class folder(s) {', '.join(extra)} that train/ lacks "
                               f"(train classes: {', '.join(classes)})")
        items = []
        for name in names:
            files = sorted(p for p in (d / name).iterdir()  # hidden: macOS ._x.png forks, not images
                           if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
            if not files:
                raise FlatminError(f"class folder {d / name} holds no images ({', '.join(EXTENSIONS)})")
            items += [(f, classes.index(name)) for f in files]
        splits[split] = items
    return classes, splits


def read_folder(root: Path, image_size: int | None = None) -> Arrays:
    """Decode every image once; unreadable files and mixed sizes (without image_size) are named."""
    if image_size is not None:
        IMAGE_SIZE.check(image_size, "image_size")
    image = _pillow()
    classes, splits = list_images(root)
    modes, first = set(), None
    for path, _ in (item for items in splits.values() for item in items):
        with _opened(image, path) as im:  # reads the header only
            modes.add(im.mode)
            size = im.size
        if first is None:
            first = (path, size)
        elif image_size is None and size != first[1]:
            raise FlatminError(f"images differ in size: {first[0]} is {first[1][0]}x{first[1][1]}, {path} "
                               f"is {size[0]}x{size[1]}; pass --image-size N to resize them all to NxN")
    mode = "L" if modes <= set(GREY_MODES) else "RGB"
    side = (image_size, image_size) if image_size is not None else first[1]
    count = sum(len(items) for items in splits.values())
    check_bytes(count * side[0] * side[1] * (1 if mode == "L" else 3),
                f"{root}: {count} images of {side[0]}x{side[1]} {mode}")
    out = {}
    for split, items in splits.items():
        x = np.stack([_decode(image, path, mode, image_size) for path, _ in items])
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        y = torch.tensor([c for _, c in items], dtype=torch.int64)
        out[split] = (torch.from_numpy(np.ascontiguousarray(x)), y)
    return Arrays(out, classes)


@contextmanager
def _opened(image, path: Path) -> Iterator[Any]:
    """An image opened (header read); unreadable data, or more pixels than Pillow's decompression-bomb
    limit, is one error naming the file and the limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image.DecompressionBombWarning)
            with image.open(path) as im:
                yield im
    except (image.DecompressionBombError, image.DecompressionBombWarning):
        raise FlatminError(f"image {path} declares more pixels than flatmin decodes (Pillow's limit, "
                           f"{image.MAX_IMAGE_PIXELS:,} pixels); shrink it or drop it") from None
    except (OSError, ValueError) as err:  # truncated or corrupt data fails at open() or later
        raise FlatminError(f"cannot read image {path}: {err}") from None


def _decode(image, path: Path, mode: str, size: int | None) -> np.ndarray:
    """One image as uint8 H×W (greyscale) or H×W×3."""
    with _opened(image, path) as im:
        im = im.convert(mode)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

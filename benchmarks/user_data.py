"""Writes an image folder and a CSV table from sklearn data, so `flatmin compare` can be measured on
"the user's own files" exactly as a user would run it.

    python benchmarks/user_data.py OUT          # OUT/digits/{train,test}/digitK/*.png, OUT/cancer/*.csv
    flatmin compare --dataset folder:OUT/digits --model OUT/nets.py:small_cnn --epochs 15 --seeds 3
    flatmin compare --dataset csv:OUT/cancer --label-column diagnosis --epochs 30 --seeds 3

digits: sklearn's 1,797 8x8 greyscale digits scaled to 0..255 PNGs, an 80/20 stratified split;
cancer: sklearn's breast-cancer table (569 x 30 numeric features, 2 classes), 75/25 stratified.
``OUT/nets.py`` holds a small CNN factory ``small_cnn(num_classes, input_shape)``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

NETS = '''"""A user's own model factory for `--model nets.py:small_cnn`."""
from torch import nn


def small_cnn(num_classes, input_shape):
    c = input_shape[0]
    return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4, num_classes))
'''


def write_digits(out: Path) -> int:
    """sklearn digits as PNGs in the folder: layout; returns the number of files."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    for split, xs, ys in (("train", xtr, ytr), ("test", xte, yte)):
        for i, (img, y) in enumerate(zip(xs, ys)):
            folder = out / split / f"digit{y}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    return len(x)


def write_cancer(out: Path) -> int:
    """sklearn breast cancer as train.csv/test.csv with a 'diagnosis' label column; returns rows."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    b = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(b.data, b.target, test_size=0.25, random_state=0, stratify=b.target)
    out.mkdir(parents=True, exist_ok=True)
    header = [*(n.replace(" ", "_") for n in b.feature_names), "diagnosis"]
    for split, xs, ys in (("train", xtr, ytr), ("test", xte, yte)):
        with open(out / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *([*map(float, r), int(t)] for r, t in zip(xs, ys))])
    return len(b.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    n_img, n_rows = write_digits(args.out / "digits"), write_cancer(args.out / "cancer")
    (args.out / "nets.py").write_text(NETS)
    print(f"{n_img} PNGs in {args.out / 'digits'}, {n_rows} rows in {args.out / 'cancer'}, "
          f"factory {args.out / 'nets.py'}:small_cnn")


if __name__ == "__main__":
    main()

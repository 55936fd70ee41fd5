"""Images/s of the batched CIFAR-10 augmentations, to see whether augmentation can bottleneck AMP.

    python benchmarks/augment_speed.py [--images 50000] [--repeats 3] [--threads N] [--json OUT]

Times passes over a random uint8 50k x 3 x 32 x 32 "dataset" already on the device, in
batches of 50 (the paper's batch size) and 256, on CPU and on CUDA when present, and keeps
the fastest of ``--repeats`` passes: on a shared machine the others are mostly noise.
"none" (normalisation only) is the baseline the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flatmin.data.augment import build_transform

AUGMENTS = ("none", "standard", "cutout", "autoaugment")
BATCHES = (50, 256)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images_per_second(data: torch.Tensor, augment: str, batch: int, repeats: int) -> float:
    """The fastest of ``repeats`` epochs of ``augment`` over ``data``, in images/s."""
    transform = build_transform("cifar10", augment, CIFAR10_MEAN, CIFAR10_STD)
    generator = torch.Generator().manual_seed(0)
    transform(data[:batch], train=True, generator=generator)  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if data.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for i in range(0, len(data), batch):
            transform(data[i : i + batch], train=True, generator=generator)
        sync()
        best = min(best, time.perf_counter() - start)
    return len(data) / best


def main(argv: list[str] | None = None) -> dict:
    """Measure every (device, augmentation, batch size) and print/write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per setting; best kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    data = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    results: dict = {
        "images": args.images,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "devices": {},
    }
    for device in devices:
        on_device = data.to(device)
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        table = {
            augment: {
                str(b): round(images_per_second(on_device, augment, b, args.repeats))
                for b in BATCHES
            }
            for augment in AUGMENTS
        }
        results["devices"][device] = {"name": name, "images_per_s": table}
        for augment, row in table.items():
            ratios = "  ".join(
                f"batch {b}: {row[b]:>9,} img/s ({row[b] / table['none'][b]:.2f}x none)"
                for b in row
            )
            print(f"{device:>4} {augment:>11}  {ratios}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

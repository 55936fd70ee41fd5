"""`flatmin landscape CKPT [CKPT ...] --out DIR`: loss landscapes of checkpoints along seeded random
directions, the AMP paper's Fig. 2 (`flatmin.analysis.landscape`)."""

from __future__ import annotations

import argparse

import numpy as np

from flatmin.analysis._common import load_runs
from flatmin.analysis.landscape import landscape_rows, plot_1d, plot_2d
from flatmin.checks import COUNT, POSITIVE, Number, check_out, name_list, out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.results.plot import write_csv, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin landscape`."""
    options.add_run_arguments(parser)
    parser.add_argument("--dim", type=int, choices=(1, 2), default=1, help="1-D curves or 2-D surfaces")
    parser.add_argument("--span", type=POSITIVE, default=1.0, help="α (and β) run over [-span, span]")
    parser.add_argument("--points", type=Number(int, 2), default=41, help="grid points per axis")
    parser.add_argument("--splits", default="train,test", help="comma-separated: train, test")
    parser.add_argument("--seed", type=COUNT, default=0,
                        help="seed of the directions (same for every run)")
    parser.add_argument("--out", type=options.path, required=True, help="folder for the PNGs, CSV and JSON")


def run(args: argparse.Namespace) -> int:
    """Landscapes of each checkpoint along the same seeded directions; figures + numbers."""
    splits = name_list(args.splits, "--splits")
    if args.span <= 0 or args.points < 2:
        raise FlatminError("--span must be > 0 and --points >= 2")
    check_out(args.out)
    runs = load_runs(args.checkpoints, args.device)  # a damaged checkpoint is refused before --out is made
    out = out_dir(args.out)
    rows = landscape_rows(runs, splits, np.linspace(-args.span, args.span, args.points), seed=args.seed,
                          dim=args.dim, max_examples=args.max_examples, batch_size=args.batch_size)
    stem = f"landscape_{args.dim}d"
    files = [write_csv(out / f"{stem}.csv", rows), write_json(out / f"{stem}.json", rows)]
    if args.dim == 1:
        files.append(plot_1d(rows, out / f"{stem}.png"))
    else:
        for i, r in enumerate(runs):
            files.append(plot_2d(rows, r.name, out / f"{stem}_{i}_{_slug(r.name)}.png"))
    for f in files:
        print(f"wrote {f}")
    return 0


def _slug(name: str) -> str:
    """A file-name-safe version of a run label."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")

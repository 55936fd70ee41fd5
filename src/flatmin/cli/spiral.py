"""`flatmin spiral --out DIR`: decision boundaries of ERM and AMP trained on the two-spiral problem,
side by side, the AMP paper's Fig. 6 (`flatmin.analysis.spiral`)."""

from __future__ import annotations

import argparse

from flatmin.analysis.spiral import spiral_figure
from flatmin.checks import NONNEGATIVE, POSITIVE_INT, Number, name_list, out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.train import TrainConfig, get_method
from flatmin.train.config import check_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin spiral` (every training flag except dataset and method)."""
    parser.add_argument("--out", type=options.path, required=True,
                        help="folder for spiral.png/.json, the grid CSV and the runs")
    parser.add_argument("--methods", default="erm,amp", help="methods side by side (default erm,amp)")
    parser.add_argument("--n-samples", type=POSITIVE_INT, default=None,
                        help="spiral points per split (default 600)")
    parser.add_argument("--noise", type=NONNEGATIVE, default=None, help="spiral noise (default 0.05)")
    parser.add_argument("--grid-points", type=Number(int, 2), default=121,
                        help="grid points per axis")
    options.add_threads_argument(parser)
    options.add_config_arguments(parser, skip=("--dataset", "--method"))


def run(args: argparse.Namespace) -> int:
    """Train ERM and AMP on the spiral and write the figure and its numbers."""
    options.use_threads(args.threads)
    if args.grid_points < 2:
        raise FlatminError(f"--grid-points must be >= 2, got {args.grid_points}")
    methods = tuple(name_list(args.methods, "--methods"))
    data = {k: v for k, v in (("n_samples", args.n_samples), ("noise", args.noise)) if v is not None}
    base = TrainConfig(**{**options.config_overrides(args), "dataset": "spiral", "dataset_options": data})
    check_config(base)
    for m in methods:
        get_method(m)  # an unknown name lists the valid ones, before anything is written
    result = spiral_figure(base, out_dir(args.out), methods, args.grid_points)
    for p in result["panels"]:
        print(f"{p['method']}: test error {p['test_error']:.2f}%, test NLL {p['test_nll']:.4f}, "
              f"train error {p['train_error']:.2f}%")
    for f in result["files"]:
        print(f"wrote {f}")
    return 0

"""`flatmin radius --epsilons 0,0.02,... --out DIR`: AMP trained over a range of radii, the final
train and test loss against ε, the AMP paper's Fig. 8 (`flatmin.analysis.radius`)."""

from __future__ import annotations

import argparse
import math

from flatmin.analysis._runs import print_table
from flatmin.analysis.radius import PAPER_INNER_ITER, PAPER_INNER_LR, plot_radius, radius_sweep
from flatmin.checks import out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.results.plot import write_csv, write_json
from flatmin.train import TrainConfig
from flatmin.train.config import check_config


def parse_epsilons(text: str) -> list[float]:
    """'0,0.02,0.05' -> sorted distinct radii, each >= 0."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise FlatminError(f"--epsilons must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise FlatminError(f"--epsilons needs at least one radius, all finite and >= 0; got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin radius` (every training flag but method and ε)."""
    parser.add_argument("--out", type=options.path, required=True,
                        help="folder for radius.png/.csv/.json and OUT/eps_<ε>/ runs")
    parser.add_argument("--epsilons", default="0,0.02,0.05,0.1,0.2,0.5,1",
                        help="comma-separated radii; 0 is the ERM run")
    options.add_threads_argument(parser)
    options.add_config_arguments(parser, skip=("--method", "--epsilon"))


def run(args: argparse.Namespace) -> int:
    """Train the sweep (resumable), then write the figure and the numbers."""
    options.use_threads(args.threads)
    epsilons = parse_epsilons(args.epsilons)
    overrides = {"inner_iter": PAPER_INNER_ITER, "inner_lr": PAPER_INNER_LR, **options.config_overrides(args)}
    base = check_config(TrainConfig(**overrides))
    out = out_dir(args.out)
    rows = radius_sweep(base, epsilons, out)
    title = f"{base.dataset}: AMP with N = {base.inner_iter}, ζ = {base.inner_lr:g}"
    files = [write_csv(out / "radius.csv", rows),
             write_json(out / "radius.json", {"inner_iter": base.inner_iter, "inner_lr": base.inner_lr,
                                              "rows": rows}),
             plot_radius(rows, out / "radius.png", title)]
    print_table(rows, [("epsilon", "eps", "g"), ("method", "method", ""), ("train_nll", "train NLL", ".4f"),
                       ("test_nll", "test NLL", ".4f"), ("test_error", "test err %", ".2f")])
    for f in files:
        print(f"wrote {f}")
    return 0

"""`flatmin sharpness CKPT [CKPT ...]`: top Hessian eigenvalue, Hessian trace and ε-sharpness of
checkpoints, as a table and (with --out) files and a figure (`flatmin.analysis.sharpness`)."""

from __future__ import annotations

import argparse

from flatmin.analysis._common import load_runs
from flatmin.analysis.sharpness import markdown, measure, plot_sharpness
from flatmin.checks import COUNT, POSITIVE, POSITIVE_INT, check_out, out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.results.plot import write_csv, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin sharpness`."""
    options.add_run_arguments(parser)
    parser.set_defaults(max_examples=1000)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--epsilon", type=POSITIVE, default=0.05,
                        help="radius of the ε-sharpness ball")
    parser.add_argument("--iters", type=POSITIVE_INT, default=100, help="power iterations for λ_max")
    parser.add_argument("--samples", type=POSITIVE_INT, default=100,
                        help="Hutchinson samples for the trace")
    parser.add_argument("--steps", type=POSITIVE_INT, default=20, help="ascent steps for ε-sharpness")
    parser.add_argument("--seed", type=COUNT, default=0, help="seed of the random vectors")
    parser.add_argument("--out", type=options.path, default=None,
                        help="folder for sharpness.csv and sharpness.json")


def run(args: argparse.Namespace) -> int:
    """Tabulate λ_max, tr(H) and ε-sharpness per checkpoint; plot them with --out."""
    if args.epsilon <= 0 or min(args.iters, args.samples, args.steps) < 1:
        raise FlatminError("--epsilon must be > 0 and --iters/--samples/--steps >= 1")
    if args.out:
        check_out(args.out)
    runs = load_runs(args.checkpoints, args.device)  # a damaged checkpoint is refused before --out is made
    out = out_dir(args.out) if args.out else None
    rows = [measure(r, split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
                    seed=args.seed, epsilon=args.epsilon, iters=args.iters, samples=args.samples,
                    steps=args.steps) for r in runs]
    print(markdown(rows))
    if out is not None:
        for f in (write_csv(out / "sharpness.csv", rows), write_json(out / "sharpness.json", rows),
                  plot_sharpness(rows, out / "sharpness.png")):
            print(f"wrote {f}")
    return 0

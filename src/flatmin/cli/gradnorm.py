"""`flatmin gradnorm RUN_DIR ... --out DIR` or `flatmin gradnorm --train --out DIR`: Theorem 2 along
training, ‖∇J(θ)‖ per epoch for ERM vs AMP and the implicit penalty Ω (`flatmin.analysis.gradnorm`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flatmin.analysis._runs import read_run_dir, train_runs
from flatmin.analysis.gradnorm import gradnorm_rows, omega_params, plot_gradnorm
from flatmin.checks import NONNEGATIVE, check_out, name_list, out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.results.plot import write_csv, write_json
from flatmin.train import TrainConfig, get_method
from flatmin.train.config import check_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin gradnorm`."""
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="flatmin train --out folders")
    parser.add_argument("--out", type=options.path, required=True,
                        help="folder for gradnorm.png/.csv/.json (and --train runs)")
    parser.add_argument("--train", action="store_true",
                        help="first train --methods into OUT/<method>/ (resumable), then plot them too")
    parser.add_argument("--methods", default="erm,amp", help="methods trained by --train")
    parser.add_argument("--omega-epsilon", type=NONNEGATIVE, default=None,
                        help="ε of Ω (default: the first AMP run's, else the first run's preset)")
    parser.add_argument("--omega-inner-lr", type=NONNEGATIVE, default=None,
                        help="ζ of Ω (default: likewise)")
    options.add_threads_argument(parser)
    options.add_config_arguments(parser, skip=("--method",))


def run(args: argparse.Namespace) -> int:
    """Read (or train, then read) the runs, compute Ω per epoch, write figure and numbers."""
    options.use_threads(args.threads)
    paths = [Path(p) for p in args.runs]
    if args.train:
        methods = name_list(args.methods, "--methods")
        base = check_config(TrainConfig(**options.config_overrides(args)))
        for m in methods:
            get_method(m)  # an unknown name lists the valid ones, before anything is written
        out = out_dir(args.out)
        train_runs({m: base.replace(method=m) for m in methods}, out)
        paths += [out / m for m in methods]
    elif options.config_overrides(args):
        raise FlatminError("training flags need --train (without it the runs are only read)")
    if not paths:
        raise FlatminError("give RUN_DIRs to read, or --train to train ERM and AMP first")
    check_out(args.out)
    runs = [read_run_dir(p) for p in paths]
    out = out_dir(args.out)
    eps, zeta = omega_params(runs, args.omega_epsilon, args.omega_inner_lr)
    rows = gradnorm_rows(runs, eps, zeta)
    summary = {r.label: {"path": str(r.path), "final_grad_norm": r.log[-1]["grad_norm"],
                         "mean_grad_norm": sum(x["grad_norm"] for x in r.log) / len(r.log),
                         "inner_iter": r.config.inner_iter, "ball": r.config.ball} for r in runs}
    files = [write_csv(out / "gradnorm.csv", rows),
             write_json(out / "gradnorm.json", {"epsilon": eps, "inner_lr": zeta, "runs": summary,
                                                "rows": rows}),
             plot_gradnorm(rows, eps, zeta, out / "gradnorm.png")]
    for label, s in summary.items():
        print(f"{label}: final ‖∇J‖ {s['final_grad_norm']:.4g}, mean over epochs {s['mean_grad_norm']:.4g}")
    for f in files:
        print(f"wrote {f}")
    return 0

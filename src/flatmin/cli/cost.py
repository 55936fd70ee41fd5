"""`flatmin cost --dataset mnist1d --methods erm,amp,sam,rmp --out DIR`: per-epoch wall time of each
method relative to ERM's and forward passes per step, the AMP paper's §5.5 (`flatmin.analysis.cost`)."""

from __future__ import annotations

import argparse

import torch

from flatmin.analysis._runs import print_table
from flatmin.analysis.cost import cost_rows, plot_cost
from flatmin.checks import POSITIVE_INT, name_list, out_dir
from flatmin.cli import options
from flatmin.data import load_dataset
from flatmin.errors import FlatminError
from flatmin.models import MODELS
from flatmin.models.user import is_factory_spec
from flatmin.results.plot import write_csv, write_json
from flatmin.train import TrainConfig
from flatmin.train.config import check_config
from flatmin.train.methods import get_method


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin cost` (every training flag but method, model and epochs)."""
    parser.add_argument("--out", type=options.path, required=True, help="folder for cost.png/.csv/.json")
    parser.add_argument("--methods", default="erm,amp,sam,rmp", help="methods compared with ERM")
    parser.add_argument("--models", default=None, help="comma-separated models (default: the dataset's)")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=2,
                        help="timed epochs per method, after one warm-up")
    options.add_threads_argument(parser)
    options.add_config_arguments(parser, skip=("--method", "--model", "--epochs"))


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write CSV/JSON and the bar chart."""
    options.use_threads(args.threads)
    if args.epochs < 1:
        raise FlatminError(f"--epochs must be >= 1, got {args.epochs}")
    methods = list(dict.fromkeys(["erm", *name_list(args.methods, "--methods")]))
    for m in methods:
        get_method(m)  # an unknown name lists the valid ones
    base = check_config(TrainConfig(**options.config_overrides(args)))
    if args.models is not None:
        models = name_list(args.models, "--models")
    else:
        models = [load_dataset(base.dataset, data_dir=base.data_dir, download=base.download,
                               **base.dataset_options).default_model]
    if unknown := [m for m in models if m not in MODELS and not is_factory_spec(m)]:
        raise FlatminError(f"unknown model(s) {', '.join(unknown)}; "
                           f"valid models: {', '.join(sorted(MODELS))}")
    out = out_dir(args.out)
    rows = cost_rows(base, models, methods, args.epochs)
    threads = torch.get_num_threads()
    title = f"{base.dataset}, {args.epochs} timed epoch(s), {threads} thread(s), {base.device}"
    files = [write_csv(out / "cost.csv", rows),
             write_json(out / "cost.json", {"dataset": base.dataset, "device": base.device,
                                            "threads": torch.get_num_threads(), "rows": rows}),
             plot_cost(rows, out / "cost.png", title)]
    print_table(rows, [("model", "model", ""), ("method", "method", ""), ("epoch_time_s", "epoch s", ".3f"),
                       ("ratio_to_erm", "÷ ERM", ".2f"), ("passes_per_step", "passes/step", ".2f")])
    for f in files:
        print(f"wrote {f}")
    return 0

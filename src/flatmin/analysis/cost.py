"""Computational cost, the AMP paper's §5.5: per-epoch wall time of each method relative to ERM.

All methods of one model train side by side in this one process: each epoch runs every method's
epoch in turn (the order rotated every epoch), so drifts of the machine's speed hit them alike.
Epochs go through the trainer's own `run_epoch`, so the time is the real training step; epoch 0
is a warm-up (allocator, caches) and is left out. Forward passes are counted by a hook, the
machine-independent part of the cost: ERM 1 per step, AMP N + 1, SAM 2, RMP 1.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from flatmin import options
from flatmin.analysis._runs import add_threads_argument, print_table, use_threads
from flatmin.data import load_dataset
from flatmin.errors import FlatminError
from flatmin.models import MODELS
from flatmin.models.user import is_factory_spec
from flatmin.options import add_config_arguments, check_config, config_overrides, out_dir
from flatmin.plot import pyplot, save_figure, write_csv, write_json
from flatmin.train import TrainConfig
from flatmin.train.methods import get_method
from flatmin.train.timing import Contender, measure_configs


def measure_model(base: Any, model: str, methods: list[str], epochs: int) -> list[Contender]:
    """Train every method on one model for 1 + epochs interleaved epochs; time all but the first."""
    base = base.replace(model=model)
    return measure_configs([base.replace(method=m) for m in methods], epochs)


def cost_rows(base: Any, models: list[str], methods: list[str], epochs: int) -> list[dict[str, Any]]:
    """One row per (model, method): epoch time, its ratio to ERM's, forward passes per step."""
    rows = []
    for model in models:
        contenders = measure_model(base, model, methods, epochs)
        erm = next(c for c in contenders if c.method == "erm")
        erm_time = statistics.fmean(erm.times)
        for c in contenders:
            mean = statistics.fmean(c.times)
            rows.append(dict(model=model, method=c.method, epochs_timed=len(c.times), epoch_time_s=mean,
                             epoch_time_std_s=statistics.stdev(c.times) if len(c.times) > 1 else 0.0,
                             ratio_to_erm=mean / erm_time, passes_per_step=statistics.fmean(c.passes),
                             passes_ratio_to_erm=statistics.fmean(c.passes) / statistics.fmean(erm.passes)))
    return rows


def plot_cost(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Grouped bars: time ratio to ERM per model and method, forward-pass ratio as a tick above each."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(models) * max(1, len(methods) / 3), 3.8))
    for j, method in enumerate(methods):
        sel = {r["model"]: r for r in rows if r["method"] == method}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(models))]
        ratios = [sel[m]["ratio_to_erm"] for m in models]
        bars = ax.bar(xs, ratios, width=width, color=f"C{j}", edgecolor="k", lw=0.5, label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.scatter(xs, [sel[m]["passes_ratio_to_erm"] for m in models], marker="_", s=200, color="k",
                   zorder=3, label="forward passes ÷ ERM's" if j == 0 else None)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(models)), models)
    ax.set(ylabel="epoch wall time ÷ ERM's", title=title or "Per-epoch cost relative to ERM")
    top = max(max(r["ratio_to_erm"], r["passes_ratio_to_erm"]) for r in rows)
    ax.set_ylim(0, 1.15 * top)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


# --- the CLI: `flatmin cost --dataset mnist1d --methods erm,amp,sam,rmp --out DIR` ----------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin cost` (every training flag but method, model and epochs)."""
    parser.add_argument("--out", type=options.path, required=True, help="folder for cost.png/.csv/.json")
    parser.add_argument("--methods", default="erm,amp,sam,rmp", help="methods compared with ERM")
    parser.add_argument("--models", default=None, help="comma-separated models (default: the dataset's)")
    parser.add_argument("--epochs", type=options.POSITIVE_INT, default=2,
                        help="timed epochs per method, after one warm-up")
    add_threads_argument(parser)
    add_config_arguments(parser, skip=("--method", "--model", "--epochs"))


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write CSV/JSON and the bar chart."""
    use_threads(args.threads)
    if args.epochs < 1:
        raise FlatminError(f"--epochs must be >= 1, got {args.epochs}")
    methods = list(dict.fromkeys(["erm"] + [m.strip() for m in args.methods.split(",") if m.strip()]))
    for m in methods:
        get_method(m)  # an unknown name lists the valid ones
    base = check_config(TrainConfig(**config_overrides(args)))
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
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

"""Computational cost, the AMP paper's §5.5: per-epoch wall time of each method relative to ERM.

All methods of one model train side by side in this one process: each epoch runs every method's
epoch in turn (the order rotated every epoch), so drifts of the machine's speed hit them alike.
Epochs go through the trainer's own `run_epoch`, so the time is the real training step; epoch 0
is a warm-up (allocator, caches) and is left out. Forward passes are counted by a hook, the
machine-independent part of the cost: ERM 1 per step, AMP N + 1, SAM 2, RMP 1.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from flatmin.results.plot import pyplot, save_figure
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

"""The comparison's figures: metrics per method with the seed spread, training curves, reliability
diagrams (Fig. 7) of every method, and the verdicts at a glance (each method's paired difference from
the baseline with its 95% CI, per metric: a forest plot); matplotlib is optional and imported lazily."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from flatmin.results.plot import pyplot, save_figure
from flatmin.train.logging import read_epochs

Runs = dict[str, list[dict[str, Any]]]  # label -> finished runs' metrics (one per seed)
MIN_BIN = 20  # a reliability bin with fewer test examples (all seeds) is drawn grey: its accuracy is noise
COLUMNS = 4  # reliability panels per row


def metric_spread(groups: Runs, path: Path) -> Path:
    """Test error, NLL and ECE per method: every seed as a dot, the mean as a bar from 0 and ± one std
    over seeds as its error bar (said in the legend; a bar's height is only honest from 0)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.3 * len(groups), 3.8))
    seeds = sorted({len(runs) for runs in groups.values()})
    for ax, (metric, title) in zip(axes, (("error", "test error (%)"), ("nll", "test NLL"),
                                          ("ece", "test ECE"))):
        for i, runs in enumerate(groups.values()):
            vals = [r["test"][metric] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(i, statistics.fmean(vals), yerr=sd, color=f"C{i}", alpha=0.35, capsize=4,
                   label="mean ± std over seeds" if i == 0 else None)
            ax.plot([i] * len(vals), vals, "o", color=f"C{i}", ms=4, label="one seed" if i == 0 else None)
        ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right")
        hi = max(r["test"][metric] for runs in groups.values() for r in runs)
        ax.set_ylim(0.0, hi * 1.15 if hi > 0 else 1.0)
        ax.set_title(title)
    axes[0].legend(fontsize=7, loc="lower left", title=f"n = {', '.join(map(str, seeds))} seeds",
                   title_fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's per-epoch records (log.jsonl; step records left out)."""
    return read_epochs(Path(run_dir))


def training_curves(logs: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path:
    """Train loss and test error per epoch: the seed mean as a line, each seed faint."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("train_loss", "val_error", "test_error"),
                              ("train loss", "validation error (%)", "test error (%)")):
        for i, (label, runs) in enumerate(logs.items()):
            runs = [[rec for rec in r if key in rec] for r in runs]  # --eval-every leaves epochs out
            runs = [r for r in runs if r]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            epochs = [rec["epoch"] for rec in runs[0][:n]]
            for r in runs:
                ax.plot(epochs, [rec[key] for rec in r[:n]], color=f"C{i}", alpha=0.15, lw=0.8)
            ax.plot(epochs, [statistics.fmean(r[e][key] for r in runs) for e in range(n)], color=f"C{i}",
                    label=label, lw=1.6)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if key == "train_loss":
            ax.set_yscale("log")
        else:
            lo = min((rec[key] for runs in logs.values() for r in runs for rec in r if key in rec), default=0)
            ax.set_ylim(max(0.0, lo - 2), lo + 25)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def pooled_bins(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Reliability bins summed over seeds (count-weighted confidence and accuracy)."""
    first = runs[0]["reliability"]["test"]
    n = len(first["count"])
    count = [sum(r["reliability"]["test"]["count"][b] for r in runs) for b in range(n)]

    def wmean(key: str) -> list[float]:
        return [sum(r["reliability"]["test"][key][b] * r["reliability"]["test"]["count"][b] for r in runs)
                / count[b] if count[b] else 0.0 for b in range(n)]

    return {"lower": first["lower"], "upper": first["upper"], "confidence": wmean("confidence"),
            "accuracy": wmean("accuracy"), "count": count}


def reliability(groups: Runs, path: Path, min_bin: int = MIN_BIN) -> Path:
    """Reliability diagrams (accuracy vs confidence per bin, all seeds pooled), one panel per method,
    every method: each bin says how many test examples it holds, and a bin with fewer than
    ``min_bin`` is grey (one example makes a bar of 0 or 1 that says nothing about calibration)."""
    plt = pyplot()
    cols = min(COLUMNS, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for i, (ax, (label, runs)) in enumerate(zip(axes.flat, groups.items())):
        b = pooled_bins(runs)
        width = [u - lo for lo, u in zip(b["lower"], b["upper"])]
        few = [0 < n < min_bin for n in b["count"]]
        colors = ["0.75" if f else f"C{i}" for f in few]
        ax.bar(b["lower"], b["accuracy"], width=width, align="edge", color=colors, alpha=0.7,
               edgecolor="k", lw=0.4, label="accuracy")
        gap = [c - a if n and not f else 0
               for c, a, n, f in zip(b["confidence"], b["accuracy"], b["count"], few)]
        ax.bar(b["lower"], gap, bottom=b["accuracy"], width=width, align="edge", color="red", alpha=0.25,
               label="gap")
        for lo, w, n, acc in zip(b["lower"], width, b["count"], b["accuracy"]):
            if n:
                ax.text(lo + w / 2, min(acc, 0.9) + 0.02, str(n), ha="center", va="bottom", fontsize=5,
                        rotation=90, color="0.4" if n < min_bin else "k")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ece = statistics.fmean(r["test"]["ece"] for r in runs)
        ax.set_title(f"{label}: ECE {ece:.3f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    grey = plt.Rectangle((0, 0), 1, 1, color="0.75", alpha=0.7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][0].legend([*handles, grey], [*labels, f"< {min_bin} examples"], fontsize=7, loc="upper left")
    fig.suptitle("numbers: test examples per bin, all seeds", fontsize=8, y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


def forest(comps: list[Any], path: Path) -> Path:
    """The verdicts at a glance: per metric, each method's mean paired difference from the baseline
    (method − baseline, by seed) with its 95% CI; left of 0 is better (lower error, NLL, ECE)."""
    plt = pyplot()
    metrics = list(dict.fromkeys(c.metric for c in comps))
    methods = list(dict.fromkeys(c.method for c in comps))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.9 + 0.45 * len(methods)),
                             squeeze=False, sharey=True)
    color = {"better": "C2", "worse": "C3"}
    for ax, metric in zip(axes[0], metrics):
        for c in (c for c in comps if c.metric == metric):
            y = len(methods) - 1 - methods.index(c.method)
            col = color.get(c.verdict, "0.4")
            if c.n >= 2:
                ax.plot(c.ci95, [y, y], color=col, lw=2)
            ax.plot([c.diff_mean], [y], "o", color=col, ms=5)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.locator_params(axis="x", nbins=4)
        ax.set_title(f"test {metric}: method − {comps[0].baseline}", fontsize=9)
        ax.set_xlabel("paired difference, 95% CI")
    axes[0][0].set_yticks(range(len(methods)), list(reversed(methods)))
    axes[0][0].set_ylim(-0.7, len(methods) - 0.3)
    n = sorted({c.n for c in comps})
    fig.suptitle(f"green: better, red: worse, grey: no detectable difference (CI holds 0); paired by "
                 f"seed, n = {', '.join(map(str, n))}", fontsize=8, y=1.02)
    fig.tight_layout()
    return save_figure(fig, path)

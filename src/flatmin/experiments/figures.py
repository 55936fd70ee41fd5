"""The comparison's figures: metrics per method with the seed spread, training curves, and
reliability diagrams (Fig. 7); matplotlib is optional and imported only here, lazily."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from flatmin.results.plot import pyplot, save_figure
from flatmin.train.logging import read_epochs

Runs = dict[str, list[dict[str, Any]]]  # label -> finished runs' metrics (one per seed)


def metric_spread(groups: Runs, path: Path) -> Path:
    """Test error, NLL and ECE per method: every seed as a dot, the mean ± std as a bar."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.3 * len(groups), 3.6))
    for ax, (metric, title) in zip(axes, (("error", "test error (%)"), ("nll", "test NLL"),
                                          ("ece", "test ECE"))):
        for i, runs in enumerate(groups.values()):
            vals = [r["test"][metric] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(i, statistics.fmean(vals), yerr=sd, color=f"C{i}", alpha=0.35, capsize=4)
            ax.plot([i] * len(vals), vals, "o", color=f"C{i}", ms=4)
        ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right")
        lo = min(r["test"][metric] for runs in groups.values() for r in runs)
        hi = max(r["test"][metric] for runs in groups.values() for r in runs)
        ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-9)), hi + 0.3 * (hi - lo + 1e-9))
        ax.set_title(title)
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


def reliability(groups: Runs, path: Path) -> Path:
    """Reliability diagrams (accuracy vs confidence per bin, all seeds pooled), one panel per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.4), squeeze=False)
    for i, (ax, (label, runs)) in enumerate(zip(axes[0], groups.items())):
        b = pooled_bins(runs)
        width = [u - lo for lo, u in zip(b["lower"], b["upper"])]
        ax.bar(b["lower"], b["accuracy"], width=width, align="edge", color=f"C{i}", alpha=0.7,
               edgecolor="k", lw=0.4, label="accuracy")
        ax.bar(b["lower"], [c - a if n else 0 for c, a, n in zip(b["confidence"], b["accuracy"], b["count"])],
               bottom=b["accuracy"], width=width, align="edge", color="red", alpha=0.25, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ece = statistics.fmean(r["test"]["ece"] for r in runs)
        ax.set_title(f"{label}: ECE {ece:.3f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)

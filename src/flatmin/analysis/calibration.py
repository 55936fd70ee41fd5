"""Calibration per method, the AMP paper's Fig. 7 (§5.3): reliability diagrams and ECE bars.

Each run contributes its final test-set ECE and its 15-bin reliability data (metrics.json). A
method's reliability diagram pools its seeds bin by bin (accuracy and confidence weighted by the
bin counts, exactly as if the seeds' predictions were one set); its ECE bar is the mean ± sample
standard deviation of the runs' own ECEs, as the paper averages over trials.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flatmin.analysis._runs import check_names, read_run_dir
from flatmin.errors import FlatminError
from flatmin.results.plot import pyplot, save_figure
from flatmin.results.store import Store
from flatmin.train import TrainConfig


def _record(metrics: dict[str, Any], config: Any, where: str) -> dict[str, Any]:
    """Method, seed, test ECE/error/NLL and reliability bins of one finished run."""
    try:
        test, bins = metrics["test"], metrics["reliability"]["test"]
        ece, error, nll = float(test["ece"]), float(test["error"]), float(test["nll"])
        bins = {k: [float(v) for v in bins[k]] for k in ("lower", "upper", "confidence", "accuracy", "count")}
    except (KeyError, TypeError, ValueError) as err:
        raise FlatminError(f"{where} lacks test ECE or reliability bins ({err})") from None
    c = config
    return dict(method=c.method, dataset=c.dataset, model=c.model, seed=c.seed, path=where,
                ece=ece, error=error, nll=nll, reliability=bins)


def run_record(path: str | Path) -> dict[str, Any]:
    """The record of a finished run folder (its metrics.json)."""
    run = read_run_dir(path)
    if run.metrics is None:
        raise FlatminError(f"{run.path} has no metrics.json (the run has not finished)")
    return _record(run.metrics, run.config, str(run.path))


def db_records(db: str | Path) -> list[dict[str, Any]]:
    """The records of every run in a results database of `flatmin grid` / `flatmin compare`."""
    if not Path(db).is_file():
        raise FlatminError(f"no results database at {db}")
    store = Store(db, read_only=True)
    try:
        rows = store.rows()
    finally:
        store.close()
    if not rows:
        raise FlatminError(f"{db} holds no finished runs")
    records = []
    for row in rows:
        where = f"{db} run {row['key']}"
        try:
            cfg = TrainConfig.from_dict(row["config"])
        except (TypeError, ValueError) as err:
            raise FlatminError(f"{where}: not a flatmin run configuration ({err})") from None
        check_names(cfg, where)
        records.append({**_record(row["metrics"] or {}, cfg, where), "name": row.get("label") or cfg.method})
    return records


def label_records(records: list[dict[str, Any]]) -> None:
    """Label by method (or the results store's label); add dataset/model only when the runs mix them."""
    mixed = len({(r["dataset"], r["model"]) for r in records}) > 1
    for r in records:
        name = r.get("name") or r["method"]
        r["label"] = f"{name} ({r['dataset']}/{r['model']})" if mixed else name


def pool_bins(bins: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Reliability bins of several runs as one: count-weighted confidence and accuracy per bin."""
    count = np.sum([b["count"] for b in bins], axis=0)
    safe = np.maximum(count, 1)
    conf = np.sum([np.multiply(b["confidence"], b["count"]) for b in bins], axis=0) / safe
    acc = np.sum([np.multiply(b["accuracy"], b["count"]) for b in bins], axis=0) / safe
    return dict(lower=list(bins[0]["lower"]), upper=list(bins[0]["upper"]), confidence=conf.tolist(),
                accuracy=acc.tolist(), count=count.astype(int).tolist())


def pooled_ece(bins: dict[str, list[float]]) -> float:
    """ECE of pooled bins: Σ count·|confidence − accuracy| / Σ count."""
    count = np.asarray(bins["count"], float)
    gap = np.abs(np.asarray(bins["confidence"]) - np.asarray(bins["accuracy"]))
    return float((count * gap).sum() / count.sum())


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label: ECE mean ± std over runs, the runs' ECEs, and the pooled reliability bins."""
    out = {}
    for label in dict.fromkeys(r["label"] for r in records):
        sel = [r for r in records if r["label"] == label]
        eces = [r["ece"] for r in sel]
        pooled = pool_bins([r["reliability"] for r in sel])
        out[label] = dict(n=len(sel), ece_mean=statistics.fmean(eces),
                          ece_std=statistics.stdev(eces) if len(eces) > 1 else 0.0, eces=eces,
                          seeds=[r["seed"] for r in sel],
                          error_mean=statistics.fmean(r["error"] for r in sel),
                          pooled_ece=pooled_ece(pooled), reliability=pooled)
    return out


def plot_calibration(summary: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """A reliability diagram per method (accuracy bars, gap to confidence, diagonal), then ECE bars."""
    plt = pyplot()
    labels = list(summary)
    n = len(labels)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * n + 3.6, 3.4), squeeze=False, layout="constrained",
                             gridspec_kw=dict(width_ratios=[1] * n + [1.4]))
    axes = axes[0]
    for ax, label in zip(axes, labels):
        b = summary[label]["reliability"]
        lower, upper = np.asarray(b["lower"]), np.asarray(b["upper"])
        filled = np.asarray(b["count"]) > 0
        width, mid = upper - lower, (upper + lower) / 2
        acc, conf = np.asarray(b["accuracy"]), np.asarray(b["confidence"])
        ax.bar(mid[filled], acc[filled], width=width[filled], color="C0", edgecolor="k", lw=0.5,
               label="accuracy")
        ax.bar(mid[filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], facecolor="none",
               edgecolor="C3", hatch="///", lw=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        s = summary[label]
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="confidence")
        ax.set_title(f"{label}\nECE {100 * s['ece_mean']:.2f}%", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=7)
    ax = axes[n]
    means = [100 * summary[k]["ece_mean"] for k in labels]
    stds = [100 * summary[k]["ece_std"] for k in labels]
    ax.bar(range(n), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(n)], edgecolor="k", lw=0.5)
    ax.set_xticks(range(n), labels, rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center")
    runs = ", ".join(str(summary[k]["n"]) for k in labels)
    ax.set(ylabel="test ECE (%)")
    ax.set_title(f"ECE, mean ± std\n(runs: {runs})", fontsize=9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)

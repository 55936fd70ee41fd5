"""Influence of the perturbation radius, the AMP paper's Fig. 8 (§5.4).

One run per ε, each `flatmin.train.train(..., resume=True)` into OUT/eps_<ε>/, so an interrupted
sweep continues where it stopped. ε = 0 is ERM (AMP with a zero ball is ERM, at N+1 times the
cost); the figure plots the final train and test NLL, L_ERM(θ*), against ε with ERM marked. The
paper uses N = 2 and ζ = 2 ("η = 2") for this figure; both are the defaults here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flatmin.analysis._runs import train_runs
from flatmin.results.plot import pyplot, save_figure

PAPER_INNER_ITER, PAPER_INNER_LR = 2, 2.0


def run_name(epsilon: float) -> str:
    """The sub-folder of one radius: eps_0, eps_0.05, ..."""
    return f"eps_{epsilon:g}"


def sweep_configs(base: Any, epsilons: list[float]) -> dict[str, Any]:
    """ε = 0 trains ERM, every other ε trains AMP with that radius (the rest of the config shared)."""
    return {run_name(e): base.replace(method="amp" if e > 0 else "erm", epsilon=e) for e in epsilons}


def radius_sweep(base: Any, epsilons: list[float], out: Path) -> list[dict[str, Any]]:
    """Train (or resume) the sweep; one row of final metrics per radius."""
    configs = sweep_configs(base, epsilons)
    results = train_runs(configs, out)
    rows = []
    for e, (name, result) in zip(epsilons, results.items()):
        row = {"epsilon": e, "method": configs[name].method, "dir": str(out / name)}
        for split in ("train", "val", "test"):
            if result.get(split):
                row.update({f"{split}_nll": result[split]["nll"], f"{split}_error": result[split]["error"]})
        rows.append(row)
    return rows


def plot_radius(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Fig. 8: L_ERM(θ*) on the training and test sets vs ε; AMP in blue, ERM (ε = 0) in red."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    amp = [r for r in rows if r["method"] == "amp"]
    erm = next((r for r in rows if r["method"] == "erm"), None)
    for ax, split in zip(axes, ("train", "test")):
        key = f"{split}_nll"
        ax.plot([r["epsilon"] for r in amp], [r[key] for r in amp], "o-", color="C0", label="AMP")
        if erm is not None:
            ax.axhline(erm[key], color="C3", ls="--", lw=1)
            ax.plot([0], [erm[key]], "*", color="C3", ms=12, label="ERM (ε = 0)")
        ax.set(xlabel="perturbation radius ε", ylabel="L_ERM(θ*) (mean NLL)", title=f"{split} set")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)

"""Influence of the perturbation radius, the AMP paper's Fig. 8 (§5.4).

One run per ε, each `flatmin.train.train(..., resume=True)` into OUT/eps_<ε>/, so an interrupted
sweep continues where it stopped. ε = 0 is ERM (AMP with a zero ball is ERM, at N+1 times the
cost); the figure plots the final train and test NLL, L_ERM(θ*), against ε with ERM marked. The
paper uses N = 2 and ζ = 2 ("η = 2") for this figure; both are the defaults here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from flatmin import options
from flatmin.analysis._runs import add_threads_argument, print_table, train_runs, use_threads
from flatmin.errors import FlatminError
from flatmin.options import add_config_arguments, check_config, config_overrides, out_dir
from flatmin.plot import pyplot, save_figure, write_csv, write_json
from flatmin.train import TrainConfig

PAPER_INNER_ITER, PAPER_INNER_LR = 2, 2.0


def parse_epsilons(text: str) -> list[float]:
    """'0,0.02,0.05' -> sorted distinct radii, each >= 0."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise FlatminError(f"--epsilons must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise FlatminError(f"--epsilons needs at least one radius, all finite and >= 0; got {text!r}")
    return values


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


# --- the CLI: `flatmin radius --epsilons 0,0.02,... --out DIR` -------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin radius` (every training flag but method and ε)."""
    parser.add_argument("--out", type=options.path, required=True,
                        help="folder for radius.png/.csv/.json and OUT/eps_<ε>/ runs")
    parser.add_argument("--epsilons", default="0,0.02,0.05,0.1,0.2,0.5,1",
                        help="comma-separated radii; 0 is the ERM run")
    add_threads_argument(parser)
    add_config_arguments(parser, skip=("--method", "--epsilon"))


def run(args: argparse.Namespace) -> int:
    """Train the sweep (resumable), then write the figure and the numbers."""
    use_threads(args.threads)
    epsilons = parse_epsilons(args.epsilons)
    overrides = {"inner_iter": PAPER_INNER_ITER, "inner_lr": PAPER_INNER_LR, **config_overrides(args)}
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

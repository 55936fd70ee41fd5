"""Theorem 2 along training: ‖∇J(θ)‖ per epoch for ERM vs AMP, and the implicit penalty Ω.

Theorem 2 (N = 1, small ζ): an AMP step is a gradient step on J + Ω with
Ω = (ζ/2)‖∇J‖² while ζ‖∇J‖ ≤ ε (the ascent is not clipped) and Ω = ε‖∇J‖ once it is. The paper
prints ζ‖∇J‖² for the first case; that is the loss *value* gap J(θ+ζ∇J) − J(θ), while the
gradient-step equivalence needs ζ/2 (both are written to the numbers; the figure shows Ω).
The trainer logs the epoch mean of the per-batch ‖∇J_B(θ)‖ of the unperturbed pass, so Ω here
is Ω at that mean norm: a per-epoch reading of the penalty, not its batch-by-batch average.

This module also holds what the other training-based analyses share: reading a run folder
(metrics.json, log.jsonl, checkpoint.pt) and training a few configurations into sub-folders.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flatmin.analysis._plot import out_dir, pyplot, save_figure, write_csv, write_json
from flatmin.errors import FlatminError

# --- run folders and training, shared with radius, spiral, calibration and cost ------------------


@dataclass
class RunDir:
    """What a `flatmin train --out DIR` folder holds: its configuration, final metrics and log."""

    path: Path
    config: Any  # flatmin.train.TrainConfig
    metrics: dict[str, Any] | None
    log: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """Method and seed: how the figures name a run."""
        return f"{self.config.method} (seed {self.config.seed})"


def _read_json(path: Path) -> Any:
    """A JSON file, or a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FlatminError(f"{path} is not readable JSON ({err})") from None


def check_names(cfg: Any, path: Path | str) -> None:
    """A run whose model or method this flatmin does not know cannot be analysed."""
    from flatmin.models import MODELS
    from flatmin.train import METHODS

    if cfg.model is not None and cfg.model not in MODELS:
        raise FlatminError(f"{path}: unknown model {cfg.model!r}; valid models: {', '.join(sorted(MODELS))}")
    if cfg.method not in METHODS:
        raise FlatminError(f"{path}: unknown method {cfg.method!r}; "
                           f"valid methods: {', '.join(sorted(METHODS))}")


def read_run_dir(path: str | Path) -> RunDir:
    """A flatmin run folder (or a file in one); anything else is a clear FlatminError."""
    from flatmin.train import TrainConfig
    from flatmin.train.checkpoint import CHECKPOINT, load_checkpoint

    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FlatminError(f"no run folder at {path}")
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None
    if metrics is not None:
        if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
            raise FlatminError(f"{path / 'metrics.json'} is not a flatmin metrics file (no 'config')")
        config = metrics["config"]
    elif (path / CHECKPOINT).is_file():
        config = load_checkpoint(path / CHECKPOINT)["config"]
    else:
        raise FlatminError(f"{path} is not a flatmin run folder (no metrics.json or {CHECKPOINT})")
    try:
        cfg = TrainConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise FlatminError(f"{path}: not a flatmin run configuration ({err})") from None
    check_names(cfg, path)
    log = []
    if (path / "log.jsonl").is_file():
        try:
            log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines() if line.strip()]
        except ValueError as err:
            raise FlatminError(f"{path / 'log.jsonl'} is not a flatmin log ({err})") from None
    return RunDir(path, cfg, metrics, log)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """The models are tiny: one thread per process beats two fighting over a core."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def use_threads(n: int) -> None:
    """Apply --threads."""
    if n < 1:
        raise FlatminError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def train_runs(configs: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Train each config into OUT/<name>/, resuming what an interrupted call left."""
    from flatmin.train import train

    results = {}
    for name, cfg in configs.items():
        print(f"training {name}: {cfg.method} on {cfg.dataset} into {out / name}", flush=True)
        results[name] = train(cfg, out / name, resume=True, progress=False)
    return results


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """A fixed-width table on stdout: (key, header, format spec) per column."""
    widths = [max(len(h), 8) for _, h, _ in columns]
    print(" ".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        print(" ".join(f"{format(r[k], spec):>{w}}" for (k, _, spec), w in zip(columns, widths)))


# --- Theorem 2 -----------------------------------------------------------------------------------


def omega(grad_norm: float, epsilon: float, zeta: float) -> tuple[float, float, str]:
    """(Ω, value gap, regime) of Theorem 2 at a gradient norm: the step-equivalent penalty, the loss
    increase of the ascent step, and whether the ascent ζ∇J is clipped to the ε-ball."""
    if zeta * grad_norm <= epsilon:
        return 0.5 * zeta * grad_norm**2, zeta * grad_norm**2, "unclipped"
    return epsilon * grad_norm, epsilon * grad_norm, "clipped"


def gradnorm_rows(runs: list[RunDir], epsilon: float, zeta: float) -> list[dict[str, Any]]:
    """One row per (run, epoch): ‖∇J‖ from the log and Ω at the given ε, ζ."""
    rows = []
    for run in runs:
        if not run.log or "grad_norm" not in run.log[0]:
            raise FlatminError(f"{run.path} has no log.jsonl with grad_norm (train it with this flatmin)")
        for rec in run.log:
            om, gap, regime = omega(float(rec["grad_norm"]), epsilon, zeta)
            rows.append(dict(run=run.label, method=run.config.method, seed=run.config.seed,
                             path=str(run.path), epoch=rec["epoch"], lr=rec["lr"],
                             train_loss=rec["train_loss"], grad_norm=rec["grad_norm"], omega=om,
                             value_gap=gap, regime=regime))
    return rows


def plot_gradnorm(rows: list[dict[str, Any]], epsilon: float, zeta: float, path: Path) -> Path:
    """‖∇J‖ per epoch per run (left) and Ω with its regime (right): AMP keeps the gradient small."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for k, name in enumerate(runs):
        sel = [r for r in rows if r["run"] == name]
        epochs = [r["epoch"] for r in sel]
        axes[0].plot(epochs, [r["grad_norm"] for r in sel], color=f"C{k}", label=name)
        axes[1].plot(epochs, [r["omega"] for r in sel], color=f"C{k}", lw=0.8)
        for regime, marker in (("unclipped", "o"), ("clipped", "x")):
            pts = [r for r in sel if r["regime"] == regime]
            axes[1].scatter([r["epoch"] for r in pts], [r["omega"] for r in pts], color=f"C{k}",
                            marker=marker, s=14)
    axes[1].scatter([], [], color="k", marker="o", s=14, label="(ζ/2)‖∇J‖²  (ζ‖∇J‖ ≤ ε)")
    axes[1].scatter([], [], color="k", marker="x", s=14, label="ε‖∇J‖  (clipped)")
    axes[0].set(xlabel="epoch", ylabel="mean ‖∇J_B(θ)‖ over the epoch", yscale="log",
                title="Gradient norm at θ (unperturbed pass)")
    axes[1].set(xlabel="epoch", ylabel="Ω(θ)", yscale="log",
                title=f"Theorem 2's penalty Ω at ε = {epsilon:g}, ζ = {zeta:g}")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


# --- the CLI: `flatmin gradnorm RUN_DIR ... --out DIR` or `flatmin gradnorm --train --out DIR` ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin gradnorm`."""
    from flatmin.train.cli import add_config_arguments

    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="flatmin train --out folders")
    parser.add_argument("--out", required=True, help="folder for gradnorm.png/.csv/.json (and --train runs)")
    parser.add_argument("--train", action="store_true",
                        help="first train --methods into OUT/<method>/ (resumable), then plot them too")
    parser.add_argument("--methods", default="erm,amp", help="methods trained by --train")
    parser.add_argument("--omega-epsilon", type=float, default=None,
                        help="ε of Ω (default: the first AMP run's, else the first run's preset)")
    parser.add_argument("--omega-inner-lr", type=float, default=None, help="ζ of Ω (default: likewise)")
    add_threads_argument(parser)
    add_config_arguments(parser, skip=("--method",))


def _omega_params(runs: list[RunDir], args: argparse.Namespace) -> tuple[float, float]:
    """ε, ζ of the AMP run being explained, so ERM's curve shows what AMP would have added."""
    ref = next((r for r in runs if r.config.method == "amp"), runs[0])
    eps = args.omega_epsilon if args.omega_epsilon is not None else ref.config.epsilon
    zeta = args.omega_inner_lr if args.omega_inner_lr is not None else ref.config.inner_lr
    if eps is None or zeta is None or eps < 0 or zeta < 0:
        raise FlatminError("need ε, ζ >= 0 for Ω: pass --omega-epsilon and --omega-inner-lr")
    return float(eps), float(zeta)


def run(args: argparse.Namespace) -> int:
    """Read (or train, then read) the runs, compute Ω per epoch, write figure and numbers."""
    from flatmin.train import TrainConfig
    from flatmin.train.cli import config_overrides

    use_threads(args.threads)
    out = out_dir(args.out)
    paths = [Path(p) for p in args.runs]
    if args.train:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        base = TrainConfig(**config_overrides(args))
        train_runs({m: base.replace(method=m) for m in methods}, out)
        paths += [out / m for m in methods]
    elif config_overrides(args):
        raise FlatminError("training flags need --train (without it the runs are only read)")
    if not paths:
        raise FlatminError("give RUN_DIRs to read, or --train to train ERM and AMP first")
    runs = [read_run_dir(p) for p in paths]
    eps, zeta = _omega_params(runs, args)
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

"""Theorem 2 along training: ‖∇J(θ)‖ per epoch for ERM vs AMP, and the implicit penalty Ω.

Theorem 2 (N = 1, small ζ): an AMP step is a gradient step on J + Ω with
Ω = (ζ/2)‖∇J‖² while ζ‖∇J‖ ≤ ε (the ascent is not clipped) and Ω = ε‖∇J‖ once it is. The paper
prints ζ‖∇J‖² for the first case; that is the loss *value* gap J(θ+ζ∇J) − J(θ), while the
gradient-step equivalence needs ζ/2 (both are written to the numbers; the figure shows Ω).
The trainer logs the epoch mean of the per-batch ‖∇J_B(θ)‖ of the unperturbed pass, so Ω here
is Ω at that mean norm: a per-epoch reading of the penalty, not its batch-by-batch average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flatmin.analysis._runs import RunDir
from flatmin.errors import FlatminError
from flatmin.results.plot import pyplot, save_figure

# --- Theorem 2's penalty --------------------------------------------------------------------------


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


def omega_params(runs: list[RunDir], epsilon: float | None = None, inner_lr: float | None = None
                 ) -> tuple[float, float]:
    """ε, ζ of Ω: those given, else the AMP run's being explained, so ERM's curve shows what AMP
    would have added."""
    ref = next((r for r in runs if r.config.method == "amp"), runs[0])
    eps = epsilon if epsilon is not None else ref.config.epsilon
    zeta = inner_lr if inner_lr is not None else ref.config.inner_lr
    if eps is None or zeta is None or eps < 0 or zeta < 0:
        raise FlatminError("need ε, ζ >= 0 for Ω: pass --omega-epsilon and --omega-inner-lr")
    return float(eps), float(zeta)

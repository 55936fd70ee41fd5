"""Sharpness of a minimum three ways: top Hessian eigenvalue, Hessian trace, ε-sharpness.

`loss_fn(model) -> loss` is any scalar function of the parameters; a
:class:`~flatmin.analysis._common.DatasetLoss` (see `dataset_loss`) is summed batch by batch, so
Hessian-vector products over a whole data set need only one batch's graph at a time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from flatmin.analysis._common import (
    DatasetLoss,
    LossFn,
    loss_terms,
    preserved,
    split_loss,
    trainable,
)
from flatmin.results.plot import pyplot, save_figure


class Estimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error."""

    value: float
    stderr: float


def dataset_loss(x: Tensor, y: Tensor, batch_size: int = 512, transform=None) -> DatasetLoss:
    """Mean cross-entropy over fixed tensors, model in eval mode: a deterministic L(θ)."""
    return DatasetLoss(x, y, batch_size=batch_size, transform=transform)


def hvp(model: nn.Module, loss_fn: LossFn, v: list[Tensor]) -> list[Tensor]:
    """H·v by double backprop, accumulated over the loss's batches."""
    params = trainable(model)
    out = [torch.zeros_like(p) for p in params]
    for loss in loss_terms(loss_fn, model):
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        torch._foreach_add_(out, [h.detach() for h in hv])
    return out


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def _random_like(params: list[Tensor], generator: torch.Generator | None, rademacher: bool
                 ) -> list[Tensor]:
    """Gaussian or ±1 vectors drawn on the CPU (reproducible across devices)."""
    out = []
    for p in params:
        if rademacher:
            r = torch.randint(0, 2, p.shape, generator=generator).mul_(2).sub_(1)
        else:
            r = torch.randn(p.shape, generator=generator)
        out.append(r.to(device=p.device, dtype=p.dtype))
    return out


def _power(model, loss_fn, v, iters, tol, shift=0.0) -> float:
    """Power iteration on H − shift·I; returns the Rayleigh quotient of its dominant eigenvector."""
    lam = math.nan
    for _ in range(iters):
        norm = math.sqrt(_dot(v, v))
        v = [x / norm for x in v]
        hv = hvp(model, loss_fn, v)
        if shift:
            torch._foreach_add_(hv, v, alpha=-shift)
        new = _dot(v, hv)
        if abs(new - lam) <= tol * abs(new):
            return new
        lam, v = new, hv
    return lam


def hessian_top_eigenvalue(model: nn.Module, loss_fn: LossFn, iters: int = 100, tol: float = 1e-4,
                           generator: torch.Generator | None = None) -> float:
    """λ_max(H): the curvature of the sharpest direction (power iteration; shifted if H's
    dominant eigenvalue is negative, so the answer is the largest, not the largest in magnitude)."""
    v0 = _random_like(trainable(model), generator, rademacher=False)
    lam = _power(model, loss_fn, v0, iters, tol)
    if lam < 0:  # the dominant eigenvalue was the most negative one: look above it
        lam = _power(model, loss_fn, v0, iters, tol, shift=lam) + lam
    return lam


def hessian_trace(model: nn.Module, loss_fn: LossFn, samples: int = 100,
                  generator: torch.Generator | None = None) -> Estimate:
    """tr(H) = E[vᵀHv] for Rademacher v (Hutchinson): total curvature, with its standard error."""
    params = trainable(model)
    values = torch.tensor([_dot(v, hvp(model, loss_fn, v)) for v in
                           (_random_like(params, generator, rademacher=True) for _ in range(samples))],
                          dtype=torch.float64)
    stderr = float(values.std() / math.sqrt(samples)) if samples > 1 else math.nan
    return Estimate(float(values.mean()), stderr)


def _loss_and_grad(model: nn.Module, loss_fn: LossFn, params: list[Tensor]
                   ) -> tuple[float, list[Tensor]]:
    """L(θ) and ∇L(θ), one batch's graph at a time."""
    loss, grads = 0.0, [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for term in loss_terms(loss_fn, model):
            torch._foreach_add_(grads, torch.autograd.grad(term, params))
            loss += float(term.detach())
    return loss, grads


def epsilon_sharpness(model: nn.Module, loss_fn: LossFn, epsilon: float, steps: int = 20,
                      step_size: float | None = None, *, relative: bool = False,
                      generator: torch.Generator | None = None) -> float:
    """max_{‖Δ‖≤ε} L(θ+Δ) − L(θ): the loss AMP minimises, minus the loss ERM minimises.

    Projected normalised-gradient ascent in the global L2 ball from a random point on the
    sphere (at a minimum ∇L(θ) ≈ 0, so Δ = 0 would go nowhere); the best iterate counts.
    ``relative``: Keskar et al.'s 100·(max − L)/(1 + L) (in this L2 ball, not their box).
    θ is restored bit for bit.
    """
    step_size = epsilon if step_size is None else step_size
    params = trainable(model)
    with preserved(model), torch.no_grad():
        theta = [p.detach().clone() for p in params]
        base = float(sum(t.detach() for t in loss_terms(loss_fn, model)))
        delta = _random_like(params, generator, rademacher=False)
        best = base
        for step in range(steps + 1):
            norm = math.sqrt(_dot(delta, delta)) + 1e-12
            scale = epsilon / norm if step == 0 else min(1.0, epsilon / norm)
            delta = [d * scale for d in delta]
            for p, t, d in zip(params, theta, delta):
                p.copy_(t + d)
            loss, grads = _loss_and_grad(model, loss_fn, params)
            best = max(best, loss)
            if step < steps:
                gnorm = math.sqrt(_dot(grads, grads)) + 1e-12
                delta = [d + (step_size / gnorm) * g for d, g in zip(delta, grads)]
    sharp = best - base
    return 100.0 * sharp / (1.0 + base) if relative else sharp


def measure(run, *, split: str = "train", max_examples: int | None = 1000, batch_size: int = 512,
            seed: int = 0, epsilon: float = 0.05, iters: int = 100, samples: int = 100,
            steps: int = 20) -> dict:
    """The three measures of one checkpoint, on the same examples and random vectors."""
    loss_fn = split_loss(run, split, max_examples, batch_size)
    gen = torch.Generator().manual_seed(seed)
    loss, acc = loss_fn.loss_and_accuracy(run.model)
    lam = hessian_top_eigenvalue(run.model, loss_fn, iters=iters, generator=gen)
    trace = hessian_trace(run.model, loss_fn, samples=samples, generator=gen)
    sharp = epsilon_sharpness(run.model, loss_fn, epsilon, steps=steps, generator=gen)
    return dict(name=run.name, checkpoint=str(run.path), split=split, examples=len(loss_fn),
                loss=loss, accuracy=acc, lambda_max=lam, trace=trace.value, trace_stderr=trace.stderr,
                epsilon=epsilon, eps_sharpness=sharp)


def markdown(rows: list[dict]) -> str:
    """The table a reader pastes into notes: one row per checkpoint."""
    lines = ["| run | split | n | loss | acc | λ_max | tr(H) | ε-sharpness |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['split']} | {r['examples']} | {r['loss']:.4f} | "
                     f"{r['accuracy']:.4f} | {r['lambda_max']:.4g} | {r['trace']:.4g} ± "
                     f"{r['trace_stderr']:.2g} | {r['eps_sharpness']:.4g} (ε={r['epsilon']:g}) |")
    return "\n".join(lines)


def plot_sharpness(rows: list[dict], path: Path) -> Path:
    """Three bar panels (λ_max, tr(H) ± s.e., ε-sharpness), one bar per checkpoint."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
    names = [r["name"] for r in rows]
    for ax, key, label in zip(axes, ("lambda_max", "trace", "eps_sharpness"),
                              ("Hessian λ_max", "Hessian trace (Hutchinson), bars ± s.e.",
                               f"ε-sharpness (ε = {rows[0]['epsilon']:g})")):
        err = [r["trace_stderr"] for r in rows] if key == "trace" else None
        colors = [f"C{i % 10}" for i in range(len(rows))]
        ax.bar(range(len(rows)), [r[key] for r in rows], yerr=err, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
    return save_figure(fig, path)



"""Loss landscapes along random directions (Li et al. 2018), the AMP paper's Fig. 2.

A direction δ has one tensor per parameter. With filter normalisation each filter (each output
row of a weight: a conv kernel, a row of a linear layer) is rescaled to the norm of the same
filter of θ, so that plots of different networks — and of scale-invariant ones — compare.
Biases and BatchNorm parameters (every parameter with ≤ 1 dimension) get a zero direction, as
in Li et al.'s ``ignore='biasbn'``; with ``ignore_bn=False`` they move along θ itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from flatmin.analysis._common import preserved, set_offset, split_loss
from flatmin.results.plot import pyplot, save_figure

LossAccFn = Callable[[nn.Module], "tuple[float, float] | float | Tensor"]


class Landscape(NamedTuple):
    """Loss and accuracy over the grid of displacements (NaN accuracy if the fn gives none)."""

    loss: np.ndarray
    accuracy: np.ndarray


def random_direction(model: nn.Module, generator: torch.Generator, *, filter_normalize: bool = True,
                     ignore_bn: bool = True) -> list[Tensor]:
    """Gaussian δ, one tensor per `model.parameters()`, drawn on the CPU so a seed means one δ."""
    out = []
    for p in model.parameters():
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if ignore_bn else w.clone()
        elif filter_normalize:
            dims = tuple(range(1, w.dim()))
            norm = torch.linalg.vector_norm
            d.mul_(norm(w, dim=dims, keepdim=True) / (norm(d, dim=dims, keepdim=True) + 1e-10))
        out.append(d)
    return out


def _evaluate(fn: LossAccFn, model: nn.Module) -> tuple[float, float]:
    """(loss, accuracy) from a fn that returns both, or a loss alone."""
    result = fn(model)
    if isinstance(result, tuple):
        return float(result[0]), float(result[1])
    return float(result), float("nan")


@torch.no_grad()
def loss_surface_2d(model: nn.Module, fn: LossAccFn, d1: Sequence[Tensor], d2: Sequence[Tensor],
                    alphas: Sequence[float], betas: Sequence[float]) -> Landscape:
    """f(θ + α·δ₁ + β·δ₂) on the grid alphas × betas; θ put back bit for bit."""
    loss = np.full((len(alphas), len(betas)), np.nan)
    acc = np.full_like(loss, np.nan)
    with preserved(model) as theta:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                set_offset(model, theta, (a, b), (d1, d2))
                loss[i, j], acc[i, j] = _evaluate(fn, model)
    return Landscape(loss, acc)


def loss_curve_1d(model: nn.Module, fn: LossAccFn, direction: Sequence[Tensor],
                  alphas: Sequence[float]) -> Landscape:
    """f(θ + α·δ) for each α; θ put back bit for bit."""
    zero = [torch.zeros_like(d) for d in direction]
    surface = loss_surface_2d(model, fn, direction, zero, alphas, [0.0])
    return Landscape(surface.loss[:, 0], surface.accuracy[:, 0])


def landscape_rows(runs: list, splits: list[str], alphas: np.ndarray, *, seed: int = 0, dim: int = 1,
                   max_examples: int | None = None, batch_size: int = 512) -> list[dict]:
    """One row per (run, split, α) — or (α, β) — with loss and accuracy, every run along the same
    seeded directions."""
    rows = []
    for run in runs:
        gen = torch.Generator().manual_seed(seed)
        d1 = random_direction(run.model, gen)
        d2 = random_direction(run.model, gen) if dim == 2 else None
        for split in splits:
            fn = split_loss(run, split, max_examples, batch_size).loss_and_accuracy
            if d2 is None:
                land = loss_curve_1d(run.model, fn, d1, alphas)
                rows += [dict(name=run.name, split=split, alpha=float(a), loss=float(lo), accuracy=float(ac))
                         for a, lo, ac in zip(alphas, land.loss, land.accuracy)]
            else:
                land = loss_surface_2d(run.model, fn, d1, d2, alphas, alphas)
                rows += [dict(name=run.name, split=split, alpha=float(a), beta=float(b),
                              loss=float(land.loss[i, j]), accuracy=float(land.accuracy[i, j]))
                         for i, a in enumerate(alphas) for j, b in enumerate(alphas)]
    return rows


def plot_1d(rows: list[dict], path: Path) -> Path:
    """Fig. 2 style: every run on one plot, train solid and test dashed; loss and accuracy panels."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["name"] for r in rows))
    groups = list(dict.fromkeys(_method_of(n) for n in names))  # a method's seeds share a colour
    labelled: set[tuple[str, str]] = set()
    for name in names:
        group = _method_of(name)
        for split in dict.fromkeys(r["split"] for r in rows):
            sel = [r for r in rows if r["name"] == name and r["split"] == split]
            label = None if (group, split) in labelled else f"{group}, {split}"
            labelled.add((group, split))
            style = dict(color=f"C{groups.index(group)}", ls="-" if split == "train" else "--", label=label)
            for ax, key in zip(axes, ("loss", "accuracy")):
                ax.plot([r["alpha"] for r in sel], [r[key] for r in sel], **style)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set(xlabel="α (θ + α·δ, δ filter-normalised)", ylabel=key)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def _method_of(name: str) -> str:
    """'amp (seed 2)' → 'amp': runs of one method over seeds are drawn alike."""
    return name.rsplit(" (seed ", 1)[0]


def plot_2d(rows: list[dict], name: str, path: Path) -> Path:
    """Contours of the loss over (α, β), one panel per split, for one run."""
    plt = pyplot()
    splits = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sel = [r for r in rows if r["name"] == name and r["split"] == split]
        a, b = sorted({r["alpha"] for r in sel}), sorted({r["beta"] for r in sel})
        z = np.array([r["loss"] for r in sel]).reshape(len(a), len(b)).T  # rows follow β
        cs = ax.contour(a, b, z, levels=20, cmap="viridis")
        ax.clabel(cs, fontsize=6)
        ax.set(title=f"{name}: {split} loss", xlabel="α", ylabel="β", aspect="equal")
    return save_figure(fig, path)



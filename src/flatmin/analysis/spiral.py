"""Decision boundaries of ERM and AMP on the two-spiral problem, the AMP paper's Fig. 6.

Both methods train the dataset's default MLP with the same seed and protocol (one
`flatmin.train.train` each, into OUT/erm and OUT/amp, so an interrupted call resumes); the
figure shows P(class 1 | x) over a grid around the data, the 0.5 contour, and the training points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatmin.analysis._runs import train_runs
from flatmin.errors import FlatminError
from flatmin.results.plot import pyplot, save_figure, write_csv, write_json
from flatmin.train import load_run


@torch.no_grad()
def decision_grid(model: nn.Module, xs: np.ndarray, ys: np.ndarray, transform=None) -> np.ndarray:
    """P(class 1) at every (x, y) of the grid, shape (len(ys), len(xs)) as contourf wants it."""
    gx, gy = np.meshgrid(xs, ys)
    points = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
    points = transform(points) if transform is not None else points
    first = next(model.parameters())
    model.eval()
    probs = torch.softmax(model(points.to(first.device, first.dtype)).double(), dim=1)[:, 1]
    return probs.cpu().numpy().reshape(len(ys), len(xs))


def grid_axes(x: torch.Tensor, points: int, margin: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates covering the data with a margin on every side."""
    lo, hi = x.min(0).values.double().numpy(), x.max(0).values.double().numpy()
    pad = margin * (hi - lo)
    xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], points)
    return xs, np.linspace(lo[1] - pad[1], hi[1] + pad[1], points)


def plot_boundaries(panels: list[dict[str, Any]], xs: np.ndarray, ys: np.ndarray, x: torch.Tensor,
                    y: torch.Tensor, path: Path) -> Path:
    """Fig. 6: one panel per method, probability colours, the 0.5 boundary, training points on top."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        cs = ax.contourf(xs, ys, p["grid"], levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.75)
        ax.contour(xs, ys, p["grid"], levels=[0.5], colors="k", linewidths=1.5)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="bwr", s=8, edgecolors="k", linewidths=0.3)
        ax.set(title=f"{p['label']}: test error {p['test_error']:.2f}%", aspect="equal",
               xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]), xticks=[], yticks=[])
    fig.colorbar(cs, ax=axes[0].tolist(), label="P(class 1 | x)", shrink=0.8)
    return save_figure(fig, path)


def spiral_figure(base: Any, out: Path, methods: tuple[str, ...] = ("erm", "amp"), points: int = 121
                  ) -> dict[str, Any]:
    """Train each method on the spiral (resumable) and draw their boundaries side by side."""
    if base.dataset != "spiral":
        raise FlatminError(f"the spiral figure needs dataset 'spiral', got {base.dataset!r}")
    results = train_runs({m: base.replace(method=m) for m in methods}, out)
    panels, rows = [], {}
    for m in methods:
        run = load_run(out / m)
        train_split = run.dataset.train
        if not panels:
            xs, ys = grid_axes(train_split.x, points)
            x, y = train_split.x, train_split.y
        grid = decision_grid(run.model, xs, ys, transform=lambda b, r=run: r.dataset.transform(b, False))
        panels.append(dict(label=m.upper(), method=m, grid=grid, test_error=results[m]["test"]["error"],
                           test_nll=results[m]["test"]["nll"], train_error=results[m]["train"]["error"]))
        rows[m] = grid.ravel()
    gx, gy = np.meshgrid(xs, ys)
    csv_rows = [dict(x=float(a), y=float(b), **{f"p_{m}": float(rows[m][i]) for m in methods})
                for i, (a, b) in enumerate(zip(gx.ravel(), gy.ravel()))]
    numbers = {"methods": {p["method"]: {k: p[k] for k in ("test_error", "test_nll", "train_error")}
                           for p in panels},
               "grid_shape": [len(ys), len(xs)], "config": results[methods[0]]["config"]}
    files = [plot_boundaries(panels, xs, ys, x, y, out / "spiral.png"),
             write_csv(out / "spiral_grid.csv", csv_rows), write_json(out / "spiral.json", numbers)]
    return dict(panels=panels, xs=xs, ys=ys, numbers=numbers, files=files)

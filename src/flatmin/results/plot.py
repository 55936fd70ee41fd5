"""Figure and number output shared by experiments and analyses: headless PNGs and the numbers beside them.

Below both layers, so neither imports the other; matplotlib stays an optional, lazy import."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from flatmin.errors import FlatminError


def pyplot():
    """matplotlib.pyplot on the Agg backend; matplotlib is the optional `plot` extra."""
    try:
        import matplotlib
    except ImportError as err:
        raise FlatminError("plotting needs matplotlib: pip install flatmin[plot]") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """PNG at a resolution fit for a paper figure; the figure is closed to free memory."""
    fig.savefig(path, dpi=150, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _plain(value: Any) -> Any:
    """JSON has no NaN/inf and no tensors: floats that are not finite become null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> Path:
    """Numbers as strict JSON (readable by any tool, NaN written as null)."""
    path.write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One row per dict; the columns are the first row's keys."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path

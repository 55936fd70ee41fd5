"""Grids: methods × datasets × models × hyperparameters × seeds, expanded from a grid table (a list
crosses every other list; a method's own field crosses only that method's runs), tuned on the
validation split if asked, and run into a results database. `flatmin grid` (`flatmin.cli.grid`)
builds the tables from a grid file and its flags."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flatmin.checks import check_out, check_seeds, default_workers
from flatmin.errors import RunFailedError
from flatmin.experiments import tuning
from flatmin.experiments.backends import Backend
from flatmin.experiments.report import render
from flatmin.experiments.runner import ALL_METHOD_FIELDS, METHOD_FIELDS, resolved
from flatmin.results.store import Store
from flatmin.train.config import TrainConfig
from flatmin.train.methods import refuse_unread


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the listed values (seed excluded); method fields cross only their method."""
    lists = {k: v for k, v in grid.items() if isinstance(v, list) and k != "milestones"}
    scalars = {k: v for k, v in grid.items() if k not in lists}
    common = [k for k in lists if k not in ALL_METHOD_FIELDS]
    out = []
    for combo in itertools.product(*(lists[k] for k in common)):
        d = {**scalars, **dict(zip(common, combo))}
        own = [k for k in lists if k in METHOD_FIELDS.get(d.get("method", "erm"), ())]
        out += [{**d, **dict(zip(own, c))} for c in itertools.product(*(lists[k] for k in own))]
    return out


def run_grid(grid: dict[str, Any], tune: dict[str, Any], run: dict[str, Any], db: Path | None,
             make_backend: Callable[[int], Backend], progress: bool | None = None) -> None:
    """Tune (if asked) and run the grid of a grid file's tables, then print Table 1 of the DB; a
    RunFailedError names the runs missing at the end."""
    seeds = check_seeds(grid.pop("seeds", grid.pop("seed", [0])), "seeds")
    tune_seeds = check_seeds(tune.pop("seeds", seeds[:2]), "tune seeds")
    metric = tune.pop("metric", "error")
    per_method = {k: tune.pop(k) for k in list(tune) if isinstance(tune[k], dict)}
    for key in [k for k in tune if ":" in k]:  # --tune METHOD:FIELD=... from the command line
        owner, _, name = key.partition(":")
        per_method.setdefault(owner, {})[name] = tune.pop(key)
    bases = [TrainConfig.from_dict(d) for d in expand(grid)]
    sweeps = [{**{tuning.field_name(k): v for k, v in tune.items()},
               **{tuning.field_name(k, b.method): v for k, v in per_method.get(b.method, {}).items()}}
              for b in bases]
    refuse_unread(bases, [k for k in grid if k not in ("seed", "seeds")], {k: f"[grid] {k}" for k in grid})
    refuse_unread(bases, {k for s in sweeps for k in s}, {k: f"[tune] {k}" for s in sweeps for k in s})
    for b in bases:
        resolved(b)  # names, numbers, device: checked before the store or any folder is written
    out = check_out(Path(run.get("out", "runs/grid")))
    backend = make_backend(int(run.get("workers") or default_workers()))  # before any write
    store = Store(db or out / "results.db")
    try:
        res = tuning.tune_and_run(bases, [b.method for b in bases], sweeps, seeds, tune_seeds, out, store,
                                  backend, metric, progress=progress)
        print(render(store, figures_dir=None))
    finally:
        store.close()
        backend.close()
    if res.failed:
        raise RunFailedError(f"{len(res.failed)} run(s) missing: {'; '.join(res.failed[:3])}"
                             f"{' ...' if len(res.failed) > 3 else ''}; re-run the command to retry them")

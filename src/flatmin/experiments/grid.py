"""`flatmin grid [CONFIG.toml]`: methods × datasets × models × hyperparameters × seeds into a SQLite DB.

CONFIG (TOML; YAML with the `yaml` extra) has a ``[grid]`` table of config fields, where a list is
crossed with every other list (a list of a method's own field, e.g. ``epsilon``, varies only that
method's runs), ``seeds = N`` means seeds 0..N-1, and an optional ``[tune]`` table of fields to choose
on the VALIDATION split before the seeds are run (``seeds``, ``metric``, ``FIELD = [...]``, and
``[tune.METHOD]`` tables for one method only). ``[run]`` may set ``out`` and ``workers``. CLI lists
(``--methods erm,amp --datasets mnist1d --seeds 3 --set epsilon=0.1,0.5 --tune rho=0.02,0.05``)
override the file. Finished runs are skipped, killed ones resume, and several grid processes may
share one DB (each run is claimed by one of them; a grid waits for runs a live peer trains and takes
over those of a dead one, and exits 1 naming any run that is missing at the end).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from flatmin import options
from flatmin.errors import FlatminError, RunFailedError
from flatmin.experiments import backends, tuning
from flatmin.experiments.gridfile import load as load_file
from flatmin.experiments.report import render
from flatmin.experiments.runner import ALL_METHOD_FIELDS, METHOD_FIELDS, resolved
from flatmin.options import (
    add_config_arguments,
    check_out,
    check_seeds,
    config_overrides,
    default_workers,
    parse_seeds,
)
from flatmin.store import Store
from flatmin.train.config import TrainConfig

LIST_FLAGS = {"methods": "method", "datasets": "dataset", "models": "model", "augments": "augment"}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flatmin grid` flags: a grid file, list flags, and the shared config flags for scalars."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", type=options.path, help="grid file (.toml, or .yaml)")
    add_config_arguments(parser, skip=("--method", "--dataset", "--model", "--seed", "--augment"))
    for flag in LIST_FLAGS:
        parser.add_argument(f"--{flag}", default=None, help=f"comma-separated {flag}")
    parser.add_argument("--seeds", default=None, help="count or list of seeds (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2", help="cross a field")
    parser.add_argument("--tune", action="append", default=[], metavar="FIELD=V1,V2",
                        help="choose FIELD on the validation split first (repeatable)")
    parser.add_argument("--tune-seeds", default=None, help="seeds for tuning (default: the first 2)")
    parser.add_argument("--tune-metric", default=None, choices=tuning.METRICS, help="val metric (error)")
    parser.add_argument("--out", type=options.path, default=None, help="run folders and DB (runs/grid)")
    parser.add_argument("--db", type=options.path, default=None, help="results DB (default OUT/results.db)")
    parser.add_argument("--workers", type=options.POSITIVE_INT, default=None,
                        help="parallel processes (default: cores)")
    backends.add_arguments(parser)


def build(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(grid, tune, run) tables: the file's, overridden by the command line."""
    doc = load_file(args.config) if args.config else {}
    grid, tune, run = dict(doc.get("grid", {})), dict(doc.get("tune", {})), dict(doc.get("run", {}))
    grid.update(config_overrides(args))
    for flag, field in LIST_FLAGS.items():
        if getattr(args, flag) is not None:
            grid[field] = [v.strip() for v in getattr(args, flag).split(",") if v.strip()]
            if not grid[field]:
                raise FlatminError(f"--{flag} {getattr(args, flag)!r}: an empty list leaves nothing to run")
    grid.update(tuning.parse_sweep(args.set, "--set"))
    tune.update(tuning.parse_sweep(args.tune, "--tune"))
    if args.seeds is not None:
        grid.pop("seeds", None)
        grid["seed"] = parse_seeds(args.seeds)
    if args.tune_seeds is not None:
        tune["seeds"] = parse_seeds(args.tune_seeds, "--tune-seeds")
    if args.tune_metric:
        tune["metric"] = args.tune_metric
    for key, value in (("out", args.out), ("workers", args.workers)):
        if value is not None:
            run[key] = value
    return grid, tune, run


def run(args: argparse.Namespace) -> int:
    """Tune (if asked) and run the grid, then print Table 1 of the DB; exit 1 if any run failed."""
    grid, tune, opts = build(args)
    seeds = check_seeds(grid.pop("seeds", grid.pop("seed", [0])), "seeds")
    tune_seeds = check_seeds(tune.pop("seeds", seeds[:2]), "tune seeds")
    metric = tune.pop("metric", "error")
    per_method = {k: tune.pop(k) for k in list(tune) if isinstance(tune[k], dict)}
    bases = [TrainConfig.from_dict(d) for d in expand(grid)]
    sweeps = [{**{tuning.field_name(k): v for k, v in tune.items()},
               **{tuning.field_name(k): v for k, v in per_method.get(b.method, {}).items()}} for b in bases]
    for b in bases:
        resolved(b)  # names, numbers, device: checked before the store or any folder is written
    out = check_out(Path(opts.get("out", "runs/grid")))
    backend = backends.create(args, int(opts.get("workers") or default_workers()))  # before any write
    store = Store(args.db or out / "results.db")
    try:
        res = tuning.tune_and_run(bases, [b.method for b in bases], sweeps, seeds, tune_seeds, out, store,
                                  backend, metric)
        print(render(store, figures_dir=None))
    finally:
        store.close()
        backend.close()
    if res.failed:
        raise RunFailedError(f"{len(res.failed)} run(s) missing: {'; '.join(res.failed[:3])}"
                             f"{' ...' if len(res.failed) > 3 else ''}; re-run the command to retry them")
    return 0

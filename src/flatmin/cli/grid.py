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
from typing import Any

from flatmin.checks import POSITIVE_INT, name_list, parse_seeds
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.experiments import tuning
from flatmin.experiments.grid import run_grid
from flatmin.experiments.gridfile import load as load_file

LIST_FLAGS = {"methods": "method", "datasets": "dataset", "models": "model", "augments": "augment"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flatmin grid` flags: a grid file, list flags, and the shared config flags for scalars."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", type=options.path, help="grid file (.toml, or .yaml)")
    options.add_config_arguments(parser, skip=("--method", "--dataset", "--model", "--seed", "--augment"))
    for flag in LIST_FLAGS:
        parser.add_argument(f"--{flag}", default=None, help=f"comma-separated {flag}")
    parser.add_argument("--seeds", default=None, help="count or list of seeds (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2", help="cross a field")
    parser.add_argument("--tune", action="append", default=[], metavar="FIELD=V1,V2",
                        help="choose FIELD on the validation split first (repeatable; METHOD:FIELD=...: "
                             "that method's own grid)")
    parser.add_argument("--tune-seeds", default=None, help="seeds for tuning (default: the first 2)")
    parser.add_argument("--tune-metric", default=None, choices=tuning.METRICS, help="val metric (error)")
    parser.add_argument("--out", type=options.path, default=None, help="run folders and DB (runs/grid)")
    parser.add_argument("--db", type=options.path, default=None, help="results DB (default OUT/results.db)")
    options.add_quiet_argument(parser)
    parser.add_argument("--workers", type=POSITIVE_INT, default=None,
                        help="parallel processes (default: cores)")
    options.add_backend_arguments(parser)


def build(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(grid, tune, run) tables: the file's, overridden by the command line."""
    doc = load_file(args.config) if args.config else {}
    grid, tune, run = dict(doc.get("grid", {})), dict(doc.get("tune", {})), dict(doc.get("run", {}))
    grid.update(options.config_overrides(args))
    for flag, field in LIST_FLAGS.items():
        if getattr(args, flag) is not None:
            grid[field] = name_list(getattr(args, flag), f"--{flag}")
    crossed = tuning.parse_sweep(args.set, "--set")
    if own := [k for k in crossed if ":" in k]:
        raise FlatminError(f"--set {own[0]}: a method's own values are for --tune, not --set")
    grid.update(crossed)
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
    run_grid(grid, tune, opts, args.db, lambda workers: options.create_backend(args, workers),
             progress=False if args.quiet else None)
    return 0

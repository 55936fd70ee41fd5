"""`flatmin compare`: ERM vs AMP vs SAM (or any methods and AMP variants) over seeds, in parallel
processes, as a paper-style table (mean ± std of test error, NLL, ECE; CPU cost per step vs the
baseline) with figures, and paired verdicts: each spec vs ``--baseline`` seed by seed, "better" or
"worse" only when the 95% CI of the paired difference excludes 0 (see `flatmin.results.stats`).

Method specs: ``METHOD[:FIELD=VALUE,...]``, e.g. ``--methods erm,amp,amp:variant=onepass,sam:rho=0.1``
(a ``FIELD=VALUE`` after a comma belongs to the spec before it). ``--variants onepass,reuse`` adds
``amp:variant=onepass`` and ``amp:variant=reuse``. ``--tune epsilon=0.05,0.1`` chooses, per spec whose
method uses the field, the value with the best mean VALIDATION error over ``--tune-seeds`` seeds, then
runs only that value over ``--seeds``. Runs live in ``OUT/runs/<key>`` and ``OUT/results.db``: a
re-run with the same arguments trains nothing it has already finished.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flatmin.checks import POSITIVE_INT, Number, default_workers, name_list, parse_seeds
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.experiments import tuning
from flatmin.experiments.compare import (
    AUTO_BATCH,
    AUTO_CAP,
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    baseline_label,
    compare,
    parse_specs,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flatmin compare` flags: the `flatmin train` config flags plus the comparison's own."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    options.add_config_arguments(parser, skip=("--method", "--seed"))
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"method specs ({DEFAULT_METHODS})")
    parser.add_argument("--variants", default=None, help="AMP variants to add: exact,reuse,subbatch,onepass")
    parser.add_argument("--seeds", default=str(DEFAULT_SEEDS),
                        help=f"count or list ({DEFAULT_SEEDS}), or auto[:CAP]: add {AUTO_BATCH} seeds at a "
                             "time until the first method's test-error CI vs the baseline excludes 0 "
                             f"(cap {AUTO_CAP})")
    parser.add_argument("--baseline", default=None, help="spec the others are compared with (erm if listed)")
    parser.add_argument("--cost-epochs", type=Number(int, 0), default=3,
                        help="epochs per spec of the step-cost measurement after the runs (0: skip)")
    parser.add_argument("--workers", type=POSITIVE_INT, default=None,
                        help="parallel processes (default: cores)")
    parser.add_argument("--out", type=options.path, default=Path("runs/compare"), help="output folder")
    parser.add_argument("--tune", action="append", default=[], metavar="FIELD=V1,V2",
                        help="choose FIELD on the validation split (repeatable); METHOD:FIELD=V1,V2 gives "
                             "that method a grid of its own (msam:rho=0.5,1,3)")
    parser.add_argument("--tune-seeds", default="2", help="seeds for tuning: count or list (2)")
    parser.add_argument("--tune-metric", default="error", choices=tuning.METRICS,
                        help="validation metric minimised by --tune (error)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    options.add_quiet_argument(parser)
    options.add_backend_arguments(parser)


def seed_plan(text: str) -> tuple[list[int], int | None]:
    """``--seeds``: a count or list (no cap), or ``auto[:CAP]``: start at 5 seeds, cap (20) given."""
    head, _, cap = text.partition(":")
    if head.strip() != "auto":
        return parse_seeds(text), None
    if cap and (not cap.strip().isdigit() or int(cap) < 2):
        raise FlatminError(f"--seeds {text!r}: expected auto or auto:CAP with a cap of at least 2 seeds")
    cap_n = int(cap) if cap else AUTO_CAP
    return list(range(min(DEFAULT_SEEDS, cap_n))), cap_n


def run(args: argparse.Namespace) -> int:
    """Train every spec × seed (tuning first if asked; with ``--seeds auto`` batch after batch),
    print the table and the paired verdicts, write CSV/Markdown/JSON/PNGs."""
    if args.variants is not None:
        name_list(args.variants, "--variants")  # given but empty is a slip, not "no variants"
    specs = parse_specs(args.methods, args.variants)
    baseline = baseline_label(args.baseline, specs)
    seeds, cap = seed_plan(args.seeds)
    if cap is not None and len(specs) < 2:
        raise FlatminError("--seeds auto needs at least two specs (a method and the baseline)")
    if args.cost_epochs < 0:
        raise FlatminError(f"--cost-epochs must be >= 0, got {args.cost_epochs}")
    sweep, overrides = tuning.parse_sweep(args.tune), options.config_overrides(args)
    tune_seeds = parse_seeds(args.tune_seeds, "--tune-seeds")
    compare(specs, baseline, seeds, cap, overrides=overrides, sweep=sweep, tune_seeds=tune_seeds,
            tune_metric=args.tune_metric, out=args.out, cost_epochs=args.cost_epochs,
            figures=not args.no_figures, progress=False if args.quiet else None,
            backend=lambda: options.create_backend(args, args.workers or default_workers()))
    return 0

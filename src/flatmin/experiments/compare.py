"""`flatmin compare`: ERM vs AMP vs SAM (or any methods and AMP variants) over seeds, in parallel
processes, as a paper-style table (mean ± std of test error, NLL, ECE; time vs ERM) with figures.

Method specs: ``METHOD[:FIELD=VALUE,...]``, e.g. ``--methods erm,amp,amp:variant=onepass,sam:rho=0.1``
(a ``FIELD=VALUE`` after a comma belongs to the spec before it). ``--variants onepass,reuse`` adds
``amp:variant=onepass`` and ``amp:variant=reuse``. ``--tune epsilon=0.05,0.1`` chooses, per spec whose
method uses the field, the value with the best mean VALIDATION error over ``--tune-seeds`` seeds, then
runs only that value over ``--seeds``. Runs live in ``OUT/runs/<key>`` and ``OUT/results.db``: a
re-run with the same arguments trains nothing it has already finished.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatmin import options
from flatmin.errors import FlatminError, RunFailedError
from flatmin.experiments import backends, tuning
from flatmin.experiments import figures as fig
from flatmin.experiments.runner import resolved
from flatmin.experiments.tables import compare_table, mean_std
from flatmin.options import add_config_arguments, config_overrides, default_workers, parse_seeds
from flatmin.plot import write_csv
from flatmin.store import Store
from flatmin.train.config import TrainConfig

DEFAULT_METHODS = "erm,amp,sam"
DEFAULT_SEEDS = 5
PROTOCOL = ("dataset", "model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "val_fraction")


@dataclass
class Spec:
    """One column of the comparison: a method plus config fields fixed for it."""

    label: str
    method: str
    fields: dict[str, Any]


def parse_specs(text: str, variants: str | None = None) -> list[Spec]:
    """``erm,amp:variant=reuse,reuse_every=5,sam`` -> specs; ``variants`` adds one AMP spec each."""
    groups: list[list[str]] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if "=" in token and ":" not in token:
            if not groups:
                raise FlatminError(f"--methods {text!r}: {token!r} comes before any method")
            groups[-1].append(token)
        else:
            groups.append([token])
    groups += [[f"amp:variant={v.strip()}"] for v in (variants or "").split(",") if v.strip()]
    specs = []
    for g in groups:
        method, _, first = g[0].partition(":")
        pairs = [p for p in [first, *g[1:]] if p]
        fields = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise FlatminError(f"method spec {pair!r}: expected FIELD=VALUE")
            field = tuning.field_name(key)
            fields[field] = tuning.parse_value(field, value.strip())
        specs.append(Spec(",".join(g), method.strip(), fields))
    if not specs:
        raise FlatminError(f"--methods {text!r}: name at least one method, e.g. erm,amp,sam")
    if len({s.label for s in specs}) < len(specs):
        raise FlatminError(f"--methods lists a spec twice: {', '.join(s.label for s in specs)}")
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flatmin compare` flags: the `flatmin train` config flags plus the comparison's own."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser, skip=("--method", "--seed"))
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"method specs ({DEFAULT_METHODS})")
    parser.add_argument("--variants", default=None, help="AMP variants to add: exact,reuse,subbatch,onepass")
    parser.add_argument("--seeds", default=str(DEFAULT_SEEDS), help=f"count or list ({DEFAULT_SEEDS})")
    parser.add_argument("--workers", type=options.POSITIVE_INT, default=None,
                        help="parallel processes (default: cores)")
    parser.add_argument("--out", type=options.path, default=Path("runs/compare"), help="output folder")
    parser.add_argument("--tune", action="append", default=[], metavar="FIELD=V1,V2",
                        help="choose FIELD on the validation split (repeatable)")
    parser.add_argument("--tune-seeds", default="2", help="seeds for tuning: count or list (2)")
    parser.add_argument("--tune-metric", default="error", choices=tuning.METRICS,
                        help="validation metric minimised by --tune (error)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    backends.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Train every spec × seed (tuning first if asked), print the table, write CSV/Markdown/PNGs."""
    t0 = time.perf_counter()
    specs = parse_specs(args.methods, args.variants)
    seeds, sweep = parse_seeds(args.seeds), tuning.parse_sweep(args.tune)
    tune_seeds = parse_seeds(args.tune_seeds, "--tune-seeds")
    overrides = config_overrides(args)
    bases = [TrainConfig(**{**overrides, "method": s.method, **s.fields}) for s in specs]
    sweeps = [{k: v for k, v in sweep.items() if k not in s.fields} for s in specs]
    for b in bases:
        resolved(b)  # names, numbers, device: checked before the store or any folder is written
    backend = backends.create(args, args.workers or default_workers())  # before anything is written
    store = Store(options.check_out(args.out) / "results.db")
    try:
        res = tuning.tune_and_run(bases, [s.label for s in specs], sweeps, seeds,
                                  tune_seeds, args.out, store, backend, args.tune_metric)
        done = {r["key"]: r for r in store.rows()}
    finally:
        store.close()
        backend.close()
    if missing := [t for ts in res.tasks for t in ts if t.key not in done]:
        why = "; ".join(res.failed[:3]) + (" ..." if len(res.failed) > 3 else "") or "held by another process"
        raise RunFailedError(f"{len(missing)} runs did not finish ({why}); re-run the command to retry them")
    tasks = dict(enumerate(res.tasks))
    groups = {specs[i].label: [_result(done[t.key]) for t in tasks[i]] for i in range(len(specs))}
    print(summary(groups, tasks, specs, res, args.tune_metric, time.perf_counter() - t0))
    write_outputs(args.out, groups, tasks, specs, done, not args.no_figures)
    return 0


def _result(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["metrics"], "time_s": row["time_s"], "config": row["config"], "run_dir": row["run_dir"]}


def summary(groups: dict[str, list[dict]], tasks: dict[int, list], specs: list[Spec], res: tuning.Outcome,
            metric: str, wall_s: float) -> str:
    """The table, the hyperparameters each row used (and which were chosen on val), and the verdict."""
    first = tasks[0][0].config
    head = f"{first.dataset} / {first.model}, {len(tasks[0])} seeds, final epoch, test metrics mean ± std:"
    lines = [head, "",
             compare_table(groups, baseline="erm"),
             "protocol: " + ", ".join(f"{k}={getattr(first, k)}" for k in PROTOCOL)]
    for i, s in enumerate(specs):
        own = tuning.shown_fields(tasks[i][0].config.to_dict())
        note = (f"  [{', '.join(res.chosen[i])} chosen on the validation split by mean val {metric} over "
                f"seeds {res.plan.seeds}]" if len(res.plan.grids[i]) > 1 else "")
        lines.append(f"{s.label}: " + (", ".join(f"{k}={v}" for k, v in own.items()) or "-") + note)
    lines += [verdict(groups), f"wall time {wall_s:.1f}s"]
    return "\n".join(lines)


def verdict(groups: dict[str, list[dict]]) -> str:
    """Says plainly whether each AMP row beat ERM on test error and NLL (means over seeds)."""
    if "erm" not in groups:
        return ""
    base = {m: mean_std([r["test"][m] for r in groups["erm"]])[0] for m in ("error", "nll")}
    out = []
    for label, runs in groups.items():
        if label.startswith("amp"):
            d = {m: mean_std([r["test"][m] for r in runs])[0] - base[m] for m in ("error", "nll")}
            words = [f"{m} {d[m]:+.3g} ({'better' if d[m] < 0 else 'NOT better'})" for m in d]
            out.append(f"{label} vs erm: " + ", ".join(words))
    return "\n".join(out)


def write_outputs(out: Path, groups: dict[str, list[dict]], tasks: dict[int, list], specs: list[Spec],
                  done: dict[str, dict], figures: bool) -> None:
    """results.csv (one row per run), table.md, and the PNG figures."""
    rows = []
    for i, s in enumerate(specs):
        for t in tasks[i]:
            m = done[t.key]["metrics"]
            rows.append({"method": s.label, "seed": t.config.seed,
                         **{f"{sp}_{k}": m[sp][k] if m.get(sp) else None for sp in ("test", "val", "train")
                            for k in ("error", "nll", "ece")},
                         "time_s": done[t.key]["time_s"], "train_time_s": m["train_time_s"],
                         "epochs": t.config.epochs, "key": t.key, "run_dir": str(t.run_dir)})
    write_csv(out / "results.csv", rows)
    (out / "table.md").write_text(compare_table(groups))
    if figures:
        fig.metric_spread(groups, out / "metrics.png")
        fig.training_curves({s.label: [fig.read_log(t.run_dir) for t in tasks[i]]
                             for i, s in enumerate(specs)}, out / "curves.png")
        pair = {k: groups[k] for k in groups if k == "erm" or k.startswith("amp")}
        fig.reliability(pair if len(pair) > 1 else groups, out / "reliability.png")
    pngs = ", metrics.png, curves.png, reliability.png" if figures else ""
    print(f"wrote {out}/results.csv, table.md{pngs}")

"""`flatmin compare`: ERM vs AMP vs SAM (or any methods and AMP variants) over seeds, in parallel
processes, as a paper-style table (mean ± std of test error, NLL, ECE; CPU cost per step vs the
baseline) with figures, and paired verdicts: each spec vs ``--baseline`` seed by seed, "better" or
"worse" only when the 95% CI of the paired difference excludes 0 (see `flatmin.stats`).

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
from flatmin.experiments import backends, paired, tuning
from flatmin.experiments import figures as fig
from flatmin.experiments.runner import resolved
from flatmin.experiments.tables import compare_table
from flatmin.options import add_config_arguments, config_overrides, default_workers, parse_seeds
from flatmin.plot import write_csv
from flatmin.store import Store
from flatmin.train.config import TrainConfig

DEFAULT_METHODS = "erm,amp,sam"
DEFAULT_SEEDS = 5
AUTO_BATCH, AUTO_CAP = 5, 20  # --seeds auto: seeds added per round, and the most it will train
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
            field = tuning.field_name(key, method)
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
    parser.add_argument("--seeds", default=str(DEFAULT_SEEDS),
                        help=f"count or list ({DEFAULT_SEEDS}), or auto[:CAP]: add {AUTO_BATCH} seeds at a "
                             "time until the first method's test-error CI vs the baseline excludes 0 "
                             f"(cap {AUTO_CAP})")
    parser.add_argument("--baseline", default=None, help="spec the others are compared with (erm if listed)")
    parser.add_argument("--cost-epochs", type=options.Number(int, 0), default=3,
                        help="epochs per spec of the step-cost measurement after the runs (0: skip)")
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


def seed_plan(text: str) -> tuple[list[int], int | None]:
    """``--seeds``: a count or list (no cap), or ``auto[:CAP]``: start at 5 seeds, cap (20) given."""
    head, _, cap = text.partition(":")
    if head.strip() != "auto":
        return parse_seeds(text), None
    if cap and (not cap.strip().isdigit() or int(cap) < 2):
        raise FlatminError(f"--seeds {text!r}: expected auto or auto:CAP with a cap of at least 2 seeds")
    cap_n = int(cap) if cap else AUTO_CAP
    return list(range(min(DEFAULT_SEEDS, cap_n))), cap_n


def baseline_label(name: str | None, specs: list[Spec]) -> str:
    """The spec every other one is compared with: ``--baseline``, else erm if listed, else the first."""
    labels = [s.label for s in specs]
    if name is None:
        return "erm" if "erm" in labels else labels[0]
    if name not in labels:
        raise FlatminError(f"--baseline {name!r} is not one of the compared specs: {', '.join(labels)}")
    return name


def run(args: argparse.Namespace) -> int:
    """Train every spec × seed (tuning first if asked; with ``--seeds auto`` batch after batch),
    print the table and the paired verdicts, write CSV/Markdown/JSON/PNGs."""
    t0 = time.perf_counter()
    specs = parse_specs(args.methods, args.variants)
    baseline = baseline_label(args.baseline, specs)
    seeds, cap = seed_plan(args.seeds)
    if cap is not None and len(specs) < 2:
        raise FlatminError("--seeds auto needs at least two specs (a method and the baseline)")
    if args.cost_epochs < 0:
        raise FlatminError(f"--cost-epochs must be >= 0, got {args.cost_epochs}")
    rounds: list[dict[str, Any]] = []
    while True:
        res, done = train_specs(args, specs, seeds)
        tasks = dict(enumerate(res.tasks))
        groups = {specs[i].label: [_result(done[t.key]) for t in tasks[i]] for i in range(len(specs))}
        if cap is None:
            break
        primary = next(c for c in paired.comparisons(groups, baseline) if c.metric == "error")
        rounds.append({"seeds": len(seeds), "method": primary.method, **primary.summary()})
        print(f"seeds auto: {len(seeds)} seeds, {primary.method} vs {baseline} test error "
              f"{paired.ci_cell(primary)} -> {primary.verdict}")
        if primary.verdict in ("better", "worse") or len(seeds) >= cap:
            break
        seeds = list(range(min(cap, len(seeds) + AUTO_BATCH)))
    configs = {s.label: tasks[i][0].config for i, s in enumerate(specs)}
    ev = paired.Evidence.gather(groups, baseline, configs, args.cost_epochs, rounds, cap)
    text = summary(groups, tasks, specs, res, args.tune_metric, ev)
    print(text + f"\nwall time {time.perf_counter() - t0:.1f}s")
    write_outputs(args.out, groups, tasks, specs, done, not args.no_figures, ev)
    paired.write_summary(args.out, ev.payload(configs, seeds), text)
    return 0


def train_specs(args: argparse.Namespace, specs: list[Spec], seeds: list[int]) -> tuple[tuning.Outcome, dict]:
    """Tune (if asked) and train every spec over ``seeds``; finished runs are read back, not retrained."""
    sweep, overrides = tuning.parse_sweep(args.tune), config_overrides(args)
    tune_seeds = parse_seeds(args.tune_seeds, "--tune-seeds")
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
    return res, done


def _result(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["metrics"], "time_s": row["time_s"], "config": row["config"], "run_dir": row["run_dir"]}


def summary(groups: dict[str, list[dict]], tasks: dict[int, list], specs: list[Spec], res: tuning.Outcome,
            metric: str, ev: paired.Evidence) -> str:
    """The table, the hyperparameters each row used (and which were chosen on val), the verdicts."""
    first = tasks[0][0].config
    head = f"{first.dataset} / {first.model}, {len(tasks[0])} seeds, final epoch, test metrics mean ± std:"
    lines = [head, "", compare_table(groups, ev.columns()),
             "protocol: " + ", ".join(f"{k}={getattr(first, k)}" for k in PROTOCOL)]
    for i, s in enumerate(specs):
        own = tuning.shown_fields(tasks[i][0].config.to_dict())
        note = (f"  [{', '.join(res.chosen[i])} chosen on the validation split by mean val {metric} over "
                f"seeds {res.plan.seeds}]" if len(res.plan.grids[i]) > 1 else "")
        lines.append(f"{s.label}: " + (", ".join(f"{k}={v}" for k, v in own.items()) or "-") + note)
    return "\n".join(lines + ["", ev.text()])


def write_outputs(out: Path, groups: dict[str, list[dict]], tasks: dict[int, list], specs: list[Spec],
                  done: dict[str, dict], figures: bool, ev: paired.Evidence) -> None:
    """results.csv (one row per run), table.md, and the PNG figures."""
    rows = []
    for i, s in enumerate(specs):
        for t in tasks[i]:
            m = done[t.key]["metrics"]
            rows.append({"method": s.label, "seed": t.config.seed,
                         **{f"{sp}_{k}": m[sp][k] if m.get(sp) else None for sp in ("test", "val", "train")
                            for k in ("error", "nll", "ece")},
                         "time_s": done[t.key]["time_s"], "train_time_s": m["train_time_s"],
                         "cpu_s": (m.get("cost") or {}).get("cpu_s"),
                         "epochs": t.config.epochs, "key": t.key, "run_dir": str(t.run_dir)})
    write_csv(out / "results.csv", rows)
    (out / "table.md").write_text(compare_table(groups, ev.columns()))
    if figures:
        fig.metric_spread(groups, out / "metrics.png")
        fig.training_curves({s.label: [fig.read_log(t.run_dir) for t in tasks[i]]
                             for i, s in enumerate(specs)}, out / "curves.png")
        pair = {k: groups[k] for k in groups if k == "erm" or k.startswith("amp")}
        fig.reliability(pair if len(pair) > 1 else groups, out / "reliability.png")
    pngs = ", metrics.png, curves.png, reliability.png" if figures else ""
    print(f"wrote {out}/results.csv, table.md, summary.json, summary.md{pngs}")

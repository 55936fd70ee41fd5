"""Hyperparameters as the paper tunes them: every candidate trained on a few seeds, the one with
the best mean VALIDATION metric (final epoch) kept, and only that one run over the seeds for test.

The test split is never read here; `select` looks at ``metrics["val"]`` only.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatmin.checks import check_device, parse_number
from flatmin.errors import ConfigError, FlatminError
from flatmin.experiments.backends import Backend
from flatmin.experiments.runner import METHOD_FIELDS, Task, execute, make_task
from flatmin.optim import registry
from flatmin.results.store import Store
from flatmin.train.config import FIELD_RULES, TEXT_FIELDS, TrainConfig

ALIASES = {"variant": "amp_variant", "eps": "epsilon", "zeta": "inner_lr", "n": "inner_iter",
           "flood": "flood_level", "alpha": "mixup_alpha"}
METRICS = ("error", "nll")


def shown_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The method's own hyperparameters, without the AMP-variant knobs its variant does not use."""
    own = {k: config[k] for k in METHOD_FIELDS.get(config["method"], ())}
    variant = own.get("amp_variant")
    if variant is not None:
        for key, used_by in (("amp_variant", "-"), ("reuse_every", "reuse"), ("ascent_fraction", "subbatch")):
            if variant != used_by and not (key == "amp_variant" and variant != "exact"):
                own.pop(key)
    return own


def field_name(name: str, method: str | None = None) -> str:
    """A config field from a user's key: the method's own keyword (``gsam:alpha`` is gsam_alpha, as
    the registry declares), an alias or a field name, dashes or not; unknown names list the valid ones."""
    key = name.strip().replace("-", "_")
    if method is not None and (own := registry.resolve_key(method.strip(), key)) is not None:
        return own
    name = ALIASES.get(key, key)
    if name not in TrainConfig.__dataclass_fields__:
        raise FlatminError(f"unknown config field {name!r}; aliases: {', '.join(sorted(ALIASES))}")
    return name


def parse_value(field: str, text: str) -> Any:
    """A command-line string as the field's type: a number by its rule, a name stripped, a device
    checked; other fields as whatever the text reads as (int, float, true/false, text)."""
    try:
        if field in FIELD_RULES:
            return parse_number(FIELD_RULES[field], text)
        if field in TEXT_FIELDS:
            if not text.strip():
                raise ConfigError("expected a non-empty value")
            return text.strip()
        if field == "device":
            return check_device(text)
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(text.lower(), text)
    except ConfigError as err:
        raise FlatminError(f"{field}={text!r}: {err}") from None


def parse_sweep(specs: list[str], flag: str = "--tune") -> dict[str, list[Any]]:
    """``["epsilon=0.05,0.1", "inner_lr=0.5,1"]`` -> {"epsilon": [0.05, 0.1], "inner_lr": [0.5, 1.0]}.
    ``METHOD:FIELD=...`` is that method's own grid (``msam:rho=0.5,1,3``), kept as "msam:rho": for
    msam it replaces the plain ``rho`` grid (`for_method`), the other methods never see it."""
    sweep: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise FlatminError(f"{flag} {spec!r}: expected FIELD=V1,V2,... or METHOD:FIELD=V1,V2,...")
        method, colon, name = key.partition(":")
        if colon and method.strip() not in METHOD_FIELDS:
            raise FlatminError(f"{flag} {spec!r}: unknown method {method.strip()!r}; "
                               f"valid: {', '.join(METHOD_FIELDS)}")
        field = field_name(name, method) if colon else field_name(key)
        label = f"{method.strip()}:{field}" if colon else field
        sweep[label] = [parse_value(field, v) for v in values.split(",") if v.strip()]
        if not sweep[label]:
            raise FlatminError(f"{flag} {spec!r}: no values given")
    return sweep


def for_method(sweep: dict[str, list[Any]], method: str) -> dict[str, list[Any]]:
    """The sweep as one method sees it: the plain fields, a ``METHOD:FIELD`` grid of its own replacing
    FIELD's, other methods' own grids left out."""
    out = {k: v for k, v in sweep.items() if ":" not in k}
    for key, values in sweep.items():
        owner, colon, field = key.partition(":")
        if colon and owner == method:
            out[field] = values
    return out


def candidates(method: str, sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the sweep's values for the fields this method uses ([{}] if none)."""
    sweep = for_method(sweep, method)
    fields = [f for f in sweep if f in METHOD_FIELDS.get(method, ())]
    return [dict(zip(fields, combo)) for combo in itertools.product(*(sweep[f] for f in fields))]


def select(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest mean validation score (ties: the first listed)."""
    ok = [s for s in scores if math.isfinite(s["score"])]
    if not ok:
        raise FlatminError("every tuning candidate failed; nothing to choose from")
    return min(ok, key=lambda s: s["score"])


def score(results: list[dict[str, Any] | None], metric: str) -> float:
    """Mean final-epoch validation metric; inf if a run failed or has no validation split."""
    vals = [r["val"][metric] for r in results if r is not None and r.get("val")]
    return statistics.fmean(vals) if vals and len(vals) == len(results) else math.inf


@dataclass
class Plan:
    """Tuning runs per base config: ``tasks[i][c]`` are candidate c's runs (one per seed) for base i."""

    bases: list[TrainConfig]
    grids: list[list[dict[str, Any]]]
    tasks: list[list[list[Task]]]
    seeds: list[int]
    labels: list[str] | None = None  # each base's spec label (for the log; default: its method)

    def label(self, i: int) -> str:
        """How base i is named in the log: its spec's label (``amp:ball=per_tensor``), else its method."""
        return self.labels[i] if self.labels else self.bases[i].method

    def runs(self) -> list[Task]:
        """The runs to train (bases with a single candidate need no tuning)."""
        return [t for per_base in self.tasks if len(per_base) > 1 for ts in per_base for t in ts]


def plan(bases: list[TrainConfig], sweeps: list[dict[str, list[Any]]], seeds: list[int],
         root: str | Path, labels: list[str] | None = None) -> Plan:
    """Every candidate of every base config's sweep, on the tuning seeds (runs logged under ``labels``)."""
    labels = labels or [b.method for b in bases]
    grids = [candidates(b.method, sw) for b, sw in zip(bases, sweeps)]
    tasks = [[[make_task(b.replace(seed=s, **c), label, root) for s in seeds] for c in cands]
             for b, cands, label in zip(bases, grids, labels)]
    return Plan(bases, grids, tasks, list(seeds), labels)


def choose(p: Plan, store: Store, metric: str = "error",
           log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """For each base config, the swept values with the best mean VALIDATION metric; saved in the store."""
    if metric not in METRICS:
        raise FlatminError(f"tuning metric must be one of {', '.join(METRICS)}, got {metric!r}")
    done = {r["key"]: r["metrics"] for r in store.rows()}
    chosen = []
    for i, (b, cands, per_base) in enumerate(zip(p.bases, p.grids, p.tasks)):
        if len(cands) <= 1:
            chosen.append(cands[0] if cands else {})
            continue
        scores = [{"values": c, "score": score([done.get(t.key) for t in ts], metric)}
                  for c, ts in zip(cands, per_base)]
        best = select(scores)
        cell = {"method": b.method, "dataset": b.dataset, "model": per_base[0][0].config.model,
                "augment": b.augment}
        store.save_selection(cell, best["values"], metric, scores)
        log(f"{p.label(i)} on {b.dataset}: chose {_fmt(best['values'])} (mean val {metric} "
            f"{best['score']:.4g} over seeds {p.seeds})")
        chosen.append(best["values"])
    return chosen


def edges(grid: list[dict[str, Any]], chosen: dict[str, Any]) -> list[str]:
    """The chosen values that sit at their grid's lowest or highest value (numbers, ≥ 3 values): a wider
    grid might choose beyond them, so a table must say so."""
    out = []
    for field, value in chosen.items():
        values = sorted({c[field] for c in grid if isinstance(c.get(field), (int, float))
                         and not isinstance(c.get(field), bool)})
        if len(values) >= 3 and value in (values[0], values[-1]):
            out.append(f"{field}={value} is the grid's {'lowest' if value == values[0] else 'highest'}")
    return out


@dataclass
class Outcome:
    """What `tune_and_run` did: the final runs per base, the values chosen, and any failures."""

    tasks: list[list[Task]]
    chosen: list[dict[str, Any]]
    plan: Plan
    failed: list[str]


def tune_and_run(bases: list[TrainConfig], labels: list[str], sweeps: list[dict[str, list[Any]]],
                 seeds: list[int], tune_seeds: list[int], root: str | Path, store: Store,
                 workers: int | Backend, metric: str = "error",
                 log: Callable[[str], None] = print, progress: bool | None = None,
                 on_configs: Callable[[dict[str, TrainConfig]], None] | None = None,
                 spare: Callable[[], None] | None = None) -> Outcome:
    """Tune on val where a sweep has more than one candidate, then run every base over ``seeds``.

    Bases with nothing to tune train alongside the tuning runs, so the cores stay busy. ``progress``:
    the overall bar of `runner.execute` (None: on a terminal only). ``on_configs``: told each label's
    final configuration (first seed) as soon as it is known, before the runs that remain train;
    ``spare``: told when their last runs leave a core free (`runner.execute`).
    """
    p = plan(bases, sweeps, tune_seeds, root, labels)

    def final(i: int, values: dict[str, Any]) -> list[Task]:
        return [make_task(bases[i].replace(seed=s, **values), labels[i], root) for s in seeds]

    fixed = {i: (g[0] if g else {}) for i, g in enumerate(p.grids) if len(g) <= 1}
    tasks = {i: final(i, v) for i, v in fixed.items()}
    if p.runs():
        log(f"tuning {', '.join(sorted({k for g in p.grids if len(g) > 1 for k in g[0]}))} on the "
            f"validation split: {len(p.runs())} runs")
    def known() -> None:
        if on_configs is not None and len(tasks) == len(bases):
            on_configs({labels[i]: tasks[i][0].config for i in range(len(bases))})

    known()
    first = p.runs() + [t for ts in tasks.values() for t in ts]
    failed = execute(first, store, workers, log, progress=progress, spare=spare)
    chosen = choose(p, store, metric, log)
    if len(tasks) < len(bases):
        tasks.update({i: final(i, chosen[i]) for i in range(len(bases)) if i not in fixed})
        known()
    failed += execute([t for i in range(len(bases)) if i not in fixed for t in tasks[i]], store, workers, log,
                      progress=progress, spare=spare)
    return Outcome([tasks[i] for i in range(len(bases))], chosen, p, failed)


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

"""Comparisons of methods over seeds: specs (``METHOD[:FIELD=VALUE,...]``), the runs of every spec
(tuned on validation first if asked; with an automatic seed count, batch after batch), and the
table, paired verdicts and files they give. `flatmin compare` (`flatmin.cli.compare`) drives it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatmin.checks import POSITIVE_INT, check_out, parse_number
from flatmin.errors import FlatminError, RunFailedError
from flatmin.experiments import figures as fig
from flatmin.experiments import health, paired, tuning
from flatmin.experiments.backends import Backend
from flatmin.experiments.background import Background
from flatmin.experiments.runner import resolved
from flatmin.experiments.tables import compare_table
from flatmin.results.plot import pyplot, write_csv
from flatmin.results.store import Store
from flatmin.train.config import TrainConfig
from flatmin.train.methods import refuse_unread

DEFAULT_METHODS = "erm,amp,sam"
DEFAULT_SEEDS = 5
AUTO_BATCH, AUTO_CAP = 5, 20  # --seeds auto: seeds added per round, and the most it will train
# Data options a spec may set (``erm:train_size=10000``: the same method on twice the data, a positive
# control); the rest of the data is the command's.
DATA_KEYS = {"train_size": POSITIVE_INT}
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
            if (data_key := key.strip().replace("-", "_")) in DATA_KEYS:  # a data option (a positive control)
                try:
                    n = parse_number(DATA_KEYS[data_key], value.strip())
                except FlatminError as err:
                    raise FlatminError(f"method spec {pair!r}: {err}") from None
                fields.setdefault("dataset_options", {})[data_key] = n
                continue
            field = tuning.field_name(key, method)
            fields[field] = tuning.parse_value(field, value.strip())
        specs.append(Spec(",".join(g), method.strip(), fields))
    if not specs:
        raise FlatminError(f"--methods {text!r}: name at least one method, e.g. erm,amp,sam")
    if len({s.label for s in specs}) < len(specs):
        raise FlatminError(f"--methods lists a spec twice: {', '.join(s.label for s in specs)}")
    return specs


def baseline_label(name: str | None, specs: list[Spec]) -> str:
    """The spec every other one is compared with: ``--baseline``, else erm if listed, else the first."""
    labels = [s.label for s in specs]
    if name is None:
        return "erm" if "erm" in labels else labels[0]
    if name not in labels:
        raise FlatminError(f"--baseline {name!r} is not one of the compared specs: {', '.join(labels)}")
    return name


def compare(specs: list[Spec], baseline: str, seeds: list[int], cap: int | None, *,
            overrides: dict[str, Any], sweep: dict[str, list[Any]], tune_seeds: list[int], tune_metric: str,
            out: Path, backend: Callable[[], Backend], cost_epochs: int, figures: bool,
            progress: bool | None = None) -> None:
    """Train every spec × seed (tuning first if asked; with a ``cap``, batch after batch of seeds until
    the first spec's verdict against the baseline is clear), print the table and the paired
    verdicts, write CSV/Markdown/JSON/PNGs into ``out``."""
    t0 = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    work: Background | None = None  # the step cost, measured on a core the last runs leave free
    measured: dict[str, TrainConfig] = {}  # the configurations it measures

    def configs_known(configs: dict[str, TrainConfig]) -> None:
        nonlocal work
        if work is None:
            measured.update(configs)
            work = Background(lambda stop: _while_runs_train(configs, cost_epochs, figures, stop))

    def spare() -> None:
        if work is not None:
            work.go()
    try:
        while True:
            res, done = train_specs(specs, seeds, overrides, sweep, tune_seeds, tune_metric, out, backend,
                                    progress, configs_known, spare)
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
        steps = work.result() if work is not None and measured == configs else None
    except BaseException:
        if work is not None:
            work.cancel()
        raise
    ev = paired.Evidence.gather(groups, baseline, configs, cost_epochs, rounds, cap, steps)
    text = summary(groups, tasks, specs, res, tune_metric, ev)
    print(text + f"\nwall time {time.perf_counter() - t0:.1f}s")
    write_outputs(out, groups, tasks, specs, done, figures, ev)
    paired.write_summary(out, ev.payload(configs, seeds), text)


def _while_runs_train(configs: dict[str, TrainConfig], cost_epochs: int, figures: bool,
                      stop: threading.Event) -> dict[str, dict[str, float]]:
    """What the driver can do before the runs end: measure the step cost, import matplotlib."""
    steps = paired.step_cost(configs, cost_epochs, stop) if cost_epochs > 0 else {}
    if figures:
        try:
            pyplot()
        except FlatminError:  # said where the figures are drawn
            pass
    return steps


def train_specs(specs: list[Spec], seeds: list[int], overrides: dict[str, Any], sweep: dict[str, list[Any]],
                tune_seeds: list[int], tune_metric: str, out: Path, make_backend: Callable[[], Backend],
                progress: bool | None = None,
                on_configs: Callable[[dict[str, TrainConfig]], None] | None = None,
                spare: Callable[[], None] | None = None) -> tuple[tuning.Outcome, dict]:
    """Tune (if asked) and train every spec over ``seeds``; finished runs are read back, not retrained.
    ``on_configs``, ``spare``: as `tuning.tune_and_run` takes them."""
    bases = [TrainConfig(**{**overrides, "method": s.method, **s.fields, "dataset_options": {
        **overrides.get("dataset_options", {}), **s.fields.get("dataset_options", {})}}) for s in specs]
    sweeps = [{k: v for k, v in tuning.for_method(sweep, s.method).items() if k not in s.fields}
              for s in specs]
    refuse_unread(bases, overrides, {f: f"--{f.replace('_', '-')}" for f in overrides})
    refuse_unread(bases, {k for sw in sweeps for k in sw}, {k: f"--tune {k}" for sw in sweeps for k in sw})
    for s, b in zip(specs, bases):  # a spec's own field its method does not read: a slip in the spec
        refuse_unread([b], s.fields, {f: f"method spec {s.label!r}" for f in s.fields})
    for b in bases:
        resolved(b)  # names, numbers, device: checked before the store or any folder is written
    backend = make_backend()  # before anything is written (a Ray driver connects only after the checks)
    try:
        if hasattr(backend, "start"):
            backend.start()  # local workers import torch while the store opens and the runs are planned
        store = Store(check_out(out) / "results.db")
    except BaseException:
        backend.close()
        raise
    try:
        res = tuning.tune_and_run(bases, [s.label for s in specs], sweeps, seeds,
                                  tune_seeds, out, store, backend, tune_metric, progress=progress,
                                  on_configs=on_configs, spare=spare)
        done = {r["key"]: r for r in store.rows()}
    finally:
        store.close()
        backend.close()
    if missing := [t for ts in res.tasks for t in ts if t.key not in done]:
        why = "; ".join(res.failed[:3]) + (" ..." if len(res.failed) > 3 else "") or "held by another process"
        raise RunFailedError(f"{len(missing)} runs did not finish ({why}); re-run the command to retry them")
    return res, done


def _result(row: dict[str, Any]) -> dict[str, Any]:
    """A run as the tables read it: its metrics (health included), config, folder and provenance."""
    return {**row["metrics"], "time_s": row["time_s"], "config": row["config"], "run_dir": row["run_dir"],
            "versions": row.get("versions"), "device": row.get("device")}


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
        if at_edge := tuning.edges(res.plan.grids[i], res.chosen[i]) if len(res.plan.grids[i]) > 1 else []:
            note += f"  [at the grid's edge: {'; '.join(at_edge)}: a wider grid might choose beyond it]"
        lines.append(f"{s.label}: " + (", ".join(f"{k}={v}" for k, v in own.items()) or "-") + note)
    lines += [health.build_line(groups), health.overview(groups)]
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
                         "health": health.status(_result(done[t.key])),
                         "threads": health.threads(done[t.key]),
                         "time_s": done[t.key]["time_s"], "train_time_s": m["train_time_s"],
                         "cpu_s": (m.get("cost") or {}).get("cpu_s"),
                         "epochs": t.config.epochs, "key": t.key, "run_dir": str(t.run_dir)})
    write_csv(out / "results.csv", rows)
    (out / "table.md").write_text(compare_table(groups, ev.columns()))
    if figures:
        fig.metric_spread(groups, out / "metrics.png")
        fig.training_curves({s.label: [fig.read_log(t.run_dir) for t in tasks[i]]
                             for i, s in enumerate(specs)}, out / "curves.png")
        fig.reliability(groups, out / "reliability.png")
        if ev.comps:
            fig.forest(ev.comps, out / "verdicts.png")
    pngs = (", metrics.png, curves.png, reliability.png" + (", verdicts.png" if ev.comps else "")
            if figures else "")
    print(f"wrote {out}/results.csv, table.md, summary.json, summary.md{pngs}")

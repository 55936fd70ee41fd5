"""Run health and thread counts in the tables: a column per method, a line per affected run, a note on
the verdicts. Collapsed runs stay in every mean; these say which runs they are.

A run is a compare result (metrics at the top level, ``health`` the block of metrics.json) or a store
row (``metrics`` nested, ``health`` the status column). A run recorded before run health existed is
assessed from its log.jsonl when its folder is still there, else counted as "not recorded".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from flatmin.errors import FlatminError
from flatmin.train import health as run_health
from flatmin.train.logging import read_epochs

NOT_OK = ("collapsed", "unstable")


def block(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's health block, from its metrics, its store column or (an older run) its log."""
    if isinstance(run.get("health"), dict):
        return run["health"]
    metrics = run.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("health"), dict):
        return metrics["health"]
    if run.get("health") in run_health.STATUSES:
        return {"status": run["health"], "events": []}
    return _from_log(run)


def _from_log(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """An older run's health, assessed from the epoch records of its log (None without a full log)."""
    folder, config = run.get("run_dir"), run.get("config") or {}
    return _assess_log(str(folder), int(config["epochs"])) if folder and config.get("epochs") else None


@lru_cache(maxsize=1024)
def _assess_log(folder: str, epochs: int) -> dict[str, Any] | None:
    """Read once per process: the tables ask about a run several times."""
    try:
        records = read_epochs(Path(folder))
    except (OSError, FlatminError):
        return None
    if len(records) != epochs or any("train_loss" not in e for e in records):
        return None
    return {**run_health.assess(records, epochs), "from_log": True}


def status(run: Mapping[str, Any]) -> str | None:
    """"ok", "unstable", "collapsed", or None (not recorded)."""
    h = block(run)
    return h.get("status") if h else None


def seed(run: Mapping[str, Any]) -> Any:
    return run["seed"] if "seed" in run else (run.get("config") or {}).get("seed")


def cell(runs: list[Mapping[str, Any]]) -> str:
    """'1/5 collapsed' (and ', 1 unstable', ', 2 not recorded' when there are)."""
    found = [status(r) for r in runs]
    text = f"{found.count('collapsed')}/{len(runs)} collapsed"
    if n := found.count("unstable"):
        text += f", {n} unstable"
    if n := found.count(None):
        text += f", {n} not recorded"
    return text


def collapsed_note(label: str, runs: list[Mapping[str, Any]]) -> str:
    """'1 of 10 amp runs collapsed: seed 23' ('' when none did)."""
    seeds = [seed(r) for r in runs if status(r) == "collapsed"]
    if not seeds:
        return ""
    return f"{len(seeds)} of {len(runs)} {label} runs collapsed: seed{'s' if len(seeds) > 1 else ''} " + \
        ", ".join(str(s) for s in sorted(seeds))


def verdict_note(method: str, baseline: str, notes: Mapping[str, str]) -> str:
    """What a verdict line adds when runs of either side collapsed: ' (1 of 10 amp runs collapsed: …)'."""
    said = [notes[k] for k in (method, baseline) if notes.get(k)]
    return f" ({'; '.join(said)})" if said else ""


def run_lines(groups: Mapping[str, list[Mapping[str, Any]]]) -> list[str]:
    """One line per run that collapsed or was unstable: method, seed, status, what happened."""
    lines = []
    for label, runs in groups.items():
        for r in runs:
            h = block(r)
            if h and h.get("status") in NOT_OK:
                how = run_health.summary(h) if h.get("events") else "see its log.jsonl"
                lines.append(f"  {label} seed {seed(r)}: {h['status']}: {how}")
    return lines


def overview(groups: Mapping[str, list[Mapping[str, Any]]]) -> str:
    """The health paragraph: a count over all runs, then a line per affected run."""
    runs = [r for rs in groups.values() for r in rs]
    found = [status(r) for r in runs]
    t = run_health.Thresholds()
    rule = (f"collapsed: an epoch's training loss ≥ {t.spike_ratio:g}× its running minimum (and ≥ "
            f"{t.loss_floor:g}) or back at chance after learning, or a final loss ≥ {t.late_ratio:g}× the "
            "best, or at chance at the end without ever learning; unstable: skipped steps")
    head = (f"run health: {found.count('collapsed')} of {len(runs)} runs collapsed, "
            f"{found.count('unstable')} unstable" +
            (f", {found.count(None)} not recorded" if None in found else "") + f" ({rule})")
    lines = run_lines(groups)
    if lines:
        head += "; every run stays in the means above:"
    return "\n".join([head, *lines])


def threads(run: Mapping[str, Any]) -> int | None:
    """The torch thread count the run trained with (provenance; older runs: from the device string)."""
    versions = run.get("versions") or {}
    if isinstance(versions.get("threads"), int):
        return versions["threads"]
    found = re.search(r"(\d+) threads?\)", str(run.get("device") or ""))
    return int(found.group(1)) if found else None


def threads_cell(runs: list[Mapping[str, Any]]) -> str:
    """'1', or '1, 2' when the runs differ, '?' for runs that do not say."""
    counts = sorted({threads(r) for r in runs}, key=lambda n: (n is None, n or 0))
    return ", ".join("?" if n is None else str(n) for n in counts) or "?"


def build_line(groups: Mapping[str, list[Mapping[str, Any]]]) -> str:
    """Threads, CPU kernels and BLAS over all runs, in one line (what can change a number on a CPU)."""
    runs = [r for rs in groups.values() for r in rs]
    def distinct(key: str) -> str:
        return ", ".join(sorted({str((r.get("versions") or {}).get(key, "not recorded")) for r in runs}))
    return (f"torch threads per run: {threads_cell(runs)}; torch {distinct('torch')}, CPU kernels "
            f"{distinct('cpu_capability')}, BLAS {distinct('blas')}")


def columns(groups: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, dict[str, str]]:
    """The table's extra columns: threads per run and the health count."""
    return {"threads": {k: threads_cell(v) for k, v in groups.items()},
            "health": {k: cell(v) for k, v in groups.items()}}


def payload(groups: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, Any]:
    """summary.json's health: per label the status counts and every run's status and events."""
    out = {}
    for label, runs in groups.items():
        found = [status(r) for r in runs]
        out[label] = {"runs": len(runs), **{s: found.count(s) for s in run_health.STATUSES},
                      "not_recorded": found.count(None),
                      "per_run": [{"seed": seed(r), "status": status(r), "threads": threads(r),
                                   "events": (block(r) or {}).get("events")} for r in runs]}
    return out

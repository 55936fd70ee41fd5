"""Runs as tasks: each keyed by a hash of its resolved config, trained in its own folder with
``resume=True`` by a backend (a local process pool, or Ray), and recorded in the `Store` by this
process alone."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flatmin.data.registry import canonical_name, folder_name, get_loader
from flatmin.experiments.backends import Backend, Ledger
from flatmin.experiments.backends.base import Task, measured, usable_cores  # noqa: F401 (re-exported)
from flatmin.experiments.backends.local import LocalBackend
from flatmin.results.store import Store
from flatmin.train.config import TrainConfig, check_config, resolve
from flatmin.train.methods import RuleMethod, get_method, ignored_fields, method_fields

NOT_IN_KEY = ("data_dir", "download", "tensorboard")  # where data lives, what logs: not a result
# The config fields that only matter to one method (a run's "hyperparameters" in the tables).
METHOD_FIELDS: dict[str, tuple[str, ...]] = method_fields()  # each Method owns its fields
ALL_METHOD_FIELDS = {f for fields in METHOD_FIELDS.values() for f in fields}


# Fields added after runs were stored, at the value every earlier run had: left out of the key there.
LATE_FIELDS = (("accumulate", 1), ("eval_every", 1), ("sam_splits", 1), ("lr_schedule", "step"),
               ("warmup_epochs", 0), ("gsam_rho_min", None), ("gsam_adaptive_perturbation", False),
               ("gsam_minimize_fp", True), ("bsam_prior_precision", None), ("bsam_data_factor", None),
               ("bsam_test_samples", 32), ("asam_eta", 0.0), ("asam_weights_only", False),
               ("msam_decay_at", "theta"), ("wsam_max_norm", None))


def unused_fields(cfg: TrainConfig) -> list[str]:
    """Method fields this run's method (and AMP variant) never reads."""
    return sorted(ignored_fields(cfg, ALL_METHOD_FIELDS))


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with presets filled in and fields the method does not use at their defaults;
    checked by building its optimizer, so a bad combination fails before anything trains."""
    check_config(cfg)
    loader = get_loader(cfg.dataset)
    method, default = get_method(cfg.method), TrainConfig()
    cfg = cfg.replace(dataset=canonical_name(cfg.dataset),  # a grid file's relative data path
                      **{f: getattr(default, f) for f in unused_fields(cfg)})
    cfg = resolve(cfg, loader.defaults, loader.default_model)
    method.build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    return cfg


def config_key(cfg: TrainConfig) -> str:
    """A stable hash of the resolved config less what the method ignores: ERM is one run whatever
    ε or the ε preset say, and the same run always has the same key and folder."""
    c = resolved(cfg)
    skip = set(NOT_IN_KEY) | set(unused_fields(c))
    d = {k: v for k, v in c.to_dict().items() if k not in skip}
    for late, default in LATE_FIELDS:
        if late in d and d[late] == default:  # fields added later stay out of the key at their default
            del d[late]
    if fingerprint := getattr(get_loader(c.dataset), "fingerprint", None):  # the user's files
        d["data_fingerprint"] = fingerprint(**c.dataset_options)  # edited data: new runs, not stale ones
    if d.get("fsdp") is False:
        del d["fsdp"]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def make_task(cfg: TrainConfig, label: str, root: str | Path) -> Task:
    """A task for ``cfg`` whose folder is ``root/runs/<method>_<dataset>_s<seed>_<key>``."""
    c, key = resolved(cfg), config_key(cfg)
    return Task(key, label, c, Path(root) / "runs" / f"{c.method}_{folder_name(c.dataset)}_s{c.seed}_{key}")


class Progress:
    """One overall line on a terminal (tqdm, on stderr): runs done of all, the ETA, and what trains
    now; the per-run lines print above it. Nothing at all in a pipe or when not ``enabled``."""

    def __init__(self, total: int, log: Callable[[str], None], enabled: bool | None = None) -> None:
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.log, self.running = log, {}
        self.bar = tqdm(total=total, unit="run", desc="runs", dynamic_ncols=True, mininterval=0.5,
                        smoothing=0.0, leave=False) if enabled and total else None

    def started(self, t: Task) -> None:
        self.running[t.key] = f"{t.label} s{t.config.seed}"
        self._show()

    def ended(self, t: Task, line: str) -> None:
        self.running.pop(t.key, None)
        self.say(line)
        if self.bar is not None:
            self.bar.update(1)
            self._show()

    def say(self, line: str) -> None:
        """A line of the log, printed above the bar."""
        if self.bar is None:
            self.log(line)
        else:
            with tqdm.external_write_mode():
                self.log(line)

    def _show(self) -> None:
        if self.bar is not None:
            now = list(self.running.values())
            self.bar.set_postfix_str("training " + ", ".join(now[:3]) + (" ..." if len(now) > 3 else "")
                                     if now else "", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(tasks: list[Task], store: Store, workers: int | Backend = 1,
            log: Callable[[str], None] = print, poll_s: float = 1.0, progress: bool | None = None,
            spare: Callable[[], None] | None = None) -> list[str]:
    """Train every unfinished task on ``workers`` (a count: local processes, or a backend), waiting
    for runs a live peer holds and taking over those whose owner died; this process alone writes
    the store. Returns one message per run that is not in the store at the end (why it is not).
    ``progress``: the overall bar (None: on a terminal only); ``spare``: told when the last runs
    leave a worker's core free (a backend that knows)."""
    backend = LocalBackend(workers) if isinstance(workers, int) else workers
    unique = list({t.key: t for t in tasks}.values())
    done = store.done_keys()
    queue = sorted((t for t in unique if t.key not in done), key=_expected_work, reverse=True)
    if len(queue) < len(unique):
        log(f"{len(unique) - len(queue)} of {len(unique)} runs already in {store.path}")
    failed: dict[str, str] = {}
    held: list[Task] = []  # claimed by a live peer: tried again until finished, or taken over
    bar = Progress(len(queue), log, progress)

    def claim(t: Task) -> bool:
        state = store.try_claim(t.key)
        if state == "held":
            held.append(t)
        if state == "claimed":
            bar.started(t)
        return state == "claimed"

    def finished(t: Task, result: dict[str, Any]) -> None:
        store.insert(t.key, t.label, result, str(t.run_dir))
        state = (result.get("health") or {}).get("status", "ok")  # a collapse is said when it lands
        bar.ended(t, f"{t.label:28s} seed {t.config.seed}: test err {result['test']['error']:6.2f}% "
                  f"nll {result['test']['nll']:.3f} val err {_val(result)} ({result['time_s']:.1f}s)"
                  + ("" if state == "ok" else f" [{state}]"))

    def fail(t: Task, message: str) -> None:
        store.release(t.key)
        failed[t.key] = f"{t.label} seed {t.config.seed}: {message}"
        bar.ended(t, f"FAILED {failed[t.key]}")

    ledger = Ledger(claim=claim, renew=lambda ts: store.renew([t.key for t in ts]), finished=finished,
                    failed=fail, heartbeat_s=store.lease_s / 4,
                    holding=lambda ts: store.heartbeat([t.key for t in ts]), spare=spare)
    try:
        while queue:
            held.clear()
            backend.run(queue, ledger)
            done = store.done_keys()
            queue = [t for t in held if t.key not in done]
            if queue:
                time.sleep(poll_s)  # a live peer trains these; its claim is taken over if it dies
    finally:
        bar.close()
    done = store.done_keys()
    return [failed.get(t.key, f"{t.label} seed {t.config.seed}: not finished") for t in unique
            if t.key not in done]

def _expected_work(t: Task) -> float:
    """A run's work, roughly: epochs × passes per step (2 for a perturbation rule, else 1). The
    longest runs start first (stable among equals), so the cores do not end with one long run
    while the others idle. Runs are seeded and single-threaded: the order changes no number."""
    method = get_method(t.config.method)
    return (t.config.epochs or 1) * (2.0 if isinstance(method, RuleMethod) and method.name != "erm" else 1.0)


def _val(result: dict[str, Any]) -> str:
    return f"{result['val']['error']:6.2f}%" if result.get("val") else "  n/a"

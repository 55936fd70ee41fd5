"""Runs as tasks: each keyed by a hash of its resolved config, trained in its own folder with
``resume=True`` by a backend (a local process pool, or Ray), and recorded in the `Store` by this
process alone."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flatmin.data.registry import DATASETS
from flatmin.errors import UnknownNameError
from flatmin.experiments.backends import Backend, Ledger
from flatmin.experiments.backends.local import LocalBackend
from flatmin.experiments.store import Store
from flatmin.train.config import TrainConfig, resolve
from flatmin.train.methods import get_method

NOT_IN_KEY = ("data_dir", "download")  # where the data lives does not change a result
# The config fields that only matter to one method (a run's "hyperparameters" in the tables).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "erm": (), "dropout": ("dropout",), "label_smoothing": ("label_smoothing",),
    "flooding": ("flood_level",), "mixup": ("mixup_alpha",), "adv_training": ("adv_epsilon",),
    "rmp": ("rmp_radius", "ball"), "sam": ("rho",), "asam": ("rho",),
    "amp": ("epsilon", "inner_lr", "inner_iter", "ball", "amp_variant", "reuse_every", "ascent_fraction"),
}
ALL_METHOD_FIELDS = {f for fields in METHOD_FIELDS.values() for f in fields}
VARIANT_FIELDS = {"reuse_every": "reuse", "ascent_fraction": "subbatch"}  # AMP field -> its variant


@dataclass
class Task:
    """One run to do: its resolved config, its key, a label for tables, and its folder."""

    key: str
    label: str
    config: TrainConfig
    run_dir: Path


def unused_fields(cfg: TrainConfig) -> list[str]:
    """Method fields this run's method (and AMP variant) never reads."""
    own = METHOD_FIELDS.get(cfg.method, tuple(ALL_METHOD_FIELDS))
    return sorted({f for f in ALL_METHOD_FIELDS if f not in own}
                  | {f for f, variant in VARIANT_FIELDS.items() if cfg.amp_variant != variant})


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with presets filled in and fields the method does not use at their defaults;
    checked by building its optimizer, so a bad combination fails before anything trains."""
    if cfg.dataset not in DATASETS:
        raise UnknownNameError("dataset", cfg.dataset, list(DATASETS))
    method, default = get_method(cfg.method), TrainConfig()
    cfg = cfg.replace(**{f: getattr(default, f) for f in unused_fields(cfg)})
    loader = DATASETS[cfg.dataset]
    cfg = resolve(cfg, loader.defaults, loader.default_model)
    method.build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    return cfg


def config_key(cfg: TrainConfig) -> str:
    """A stable hash of the resolved config less what the method ignores: ERM is one run whatever
    ε or the ε preset say, and the same run always has the same key and folder."""
    c = resolved(cfg)
    skip = set(NOT_IN_KEY) | set(unused_fields(c))
    d = {k: v for k, v in c.to_dict().items() if k not in skip}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def make_task(cfg: TrainConfig, label: str, root: str | Path) -> Task:
    """A task for ``cfg`` whose folder is ``root/runs/<method>_<dataset>_s<seed>_<key>``."""
    c, key = resolved(cfg), config_key(cfg)
    return Task(key, label, c, Path(root) / "runs" / f"{c.method}_{c.dataset}_s{c.seed}_{key}")


def execute(tasks: list[Task], store: Store, workers: int | Backend = 1,
            log: Callable[[str], None] = print) -> list[str]:
    """Train every unfinished, unclaimed task on ``workers`` (a count: local processes, or a backend);
    this process alone writes the store. Returns the error messages of runs that failed."""
    backend = LocalBackend(workers) if isinstance(workers, int) else workers
    unique = list({t.key: t for t in tasks}.values())
    done = store.done_keys()
    queue = [t for t in unique if t.key not in done]
    if len(queue) < len(unique):
        log(f"{len(unique) - len(queue)} of {len(unique)} runs already in {store.path}")
    failed: list[str] = []

    def finished(t: Task, result: dict[str, Any]) -> None:
        store.insert(t.key, t.label, result, str(t.run_dir))
        log(f"{t.label:28s} seed {t.config.seed}: test err {result['test']['error']:6.2f}% "
            f"nll {result['test']['nll']:.3f} val err {_val(result)} ({result['time_s']:.1f}s)")

    def fail(t: Task, message: str) -> None:
        store.release(t.key)
        failed.append(f"{t.label} seed {t.config.seed}: {message}")
        log(f"FAILED {failed[-1]}")

    backend.run(queue, Ledger(claim=lambda t: store.claim(t.key),
                              renew=lambda ts: store.renew([t.key for t in ts]),
                              finished=finished, failed=fail, heartbeat_s=store.lease_s / 4))
    if elsewhere := store.held_elsewhere([t.key for t in unique]):
        log(f"{len(elsewhere)} runs are being trained by another process; re-run to collect them")
    return failed


def _val(result: dict[str, Any]) -> str:
    return f"{result['val']['error']:6.2f}%" if result.get("val") else "  n/a"

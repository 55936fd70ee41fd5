"""Runs as tasks: each keyed by a hash of its resolved config, trained in its own folder with
``resume=True`` in a pool of single-threaded worker processes, and recorded in the `Store`."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flatmin.data.registry import DATASETS
from flatmin.errors import FlatminError, UnknownNameError
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


def _init_worker() -> None:
    """One torch thread per process (tiny models on a shared CPU run fastest that way)."""
    torch.set_num_threads(1)


def _init_pool_worker() -> None:
    """Also die with the grid process (Linux): a SIGKILLed grid must leave no orphan still training
    a run whose claim the restarted grid will take over."""
    _init_worker()
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _train(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Worker body: train (or resume, or just read back) one run."""
    from flatmin.train.checkpoint import CHECKPOINT
    from flatmin.train.loop import train

    cfg = TrainConfig.from_dict(config)
    resolved(cfg)  # a process's first optimizer imports torch._dynamo (~1 s CPU): not the method's cost
    resumed = (Path(run_dir) / CHECKPOINT).exists()  # then the cost covers only the last part
    result = measured(train, cfg, run_dir, resume=True, progress=False)
    result["cost"]["resumed"] = resumed
    return result


def usable_cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _run_delay() -> float | None:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), else None."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def measured(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn``'s result plus ``cost``: CPU and wall seconds, the seconds spent waiting for a core
    (wait_s; None off Linux) and the machine's load: wall time alone says more about the machine's
    other jobs than about the method once runs wait for cores."""
    load0, delay0, cpu0, wall0 = _load(), _run_delay(), time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    cpu, wall, delay = time.process_time() - cpu0, time.perf_counter() - wall0, _run_delay()
    result["cost"] = {"cpu_s": cpu, "wall_s": wall, "load_start": load0, "load_end": _load(),
                      "wait_s": delay - delay0 if delay is not None and delay0 is not None else None,
                      "cores": usable_cores(), "threads": torch.get_num_threads()}
    return result


class _Inline:
    """An executor that runs each task at submit time: workers=1 needs no extra process."""

    def __init__(self) -> None:
        _init_worker()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - reported per run by `execute`
            fut.set_exception(err)
        return fut

    def shutdown(self, **_: Any) -> None:
        pass


def execute(tasks: list[Task], store: Store, workers: int = 1,
            log: Callable[[str], None] = print) -> list[str]:
    """Train every unfinished, unclaimed task; returns the error messages of runs that failed."""
    if workers < 1:
        raise FlatminError(f"--workers must be >= 1, got {workers}")
    unique = list({t.key: t for t in tasks}.values())
    done = store.done_keys()
    queue = [t for t in unique if t.key not in done]
    if len(queue) < len(unique):
        log(f"{len(unique) - len(queue)} of {len(unique)} runs already in {store.path}")
    spawn = multiprocessing.get_context("spawn")
    pool: Any = _Inline() if workers == 1 or len(queue) <= 1 else ProcessPoolExecutor(
        min(workers, len(queue)), mp_context=spawn, initializer=_init_pool_worker)
    in_flight: dict[Future, Task] = {}
    failed: list[str] = []
    try:
        while queue or in_flight:
            while queue and len(in_flight) < workers:
                t = queue.pop(0)
                if store.claim(t.key):
                    in_flight[pool.submit(_train, t.config.to_dict(), str(t.run_dir))] = t
            if not in_flight:
                break
            finished, _ = wait(list(in_flight), timeout=store.lease_s / 4, return_when=FIRST_COMPLETED)
            store.renew([t.key for t in in_flight.values()])
            for fut in finished:
                t = in_flight.pop(fut)
                try:
                    result = fut.result()
                except Exception as err:  # noqa: BLE001 - one bad run must not sink the grid
                    store.release(t.key)
                    failed.append(f"{t.label} seed {t.config.seed}: {type(err).__name__}: {err}")
                    log(f"FAILED {failed[-1]}")
                    continue
                store.insert(t.key, t.label, result, str(t.run_dir))
                log(f"{t.label:28s} seed {t.config.seed}: test err {result['test']['error']:6.2f}% "
                    f"nll {result['test']['nll']:.3f} val err {_val(result)} ({result['time_s']:.1f}s)")
    finally:
        pool.shutdown(cancel_futures=True)
    if elsewhere := store.held_elsewhere([t.key for t in unique]):
        log(f"{len(elsewhere)} runs are being trained by another process; re-run to collect them")
    return failed


def _val(result: dict[str, Any]) -> str:
    return f"{result['val']['error']:6.2f}%" if result.get("val") else "  n/a"

"""What every backend shares: the driver's `Ledger`, the `Backend` protocol, the worker body."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from flatmin.train.checkpoint import CHECKPOINT
from flatmin.train.config import TrainConfig
from flatmin.train.loop import train
from flatmin.train.methods import get_method


@dataclass
class Task:
    """One run to do: its resolved config, its key, a label for tables, and its folder."""

    key: str
    label: str
    config: TrainConfig
    run_dir: Path


@dataclass
class Ledger:
    """The driver's side of a batch of runs: each callback writes the store (one writer)."""

    claim: Callable[[Task], bool]  # may this process train the run (not finished, not held elsewhere)?
    renew: Callable[[list[Task]], None]  # extend the leases of the runs in flight
    finished: Callable[[Task, dict[str, Any]], None]  # record a result (idempotent: keyed by run)
    failed: Callable[[Task, str], None]  # record a run that failed for its own reasons, once
    heartbeat_s: float  # how often `renew` must be called while runs are in flight
    # a context that keeps the leases of runs alive while this very process trains them (inline)
    holding: Callable[[list[Task]], AbstractContextManager[Any]] | None = None
    spare: Callable[[], None] | None = None  # told when a worker's core is free and no run waits for it


class Backend(Protocol):
    """Trains runs and reports each one to the ledger as it ends; `close` frees what it started."""

    def run(self, tasks: list[Task], ledger: Ledger) -> None: ...

    def close(self) -> None: ...


def train_run(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Worker body of every backend: train (or resume, or just read back) one run, with its cost."""
    cfg = TrainConfig.from_dict(config)
    # a process's first optimizer imports torch._dynamo (~1 s CPU): paid before the clock, not the method's
    get_method(cfg.method).build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
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




def describe(err: BaseException) -> str:
    """How a failed run's error is shown in the log and the summary."""
    return f"{type(err).__name__}: {err}"

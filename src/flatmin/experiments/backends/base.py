"""What every backend shares: the driver's `Ledger`, the `Backend` protocol, the worker body."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flatmin.train.config import TrainConfig
from flatmin.train.loop import train


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


class Backend(Protocol):
    """Trains runs and reports each one to the ledger as it ends; `close` frees what it started."""

    def run(self, tasks: list[Task], ledger: Ledger) -> None: ...

    def close(self) -> None: ...


def train_run(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Worker body of every backend: train (or resume, or just read back) one run."""
    return train(TrainConfig.from_dict(config), run_dir, resume=True, progress=False)


def describe(err: BaseException) -> str:
    """How a failed run's error is shown in the log and the summary."""
    return f"{type(err).__name__}: {err}"

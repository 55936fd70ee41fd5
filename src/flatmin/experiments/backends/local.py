"""The default backend: a pool of single-threaded worker processes on this machine, or the calling
process itself when one worker is enough.

Workers are forked from a single-threaded driver on Linux: a copy of a process that has already
imported torch, flatmin and torch._dynamo starts in milliseconds, where a spawned one imports them
again (about 2 s of CPU per worker, before its first run). Fork and threads do not mix, nor does fork
and an initialised CUDA, so a driver that runs other threads (a test runner, a progress bar's
monitor, a results store's heartbeat) or has used a GPU spawns its workers, clean."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import nullcontext
from typing import Any

import torch

from flatmin.errors import FlatminError, one_line_warnings
from flatmin.experiments.backends.base import Ledger, Task, describe, train_run
from flatmin.optim.rules.erm import ERM


def _init_worker() -> None:
    """One torch thread per process (tiny models on a shared CPU run fastest that way); flatmin's
    warnings (labels that skip a class id, say) on one line, as the CLI prints them."""
    torch.set_num_threads(1)
    warnings.showwarning = one_line_warnings("flatmin worker", warnings.showwarning)


def _init_pool_worker() -> None:
    """Also die with the grid process (Linux): a SIGKILLed grid must leave no orphan still training
    a run whose claim the restarted grid will take over."""
    _init_worker()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _warm() -> None:
    """A started worker's first task: the imports and torch's first-optimizer setup a run would pay."""
    ERM([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def start_method() -> str:
    """``fork`` from a single-threaded driver on Linux that has not initialised CUDA (a worker is a copy,
    ready at once), else ``spawn``."""
    single = threading.active_count() == 1 and not torch.cuda.is_initialized()
    forks = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
    return "fork" if forks and single else "spawn"


class _Inline:
    """An executor that runs each task at submit time: workers=1 needs no extra process."""

    def __init__(self) -> None:
        _init_worker()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - reported per run by the ledger
            fut.set_exception(err)
        return fut

    def shutdown(self, **_: Any) -> None:
        pass


class LocalBackend:
    """At most ``workers`` runs at once, each claimed just before it starts (so several grid
    processes sharing one store split the runs between them)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise FlatminError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None  # started early by `start`, kept until `close`

    def start(self) -> None:
        """Start the worker processes now, so that the first runs begin as soon as the caller has planned
        them (a spawned worker imports torch and flatmin meanwhile; a forked one has them)."""
        if self.workers > 1 and self._pool is None:
            self._pool = self._new_pool(self.workers)
            for _ in range(self.workers):
                self._pool.submit(_warm)

    def _new_pool(self, n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(start_method()),
                                   initializer=_init_pool_worker)

    def run(self, tasks: list[Task], ledger: Ledger) -> None:
        """Train the tasks; one failed run is reported and the others go on."""
        queue = list(tasks)
        kept = self._pool is not None
        pool: Any = self._pool if kept else _Inline() if self.workers == 1 or len(queue) <= 1 else \
            self._new_pool(min(self.workers, len(queue)))
        in_flight: dict[Future, Task] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.workers:
                    t = queue.pop(0)
                    if ledger.claim(t):
                        inline = isinstance(pool, _Inline) and ledger.holding is not None
                        with ledger.holding([t]) if inline else nullcontext():  # lease kept while it trains
                            in_flight[pool.submit(train_run, t.config.to_dict(), str(t.run_dir))] = t
                if not in_flight:
                    break
                if not queue and len(in_flight) < self.workers and ledger.spare is not None:
                    ledger.spare()  # the last runs leave a core free
                finished, _ = wait(list(in_flight), timeout=ledger.heartbeat_s, return_when=FIRST_COMPLETED)
                ledger.renew(list(in_flight.values()))
                for fut in finished:
                    t = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as err:  # noqa: BLE001 - one bad run must not sink the grid
                        ledger.failed(t, describe(err))
                        continue
                    ledger.finished(t, result)
        except BaseException:
            if kept:  # interrupted: the started pool goes too
                self.close()
            raise
        finally:  # workers exit (torch's teardown, ~1 s) while the caller measures cost and draws figures
            if not kept:
                pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop a pool `start` began (its workers exit while the caller goes on)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

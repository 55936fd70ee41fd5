"""Where runs train: a local process pool (the default) or a Ray cluster (`--backend ray`).

A backend only trains; the driver process keeps the books. `runner.execute` hands a backend the
runs still to do and a `Ledger` (claim, renew, finished, failed) that writes the results store, so
the store has one writer whichever backend trains. Nothing here imports Ray unless it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from flatmin.experiments.backends.base import Backend, Ledger, describe, train_run
from flatmin.experiments.backends.local import LocalBackend

__all__ = ["Backend", "Ledger", "LocalBackend", "describe", "train_run", "create"]
BACKENDS = ("local", "ray")
RAY_OPTIONS = ("ray_address", "cpus_per_run", "gpus_per_run", "max_retries")


def create(name: str, workers: int, *, ray_address: str | None = None, cpus_per_run: float | None = None,
           gpus_per_run: float | None = None, max_retries: int | None = None,
           log: Callable[[str], None] = print) -> Backend:
    """A backend by name (``local`` or ``ray``), connected; call before anything is written."""
    if name != "ray":
        return LocalBackend(workers)
    from flatmin.experiments.backends.ray import RayBackend

    return RayBackend(ray_address, num_cpus=workers,
                      cpus_per_run=1.0 if cpus_per_run is None else cpus_per_run,
                      gpus_per_run=0.0 if gpus_per_run is None else gpus_per_run,
                      max_retries=3 if max_retries is None else max_retries, log=log)

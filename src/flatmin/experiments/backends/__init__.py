"""Where runs train: a local process pool (the default) or a Ray cluster (`--backend ray`).

A backend only trains; the driver process keeps the books. `runner.execute` hands a backend the
runs still to do and a `Ledger` (claim, renew, finished, failed) that writes the results store, so
the store has one writer whichever backend trains. Nothing here imports Ray unless it is asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flatmin.errors import FlatminError
from flatmin.experiments.backends.base import Backend, Ledger, describe, train_run
from flatmin.experiments.backends.local import LocalBackend

__all__ = ["Backend", "Ledger", "LocalBackend", "describe", "train_run", "add_arguments", "create"]
BACKENDS = ("local", "ray")
RAY_FLAGS = ("ray_address", "cpus_per_run", "gpus_per_run", "max_retries")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--backend` and the Ray options, shared by `compare` and `grid`."""
    parser.add_argument("--backend", default="local", choices=BACKENDS,
                        help="local: a process pool (default); ray: one Ray task per run (extra `ray`)")
    parser.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:10001",
                        help="join this Ray cluster (default: start a local one with --workers CPUs)")
    parser.add_argument("--cpus-per-run", type=float, default=None,
                        help="Ray: CPUs per run, also its torch threads (1)")
    parser.add_argument("--gpus-per-run", type=float, default=None, help="Ray: GPUs per run (0)")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="Ray: retries of a run whose worker died (3); a run's own error is not retried")


def create(args: argparse.Namespace, workers: int, log: Callable[[str], None] = print) -> Backend:
    """The backend the command line asks for, connected; call before anything is written."""
    given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f, None) is not None]
    if getattr(args, "backend", "local") != "ray":
        if given:
            raise FlatminError(f"{', '.join(given)}: only with --backend ray")
        return LocalBackend(workers)
    from flatmin.experiments.backends.ray import RayBackend

    return RayBackend(args.ray_address, num_cpus=workers,
                      cpus_per_run=1.0 if args.cpus_per_run is None else args.cpus_per_run,
                      gpus_per_run=0.0 if args.gpus_per_run is None else args.gpus_per_run,
                      max_retries=3 if args.max_retries is None else args.max_retries, log=log)

"""`--backend ray`: every run is one Ray task with declared resources, on a local Ray instance or a
cluster; results come back to the driver, which alone writes the store.

A run's own error (bad config, non-finite loss) comes back as a value and is recorded once; only a
dead worker makes Ray retry the task (``max_retries``), and a retried run resumes from its last
checkpoint in ``--out``. Ctrl-C cancels what is still queued or running; finished runs stay stored.
"""

from __future__ import annotations

import socket
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flatmin.errors import FlatminError, one_line_warnings
from flatmin.experiments.backends.base import Ledger, Task, describe, train_run

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:
    raise FlatminError("--backend ray needs Ray: pip install 'flatmin[ray]'") from None


PROBE_TIMEOUT_S = 120.0
CANCEL_WAIT_S = 30.0
ADDRESS_HELP = "expected auto, HOST:PORT or ray://HOST:10001"


def _run_task(config: dict[str, Any], run_dir: str, threads: int) -> tuple[str, Any]:
    """Ray task body: the same computation as a local run (same seed, same thread count); the run's
    own exception is returned as a value so that Ray never retries it."""
    torch.set_num_threads(threads)
    warnings.showwarning = one_line_warnings("flatmin worker", warnings.showwarning)
    try:
        return "ok", train_run(config, run_dir)
    except Exception as err:  # noqa: BLE001 - recorded once by the driver, never retried
        return "error", describe(err)


def _probe(folder: str, token: str) -> str:
    """On one node: '' when it sees the driver's token file in ``folder`` and can write there."""
    path = Path(folder)
    if not (path / f".probe-{token}").is_file():
        return "does not see the files the driver writes in"
    mine = path / f".probe-{token}-{uuid.uuid4().hex}"
    try:
        mine.write_text(token)
        mine.unlink()
    except OSError as err:
        return f"cannot write ({err.strerror or err}) in"
    return ""


def check_address(address: str) -> None:
    """Fail in seconds with one message (``ray.init`` waits minutes for a cluster that is not there)."""
    target: str | None = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # a Ray without this helper: let ray.init find the cluster
            return
        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise FlatminError("--ray-address auto: no running Ray cluster found on this machine "
                               "(start one with `ray start --head`, or set RAY_ADDRESS)") from None
        if target is None:
            return
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FlatminError(f"--ray-address {address!r}: {ADDRESS_HELP}")
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except OSError as err:
        raise FlatminError(f"--ray-address {address}: no Ray cluster answers at {host}:{port} "
                           f"({err.strerror or err}); start one with `ray start --head`") from None


def check_resources(nodes: list[dict[str, Any]], wanted: dict[str, float]) -> None:
    """Refuse, before any task is submitted, a run no live node can hold: Ray would queue it forever."""
    flags = {"CPU": "--cpus-per-run", "GPU": "--gpus-per-run"}
    for resource, amount in wanted.items():
        most = max((n.get("Resources", {}).get(resource, 0) for n in nodes), default=0)
        if amount > most:
            raise FlatminError(f"{flags.get(resource, resource)} {amount:g}: no node of this Ray cluster has "
                               f"{amount:g} {resource}(s) (the most on one node: {most:g}); runs would wait "
                               "forever; ask for less or add a node that has them")


class RayBackend:
    """Runs as Ray tasks: all submitted at once (Ray queues them on the cluster's free resources)."""

    def __init__(self, address: str | None, *, num_cpus: int, cpus_per_run: float = 1.0,
                 gpus_per_run: float = 0.0, max_retries: int = 3, log: Callable[[str], None] = print) -> None:
        for flag, value, low in (("--cpus-per-run", cpus_per_run, 0), ("--gpus-per-run", gpus_per_run, None),
                                 ("--max-retries", max_retries, None), ("--workers", num_cpus, 0)):
            if value < 0 or value == low:
                raise FlatminError(f"{flag} must be {'>' if low == 0 else '>='} 0, got {value:g}")
        self.cpus, self.gpus, self.max_retries, self.log = cpus_per_run, gpus_per_run, max_retries, log
        self.threads = max(1, int(cpus_per_run))
        self.started, self._probed = False, set()  # started: this process called ray.init
        if address:
            check_address(address)
        if not ray.is_initialized():  # else: the caller's own connection (Python API) is used
            local = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
            try:
                ray.init(address=address, logging_level="WARNING", **local)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
                raise FlatminError(f"cannot {where}: {err}") from None
            self.started = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        log(f"Ray: {len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; "
            f"each run takes {cpus_per_run:g} CPU(s), {gpus_per_run:g} GPU(s)")
        try:
            check_resources(nodes, {"CPU": cpus_per_run, "GPU": gpus_per_run})
        except FlatminError:
            self.close()
            raise


    def run(self, tasks: list[Task], ledger: Ledger) -> None:
        """Submit every claimed task, report each as it returns, cancel the rest on Ctrl-C."""
        if not tasks:
            return
        for folder in {t.run_dir.parent.resolve() for t in tasks} - self._probed:
            self.check_shared(folder)
        if self.gpus > 0 and any(t.config.device == "cpu" for t in tasks):
            self.log(f"warning: --gpus-per-run {self.gpus:g} but runs use --device cpu; add --device cuda")
        remote = ray.remote(_run_task)
        opts = dict(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries,
                    retry_exceptions=False)
        in_flight: dict[Any, Task] = {}  # the overall progress bar is the driver's (runner.execute)
        try:
            for t in tasks:
                if ledger.claim(t):
                    name = f"flatmin {t.label} seed {t.config.seed}"
                    ref = remote.options(name=name, **opts).remote(
                        t.config.to_dict(), str(t.run_dir.resolve()), self.threads)
                    in_flight[ref] = t
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=ledger.heartbeat_s)
                ledger.renew(list(in_flight.values()))
                for ref in ready:
                    self._report(ref, in_flight.pop(ref), ledger)
        except KeyboardInterrupt:
            self.log(f"\ninterrupted: cancelling {len(in_flight)} unfinished runs; finished runs are stored "
                     "and a re-run trains only what is missing")
            raise
        finally:
            if in_flight:  # and wait for them to stop, so that a re-run never meets one still training
                # Runs that finished meanwhile are stored, not cancelled: Ray 2.60 aborts the driver
                # ("Tried to complete task that was not pending") when a cancel meets a task's reply.
                done, running = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
                for ref in done:
                    self._report(ref, in_flight.pop(ref), ledger)
                for ref in running:
                    ray.cancel(ref)
                if running:
                    ray.wait(running, num_returns=len(running), timeout=CANCEL_WAIT_S)

    @staticmethod
    def _report(ref: Any, t: Task, ledger: Ledger) -> None:
        try:
            status, payload = ray.get(ref)
        except ray.exceptions.RayError as err:  # its worker died more than max_retries times
            first = (str(err).strip().splitlines() or [""])[0]
            ledger.failed(t, f"{type(err).__name__}: {first}")
            return
        (ledger.finished if status == "ok" else ledger.failed)(t, payload)

    def check_shared(self, folder: Path) -> None:
        """Every live node must see the driver's files in ``folder`` and write there (one probe each)."""
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        mark = folder / f".probe-{token}"
        mark.write_text(token)
        probe = ray.remote(_probe)
        refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(folder), token): n for n in ray.nodes() if n.get("Alive")}
        try:
            for ref, node in refs.items():
                try:
                    why = ray.get(ref, timeout=PROBE_TIMEOUT_S)
                except ray.exceptions.GetTimeoutError:
                    why = f"did not answer a probe within {PROBE_TIMEOUT_S:g} s about"
                if why:
                    raise FlatminError(f"Ray node {node['NodeManagerAddress']} {why} {folder}: with Ray, "
                                       "--out must be a folder all nodes see at one path (shared storage)")
        finally:
            mark.unlink(missing_ok=True)
        self._probed.add(folder)

    def close(self) -> None:
        """Disconnect (and stop the local instance) if this backend connected."""
        if self.started:
            ray.shutdown()
            self.started = False

"""Run logs people read: ``log.jsonl`` (the source of truth) plus optional TensorBoard events.

log.jsonl holds one JSON object per line, in order: per-step records ``{"step": s, "loss": …,
"grad_norm": …, "lr": …, "delta_norm": …, "loss_gap": …}`` (``delta_norm`` = ‖Δ‖ and ``loss_gap`` =
J(θ+Δ) − J(θ) for the perturbation methods) and per-epoch records ``{"epoch": e, …}`` — a step
record has no "epoch" key, which is how `read_log` tells them apart — and run-health events
``{"event": kind, "epoch": e, …}`` after their epoch's record (`read_events`; see
`flatmin.train.health`). With ``tensorboard=True`` the
same numbers also go to ``<out>/tensorboard/`` under ``step/<name>`` (x = step) and
``epoch/<name>`` (x = epoch). Step scalars may be device tensors: they are held until the next
flush (every ``flush_every`` kept steps, each epoch, close) and copied to the host in one go there,
so logging adds no synchronisation inside a step. Only the main process of a distributed run
should log (give the others ``out=None``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatmin.errors import FlatminError

LOG = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_log(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, epoch records) of a log.jsonl or a run folder holding one; none if absent."""
    path = Path(path)
    path = path / LOG if path.is_dir() else path
    if not path.is_file():
        return [], []
    steps, epochs = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError as err:
                raise FlatminError(f"{path} line {i} is not a flatmin log record ({err})") from None
            if "event" not in rec:  # run-health events: read_events
                (epochs if "epoch" in rec else steps).append(rec)
    return steps, epochs


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The run-health event records (``{"event": kind, "epoch": e, ...}``, see flatmin.train.health)."""
    path = Path(path)
    path = path / LOG if path.is_dir() else path
    if not path.is_file():
        return []
    return [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines())) if "event" in r]


def read_epochs(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records only: what tables and curves read."""
    return read_log(path)[1]


class RunLogger:
    """Writes step and epoch records to log.jsonl and, if asked, to TensorBoard."""

    def __init__(self, out: str | Path | None, *, tensorboard: bool = False, step_every: int = 1,
                 flush_every: int = 100, resume_epoch: int | None = None) -> None:
        """``resume_epoch``: keep the log up to that epoch's record and drop what came after it
        (a killed run's unfinished epoch); None starts a new log."""
        if step_every < 1 or flush_every < 1:
            raise ValueError(f"step_every and flush_every must be >= 1, got {step_every}, {flush_every}")
        self.out = Path(out) if out is not None else None
        self.step_every, self.flush_every = step_every, flush_every
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._writer = None
        last_step = self._start(resume_epoch) if self.out is not None else -1
        if tensorboard and self.out is not None:
            self._writer = _summary_writer(self.out / TENSORBOARD_DIR,
                                           purge_step=last_step + 1 if resume_epoch is not None else None)

    def _start(self, resume_epoch: int | None) -> int:
        """Truncate log.jsonl to what a resumed run keeps; the last kept step (−1 if none)."""
        self.out.mkdir(parents=True, exist_ok=True)
        keep: list[str] = []
        last_step = -1
        path = self.out / LOG
        if resume_epoch is not None and path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            records = [json.loads(ln) for ln in lines]
            ends = [i + 1 for i, r in enumerate(records) if r.get("epoch") == resume_epoch]
            keep = lines[: ends[-1] if ends else 0]
            last_step = max((r["step"] for r in records[: len(keep)] if "epoch" not in r), default=-1)
        path.write_text("".join(ln + "\n" for ln in keep))
        return last_step

    def log_step(self, step: int, scalars: Mapping[str, float | Tensor]) -> None:
        """One training step's scalars (loss, grad_norm, lr, delta_norm, loss_gap, …)."""
        if step % self.step_every:
            return
        for key, value in scalars.items():
            if isinstance(value, Tensor) and value.numel() != 1:
                raise ValueError(f"log_step: {key!r} has {value.numel()} elements, not one")
        self._pending.append((int(step), {k: v.detach() if isinstance(v, Tensor) else v
                                          for k, v in scalars.items()}))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """One epoch's record (metrics, lr, time); written after the epoch's pending steps."""
        self.flush()
        rec = {"epoch": int(epoch), **{k: _plain(v) for k, v in record.items() if k != "epoch"}}
        self._write([rec])
        if self._writer is not None:
            for key, value in rec.items():
                if key != "epoch" and _is_number(value):
                    self._writer.add_scalar(f"epoch/{key}", value, int(epoch))
            self._writer.flush()

    def log_events(self, events: list[Mapping[str, Any]]) -> None:
        """Run-health events (each with its kind and epoch), after the epoch's record."""
        if events:
            self.flush()
            self._write([dict(e) for e in events])

    def flush(self) -> None:
        """Copy the pending step scalars to the host (one transfer per device) and write them."""
        if not self._pending:
            return
        records = [{"step": step, **vals} for step, vals in _to_host(self._pending)]
        self._pending = []
        self._write(records)
        if self._writer is not None:
            for rec in records:
                for key, value in rec.items():
                    if key != "step" and _is_number(value):
                        self._writer.add_scalar(f"step/{key}", value, rec["step"])

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Append the records to log.jsonl in one write call."""
        if self.out is not None:
            with open(self.out / LOG, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))

    def close(self) -> None:
        """Flush everything; the TensorBoard files are complete after this."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer(logdir: Path, purge_step: int | None):
    """torch's SummaryWriter, or the install line for TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FlatminError("--tensorboard needs TensorBoard: pip install 'flatmin[tensorboard]'") from None
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _to_host(pending: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Replace every tensor by a float, stacking per device so that there is one copy each."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for _, vals in pending:
        for v in vals.values():
            if isinstance(v, Tensor):
                by_device.setdefault(v.device, []).append(v)
    host: dict[int, float] = {}
    for tensors in by_device.values():
        values = torch.stack([t.reshape(()).to(torch.float64) for t in tensors]).tolist()
        host.update(zip(map(id, tensors), values))
    return [(step, {k: host[id(v)] if isinstance(v, Tensor) else v for k, v in vals.items()})
            for step, vals in pending]


def _plain(value: Any) -> Any:
    """JSON-ready: one-element tensors become floats."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def _is_number(value: Any) -> bool:
    """A scalar TensorBoard can plot (NaN included: a diverged loss should show)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

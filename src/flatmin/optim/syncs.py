"""Count host–device synchronisations: the ops that make the host wait for the device.

`count_syncs()` is a `TorchDispatchMode` that records every op in `SYNC_OPS` — what ``.item()``,
``bool(t)``, ``if t:``, ``float(t)``, ``.tolist()`` dispatch to (``_local_scalar_dense``), and
ops whose output size depends on values (``nonzero``, ``masked_select``, ``unique`` …) — and
every copy from a non-CPU device to the CPU, each with the Python line that asked for it. It
runs on CPU too, so "no sync in a step" is a test, not a GPU-only claim. (On CPU a device→host
copy cannot occur; there the value-reading ops are what is counted, and while counting the step
guard takes the accelerator's path, not its CPU shortcut: `flatmin.optim.nonfinite.host_decides`.)
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_consecutive",
              "unique_dim", "repeat_interleave", "is_nonzero", "equal", "allclose", "nonzero_static")
SYNC_OPS = {getattr(aten, name) for name in SYNC_NAMES if hasattr(aten, name)}


@dataclass
class SyncLog:
    """The syncs seen: (op name, the innermost Python line outside torch)."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def describe(self) -> str:
        """One line per sync, for an assertion message."""
        return "\n".join(f"{op} at {where}" for op, where in self.events)


def _caller() -> str:
    """The innermost frame not in torch (where the sync was asked for)."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


def _is_device_to_host(func, args, kwargs) -> bool:
    """A copy whose source is on an accelerator and whose result lands on the CPU."""
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    src = args[1] if func is aten.copy_.default else args[0]
    dst_cpu = (args[0].device.type == "cpu") if func is aten.copy_.default else \
        str(kwargs.get("device", src.device)).startswith("cpu")
    return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst_cpu


class _Counter(TorchDispatchMode):
    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNC_OPS or _is_device_to_host(func, args, kwargs):
            self.log.events.append((str(func), _caller()))
        return func(*args, **kwargs)


_counting = 0  # how many count_syncs are open


def counting() -> bool:
    """Whether syncs are being counted (then code with a CPU shortcut takes its accelerator path)."""
    return _counting > 0


@contextmanager
def count_syncs() -> Iterator[SyncLog]:
    """Inside: every host-sync op is recorded in the yielded log."""
    global _counting
    log = SyncLog()
    _counting += 1
    try:
        with _Counter(log):
            yield log
    finally:
        _counting -= 1

"""The non-finite policy, on the device: a bad step is skipped by masking, never by a host read.

A step is *bad* when a pass's loss or the final gradient holds NaN/±inf. The flag is a 0-d
float tensor on the parameters' device (as GradScaler's ``found_inf``); nothing here converts
a tensor to a Python value, so a step costs no host–device synchronisation.

Skipping is exact. A fused base optimizer (``torch.optim.SGD(..., fused=True)``, Adam, AdamW)
takes the flag itself, as under GradScaler (``_step_supports_amp_scaling``), and leaves θ and
its state alone on device. Any other base optimizer steps, then every parameter and state
tensor is put back with ``torch.where(bad, before, after)`` from a snapshot taken just before
(kept across steps: one copy of the state; θ's copy is the perturbation's own when it has one).

Policies: ``"raise"`` (skip, count, raise `NonFiniteLossError` at the next `poll`), ``"skip"``
(skip and count), ``"off"`` (no check, no snapshot: the plain base step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.errors import NonFiniteLossError

POLICIES = ("raise", "skip", "off")


def check_policy(policy: Any) -> str:
    """One of the three policies, named in the error otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
    return policy


def loss_flag(losses: Sequence[Tensor | float], device: torch.device) -> Tensor:
    """1.0 when any loss is NaN/±inf, else 0.0, as a device tensor (no host read)."""
    flag = torch.zeros((), dtype=torch.float32, device=device)
    vals = [v.detach().reshape(()).float().to(device) for v in losses if isinstance(v, Tensor)]
    floats = [float(v) for v in losses if not isinstance(v, Tensor)]
    if floats:
        vals.append(torch.tensor(floats, device=device))
    if vals:
        flag = (~torch.isfinite(torch.cat([v.reshape(-1) for v in vals]))).any().float()
    return flag


def check_and_unscale_(grads: list[Tensor], found: Tensor, inv_scale: Tensor | None = None) -> None:
    """found ← 1 if any gradient is non-finite; grads ← grads·inv_scale (GradScaler's own kernel)."""
    inv = torch.ones((), dtype=torch.float32, device=found.device) if inv_scale is None else inv_scale
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    for (device, _), gs in groups.items():
        here = found if device == found.device else torch.zeros_like(found, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, here, inv.to(device))
        if here is not found:
            found.copy_(torch.maximum(found, here.to(found.device)))


def supports_found_inf(base: Optimizer) -> bool:
    """A fused optimizer skips on a device flag itself (the GradScaler contract)."""
    return bool(getattr(base, "_step_supports_amp_scaling", False))


class StepGuard:
    """The device-side counter of skipped steps and the snapshot buffers of a guarded step."""

    def __init__(self, policy: str) -> None:
        self.policy = check_policy(policy)
        self.count: Tensor | None = None  # skipped steps, on the device
        self.first_bad: Tensor | None = None  # the first skipped step's number (-1: none)
        self.steps: Tensor | None = None  # steps taken through the guard
        self.polled = 0  # skips already reported by `poll`
        self._snap: dict[tuple[int, str], Tensor] = {}  # (id of the parameter, what) -> snapshot

    def _counters(self, device: torch.device) -> None:
        """Create the counters lazily on the parameters' device."""
        if self.count is None or self.count.device != device:
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.steps = torch.zeros((), dtype=torch.int64, device=device)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def record(self, found: Tensor) -> None:
        """count += found; remember the first bad step's number, all on the device."""
        self._counters(found.device)
        bad = found > 0
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.steps, self.first_bad))
        self.count.add_(bad.long())
        self.steps.add_(1)

    def _buffer(self, key: tuple[int, str], t: Tensor) -> Tensor:
        """t copied into a snapshot buffer kept across steps."""
        buf = self._snap.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            buf = self._snap[key] = torch.empty_like(t)
        return buf.copy_(t)

    def step(self, base: Optimizer, found: Tensor, before: dict[Tensor, Tensor] | None = None) -> None:
        """base.step(), undone on device when ``found`` is set (θ from ``before`` where given)."""
        if supports_found_inf(base):
            base.grad_scale, base.found_inf = None, found
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
            return
        before = dict(before or {})
        params = [p for g in base.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p not in before:
                before[p] = self._buffer((id(p), ""), p)
        old = {(id(p), k): self._buffer((id(p), k), v) for p in params if p in base.state
               for k, v in base.state[p].items() if isinstance(v, Tensor)}
        base.step()
        bad = found > 0
        for p in params:
            p.copy_(torch.where(bad, before[p], p))
            for key, value in base.state[p].items():
                if not isinstance(value, Tensor):
                    continue
                was = old.get((id(p), key))  # none: state born in this step, reborn as zeros
                value.copy_(torch.where(bad, was if was is not None else torch.zeros_like(value), value))

    def buffers(self) -> list[Tensor]:
        """The snapshot buffers (memory the guard holds across steps)."""
        return list(self._snap.values())

    def poll(self, where: str) -> int:
        """Read the counter (one host sync): under "raise", a new skip raises, naming the first."""
        if self.count is None:
            return 0
        count = int(self.count)
        if self.policy == "raise" and count > self.polled:
            first = int(self.first_bad) + 1
            self.polled = count
            raise NonFiniteLossError(
                f"non-finite loss or gradient in {where} at step {first} ({count} step(s) skipped so far); "
                "parameters and optimizer state were left untouched")
        self.polled = count
        return count

    def state(self) -> dict[str, Any]:
        """The counters for a checkpoint (host copies; called only when saving)."""
        if self.count is None:
            return {}
        return {"count": self.count.clone(), "steps": self.steps.clone(), "first_bad": self.first_bad.clone(),
                "polled": self.polled}

    def load(self, state: dict[str, Any], device_of: Callable[[], torch.device]) -> None:
        """Continue counting from a checkpoint."""
        if not state:
            return
        device = device_of()
        self._counters(device)
        for key in ("count", "steps", "first_bad"):
            getattr(self, key).copy_(torch.as_tensor(state[key]).to(device))
        self.polled = int(state.get("polled", 0))

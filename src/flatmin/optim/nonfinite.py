"""The non-finite policy, on the device: a bad step is skipped by masking, never by a host read.

A step is *bad* when a pass's loss or the final gradient holds NaN/±inf. The flag is a 0-d
float tensor on the parameters' device (as GradScaler's ``found_inf``); nothing here converts
a tensor to a Python value, so a step costs no host–device synchronisation.

Skipping is exact. A fused base optimizer (``torch.optim.SGD(..., fused=True)``, Adam, AdamW)
takes the flag itself, as under GradScaler (``_step_supports_amp_scaling``), and leaves θ and
its state alone on device. Any other base optimizer steps, then every parameter and state
tensor is put back with ``torch.where(bad, before, after)`` from a snapshot taken just before
(kept across steps: one copy of the state; θ's copy is the perturbation's own when it has one).
On the CPU there is no device to wait for: reading the flag costs nothing, so the guard reads it
(`host_decides`) and a bad step is simply not taken, with no snapshot and no select — the same
numbers, cheaper. While `flatmin.optim.syncs.count_syncs` measures, the CPU takes the accelerator's
path instead, so that "no host sync in a step" is tested on the path an accelerator runs.

Overflow is not failure. Under a GradScaler a scaled gradient that overflows (the loss scale is
too high, the losses finite) also skips the step on the device, and the scaler backs its scale
off, but it is counted apart (`StepGuard.overflows`) and never raises. A step's verdict is one code:
0 (fine), 1 (overflow), 2 (non-finite loss, or non-finite unscaled gradient with no scaler), so
data-parallel ranks agree on it with one max all-reduce. An ascent pass that overflows leaves NaN in
θ+Δ and so in every later loss of the step: those losses are not held against the run.

Policies: ``"raise"`` (skip, count, raise `NonFiniteLossError` at the next `poll`), ``"skip"``
(skip and count), ``"off"`` (no check, no snapshot: the plain base step; a scaler's overflow
still skips).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.errors import NonFiniteLossError
from flatmin.optim import syncs
from flatmin.optim.sharded import local

POLICIES = ("raise", "skip", "off")
OVERFLOW, NONFINITE = 1.0, 2.0  # a step's verdict codes (0: fine); max over ranks keeps the worse


def check_policy(policy: Any) -> str:
    """One of the three policies, named in the error otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
    return policy


def loss_flags(losses: Sequence[Tensor | float], device: torch.device) -> Tensor:
    """One flag per loss, in order: True where it is NaN/±inf, as a device tensor (no host read)."""
    vals = [v.detach().reshape(()).float().to(device) if isinstance(v, Tensor)
            else torch.tensor(float(v), device=device) for v in losses]
    if not vals:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return ~torch.isfinite(torch.stack(vals))


def loss_flag(losses: Sequence[Tensor | float], device: torch.device) -> Tensor:
    """1.0 when any loss is NaN/±inf, else 0.0, as a device tensor (no host read)."""
    return loss_flags(losses, device).any().float()


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


def host_decides(device: torch.device) -> bool:
    """Read a step's verdict on the host: on the CPU that waits for nothing (not while syncs are counted)."""
    return device.type == "cpu" and not syncs.counting()


def _device_of(base: Optimizer) -> torch.device:
    """Where the base optimizer's parameters live."""
    return next((p.device for g in base.param_groups for p in g["params"]), torch.device("cpu"))


def supports_found_inf(base: Optimizer) -> bool:
    """A fused optimizer skips on a device flag itself (the GradScaler contract)."""
    return bool(getattr(base, "_step_supports_amp_scaling", False))


class StepGuard:
    """Device-side counters of skipped steps, a step's verdict, the snapshot buffers of a guarded step."""

    def __init__(self, policy: str) -> None:
        self.policy = check_policy(policy)
        self.count: Tensor | None = None  # steps skipped for a non-finite loss or gradient, on the device
        self.overflows: Tensor | None = None  # steps skipped for a loss-scale overflow (never raised)
        self.first_bad: Tensor | None = None  # the first non-finite step's number (-1: none)
        self.steps: Tensor | None = None  # steps taken through the guard
        self.polled = 0  # skips already reported by `poll`
        self._snap: dict[tuple[int, str], Tensor] = {}  # (id of the parameter, what) -> snapshot
        self._held: set[tuple[int, str]] = set()  # base state snapshotted when this step began
        self._kept: list[Tensor] = []  # snapshots of a rule's kept tensors from this step's start
        self._holding = False  # `hold` took them for the step under way
        self._overflow_at: Tensor | None = None  # this step: the first ascent pass that overflowed (-1: none)
        self._ascent_bad: Tensor | None = None  # this step: an unscaled ascent gradient held NaN/±inf

    def _counters(self, device: torch.device) -> None:
        """Create the counters lazily on the parameters' device."""
        if self.count is None or self.count.device != device:
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.overflows = torch.zeros((), dtype=torch.int64, device=device)
            self.steps = torch.zeros((), dtype=torch.int64, device=device)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    # -- a step's verdict ----------------------------------------------------------------------

    def begin(self) -> None:
        """A new step: no ascent pass has overflowed yet."""
        self._overflow_at, self._ascent_bad = None, None

    def unscaled_ascent(self, grads: list[Tensor], device: torch.device) -> None:
        """An unscaled ascent gradient the rule's perturbation does not read (RWP's clean pass): a NaN/±inf
        in it would reach the update only through the rule's direction, after the final gradient's check."""
        if not grads or self.policy == "off":
            return
        flag = torch.zeros((), dtype=torch.float32, device=device)
        check_and_unscale_(grads, flag)
        self._ascent_bad = flag > 0 if self._ascent_bad is None else self._ascent_bad | (flag > 0)

    def ascent(self, grads: list[Tensor], index: int, device: torch.device) -> None:
        """A scaled ascent gradient (pass ``index``): remember on the device the first one that overflowed."""
        if not grads:
            return
        flag = torch.zeros((), dtype=torch.float32, device=device)
        check_and_unscale_(grads, flag)
        at = torch.where(flag > 0, index, -1) if self._overflow_at is None else \
            torch.where((flag > 0) & (self._overflow_at < 0), index, self._overflow_at)
        self._overflow_at = at

    def verdict(self, losses: Sequence[Tensor | float], grads: list[Tensor], device: torch.device, *,
                found_inf: Tensor | None, passes: int) -> Tensor | None:
        """The step's code on the device: 0 fine, `OVERFLOW`, `NONFINITE` (None: nothing checked).

        ``found_inf``: the scaler's flag over the final (unscaled) gradient, None without a scaler —
        then a non-finite gradient is a failure. ``losses`` are the last ``len(losses)`` of the step's
        ``passes`` passes; those after an overflowed ascent pass are not trusted.
        """
        overflow = None if found_inf is None else found_inf > 0
        if self._overflow_at is not None:
            ascent = self._overflow_at >= 0
            overflow = ascent if overflow is None else overflow | ascent
        if self.policy == "off":
            return None if overflow is None else overflow.float()
        flags = loss_flags(losses, device)
        if self._overflow_at is not None and flags.numel():
            at = torch.arange(passes - flags.numel(), passes, device=device)
            flags = flags & ((self._overflow_at < 0) | (at <= self._overflow_at))
        bad = flags.any()
        if self._ascent_bad is not None:
            bad = bad | self._ascent_bad
        if found_inf is None:
            flag = torch.zeros((), dtype=torch.float32, device=device)
            check_and_unscale_(grads, flag)
            grad_bad = flag > 0
            bad = bad | (grad_bad if overflow is None else grad_bad & ~overflow)
        code = bad.float() * NONFINITE
        return code if overflow is None else torch.maximum(code, overflow.float() * OVERFLOW)

    def record(self, code: Tensor) -> None:
        """Count the verdict: non-finite steps (the first one's number kept) apart from overflows."""
        self._counters(code.device)
        bad = code >= NONFINITE
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.steps, self.first_bad))
        self.count.add_(bad.long())
        self.overflows.add_(((code > 0) & ~bad).long())
        self.steps.add_(1)

    def skips(self) -> Tensor | None:
        """Every step skipped so far, for whatever reason (a device tensor; None before any check)."""
        return None if self.count is None else self.count + self.overflows

    def _buffer(self, key: tuple[int, str], t: Tensor) -> Tensor:
        """t copied into a snapshot buffer kept across steps."""
        buf = self._snap.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            buf = self._snap[key] = torch.empty_like(t)
        return buf.copy_(t)

    def hold(self, base: Optimizer, kept: list[Tensor], base_written: bool = False) -> None:
        """A step begins: snapshot the base optimizer's state (unless it skips itself on a flag, or the CPU
        will not take a bad step and nothing but that step writes the state) and what the rule keeps across
        steps, so that a skipped or abandoned step puts them back bit for bit."""
        self._held = set()
        if not supports_found_inf(base) and (base_written or not host_decides(_device_of(base))):
            for p, state in base.state.items():
                for k, v in state.items():
                    if isinstance(v, Tensor):
                        self._buffer((id(p), k), v)
                        self._held.add((id(p), k))
        old, self._kept = self._kept, []
        for i, t in enumerate(kept):  # matched by position: a tensor born later in the step comes after
            buf = old[i] if i < len(old) else None
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                buf = torch.empty_like(t)
            self._kept.append(buf)
        if kept:
            torch._foreach_copy_(local(self._kept), local(kept))
        self._holding = True

    def keep(self, kept: list[Tensor], found: Tensor | None) -> None:
        """The rule's kept state after the step (the tensors `hold` saw, in the same order, then any born
        since): its snapshot where ``found`` is set (a skipped step; one born in the step becomes zeros),
        all of it when ``found`` is None (an abandoned step)."""
        held, self._holding = (local(self._kept[:len(kept)]) if self._holding else []), False
        kept = local(kept)
        if found is None:
            if held:
                torch._foreach_copy_(kept[:len(held)], held)
            return
        bad = found > 0
        for i, t in enumerate(kept):
            was = held[i] if i < len(held) else torch.zeros_like(t)
            t.copy_(torch.where(bad, was, t))

    def step(self, base: Optimizer, found: Tensor, before: dict[Tensor, Tensor] | None = None) -> None:
        """base.step(), undone on device when ``found`` is set (θ from ``before`` where given; the base state
        from the snapshot `hold` took, or, for state it did not see, one taken now)."""
        held, self._held = self._held, set()
        if supports_found_inf(base):
            base.grad_scale, base.found_inf = None, found
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
            return
        if host_decides(found.device):  # a bad step is not taken: θ and the state are as they were
            if not found.item():
                base.step()
            elif held:  # except what the rule wrote into the state during the step (`hold` saw it)
                for p, state in base.state.items():
                    for key, value in state.items():
                        if isinstance(value, Tensor):
                            value.copy_(self._snap[(id(p), key)] if (id(p), key) in held else 0)
            return
        before = dict(before or {})
        params = [p for g in base.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p not in before:
                before[p] = self._buffer((id(p), ""), p)
        old = {(id(p), k): self._snap[(id(p), k)] if (id(p), k) in held else self._buffer((id(p), k), v)
               for p in params if p in base.state for k, v in base.state[p].items() if isinstance(v, Tensor)}
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
        return list(self._snap.values()) + self._kept

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
        return {"count": self.count.clone(), "overflows": self.overflows.clone(), "steps": self.steps.clone(),
                "first_bad": self.first_bad.clone(), "polled": self.polled}

    def load(self, state: dict[str, Any], device_of: Callable[[], torch.device]) -> None:
        """Continue counting from a checkpoint."""
        if not state:
            return
        device = device_of()
        self._counters(device)
        for key in ("count", "steps", "first_bad"):
            getattr(self, key).copy_(torch.as_tensor(state[key]).to(device))
        self.overflows.copy_(torch.as_tensor(state.get("overflows", 0)).to(device))
        self.polled = int(state.get("polled", 0))

"""θ kept exactly, and what a rule keeps across steps: buffers like the parameters, keyed by parameter.

`Theta` holds θ's copies while a step is perturbed, so that restoring θ is a copy, not θ+Δ−Δ.
`kept_buffer` makes (and remakes, when a parameter's shape, dtype or device changes) a buffer
like a parameter; `by_index`/`from_index` key such buffers by the parameter's position over all
groups, as torch keys optimizer state, for a checkpoint. Every buffer is made ``*_like`` its
parameter, so under FSDP2 it is sharded like it; what the rules compute with are the local views
(`flatmin.optim.sharded.local`), which `PerturbedOptimizer` hands them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flatmin.optim import _kernels as K
from flatmin.optim.sharded import local


def kept_buffer(store: dict[Tensor, Tensor], p: Tensor, zero: bool = False) -> Tensor:
    """``store[p]``: a buffer like p kept across steps, (re)made when p's shape, dtype or device changes."""
    buf = store.get(p)
    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        make = torch.zeros_like if zero else torch.empty_like
        buf = store[p] = make(p, memory_format=torch.preserve_format)
    return buf


def finite_copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    """dst ← src with NaN/±inf as 0, so one step a caller skipped cannot poison every later one
    (torch has no foreach nan_to_num: one kernel per tensor, the price of a copy)."""
    for d, s in zip(dst, src):
        torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0, out=d)


def keep_unless_skipped_(dst: list[Tensor], src: list[Tensor], found: Tensor | None) -> None:
    """dst ← src after an update, except where the step was skipped (``found`` set: dst stays bit for
    bit); with no verdict (the caller's own update) src's NaN/±inf become 0 (`finite_copy_`)."""
    if found is None:
        finite_copy_(dst, src)
        return
    bad = found > 0
    for d, s in zip(dst, src):  # no foreach where: one kernel per tensor, as the guard's own restore
        d.copy_(torch.where(bad, d, s))


def param_order(groups: Iterable[dict[str, Any]]) -> list[Tensor]:
    """Every parameter over all groups, in order: the index torch keys optimizer state by."""
    return [p for group in groups for p in group["params"]]


def by_index(groups: Iterable[dict[str, Any]], kept: dict[Tensor, Tensor]) -> dict[int, Tensor]:
    """Kept buffers keyed as torch keys optimizer state: the parameter's position over all groups."""
    return {i: kept[p] for i, p in enumerate(param_order(groups)) if p in kept}


def from_index(groups: Iterable[dict[str, Any]], saved: dict[int, Tensor]) -> dict[Tensor, Tensor]:
    """The inverse of `by_index`, copied onto each parameter's device and dtype."""
    order = param_order(groups)
    return {order[i]: t.detach().to(order[i].device, order[i].dtype, copy=True) for i, t in saved.items()}


class Theta:
    """θ's copies while a step is perturbed (buffers reused across steps), put back bit for bit."""

    def __init__(self, foreach: bool) -> None:
        self.foreach = foreach
        self.copies: dict[Tensor, Tensor] = {}  # parameter -> its θ buffer
        self.saved: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, θ buffers) per save

    def __contains__(self, p: Tensor) -> bool:
        return p in self.copies

    def __bool__(self) -> bool:
        """True between a save and the matching put-back."""
        return bool(self.saved)

    def save(self, params: list[Tensor]) -> None:
        """Copy θ into its buffers (made on first use)."""
        thetas = [kept_buffer(self.copies, p) for p in params]
        K.copy_(local(thetas), local(params), self.foreach)
        self.saved.append((params, thetas))

    def of(self, params: list[Tensor]) -> list[Tensor]:
        """The saved θ of already-saved parameters, as the local views a rule computes with."""
        return local([self.copies[p] for p in params])

    def pairs(self) -> dict[Tensor, Tensor]:
        """Parameter -> θ buffer for everything saved in this step."""
        return {p: t for params, thetas in self.saved for p, t in zip(params, thetas)}

    def put_back(self) -> None:
        """θ back bit for bit from its copies."""
        for params, thetas in self.saved:
            K.copy_(local(params), local(thetas), self.foreach)
        self.saved.clear()

    def buffers(self) -> list[Tensor]:
        """The θ buffers (memory held across steps)."""
        return list(self.copies.values())

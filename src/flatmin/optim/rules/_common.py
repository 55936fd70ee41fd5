"""What SAM's relatives share: ρ per group, SAM's normalised ascent, kept gradients, the two-call form.

Each member of the family is a perturbation rule on `PerturbedOptimizer` (θ kept bit for bit, the
guarded sync-free update, the driver's pass order). A rule whose update direction is not simply
"the gradient at θ+Δ" keeps what it needs in buffers during `_ascend` and rewrites ``.grad`` in
`_direction`, which `restore_and_step` calls after the step's verdict and just before the base
update; what a rule carries to later steps (`carried_state`) is put back by the base when a step is
skipped, so no rule masks its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer, Slot, check_nonnegative
from flatmin.optim.registry import Hyper, check_group
from flatmin.optim.rules.sam import ADAPTIVE, RHO, first_step
from flatmin.optim.theta import by_index, from_index

__all__ = ["SharpnessRule", "check_unit"]


def check_unit(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> None:
    """A number in [0, 1] (ends excluded where asked), with a message naming the argument."""
    check_nonnegative(name, value)
    if value > 1 or (low_open and value == 0) or (high_open and value == 1):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")


class SharpnessRule(PerturbedOptimizer):
    """SAM's ascent ρ·T²g/‖Tg‖ (global norm, per-group ρ) plus hooks for a rewritten update direction.

    Two-call form (the popular collection's API)::

        loss(w).backward();        opt.first_step(zero_grad=True)
        loss(w + e).backward();    opt.second_step(zero_grad=True)

    ``first_step`` on a step that makes no ascent pass (LookSAM between its exact steps) only
    begins the step; the second pass is then taken at w itself.
    """

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer], defaults: dict[str, Any],
                 base_kwargs: dict[str, Any], *, foreach: bool | None, check_finite: bool,
                 nonfinite: str | None) -> None:
        defaults = {"adaptive": False, **defaults}
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        self._kept: dict[Tensor, Tensor] = {}  # a gradient (or a direction) kept from one pass to the next

    hypers: tuple[Hyper, ...] = (RHO, ADAPTIVE)  # each rule's own, from the registry's declarations

    def validate_group(self, group: dict[str, Any]) -> None:
        """Every hyper-parameter in the group by the registry's rules."""
        check_group(self.hypers, group)

    def ascent_passes(self) -> int:
        """One ascent pass, as SAM."""
        return 1

    # -- the two-call form --------------------------------------------------------------------

    _consume = True  # whether e(w) may be built in the gradients' storage

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e(w) from the current gradients (nothing more on a step with no ascent)."""
        first_step(self, zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to w exactly, then the base update with the rule's direction."""
        self.restore_and_step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # -- pieces the rules share ------------------------------------------------------------------

    def to_final_units(self, kept: list[Tensor], ratio: Tensor | float | None) -> None:
        """Bring gradients kept from the ascent pass to the final pass's loss scale."""
        if ratio is not None:
            torch._foreach_mul_(kept, ratio)

    def _ascend(self, grad_scale: object = None) -> None:
        """Keep g (the rule rewrites the update from it), then SAM's ascent (a loss scale cancels)."""
        slots = self.slots()
        for s in slots:
            self.keep(s.params, s.grads)
        self.sam_ascend(slots, consume=self._consume)

    def keep(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Copy gradients into buffers kept across steps (made on first use)."""
        bufs = self.kept(self._kept, params)
        K.copy_(bufs, grads, self.foreach)
        return bufs

    def kept_of(self, params: list[Tensor]) -> list[Tensor]:
        """The kept buffers of parameters (all must have one), to compute with."""
        return self.views([self._kept[p] for p in params])

    def slots_with_kept(self) -> list[Slot]:
        """The groups with a gradient whose every parameter has a kept buffer (`_direction`'s input)."""
        return [s for s in self.slots() if all(p in self._kept for p in s.params)]

    def held_buffers(self) -> list[Tensor]:
        """θ copies, guard snapshots and the kept buffers."""
        return super().held_buffers() + list(self._kept.values())

    def kept_state(self) -> dict[int, Tensor]:
        """The kept buffers keyed by parameter position (what a checkpoint stores)."""
        return by_index(self.param_groups, self._kept)

    def load_kept_state(self, saved: dict[int, Tensor]) -> None:
        """Take back `kept_state`."""
        self._kept = from_index(self.param_groups, saved)

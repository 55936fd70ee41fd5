"""WSAM — sharpness as a weighted regulariser (Yue, Jiang, Ye, Gao, Liu & Zhang, KDD 2023).

    L_WSAM(θ) = L(θ) + γ/(1−γ)·[L(θ+ε) − L(θ)],   ε SAM's ascent,

so with α = γ/(1−γ), g = ∇L(θ), g_s = ∇L(θ+ε):

- ``decouple=False``: the base optimizer steps with α·g_s + (1−α)·g;
- ``decouple=True`` (default, as the authors): it steps with g, and then
  θ ← θ − lr·α·(g_s − g) — the sharpness term bypasses the base optimizer's momentum, adaptivity
  and weight decay (lr: the group's learning rate).

γ = 1/2 without decoupling is SAM exactly; γ = 0 is the base optimizer on g. Follows the authors'
WSAM (``WeightedSAM.first_step``/``second_step``, atorch/optimizers/wsam.py in
intelligent-machine-learning/dlrover, since 2024 intelligent-machine-learning/atorch).

``max_norm`` is the authors' clipping, where they clip: g is clipped to ``max_norm`` after the
ascent (the ascent itself uses the raw g), and g_s separately at θ, each by its own norm over every
tensor (``clip_grad_norm_``'s coefficient min(1, max_norm/(‖·‖ + 1e-6))), before the two are
combined; the driver's ``max_grad_norm`` (the trainer's ``grad_clip``) is another thing, applied
after, to what the base optimizer receives.

Defaults: γ = 0.9 and ``max_norm=None`` (no clipping) are the authors' released defaults (their
class and README since 23 May 2023); their very first commit (8d8c58e, the same day) had γ = 0.88
and ``max_norm=1.0``, replaced within four hours ("change 0.88 to 0.9", "max norm default to None").
flatmin keeps the released ones; ``WSAM(..., gamma=0.88, max_norm=1.0)`` is that first form. Their
example script's ``--gamma`` defaults to 0.5 and their CIFAR entry script uses ρ = 0.2, γ = 0.9.

Checked against their code run side by side (``tests/test_authors_forms.py``: both forms, with and
without ``max_norm``, 12 float64 steps of SGD with momentum and weight decay). Differences: θ is
restored by copy (theirs subtracts e); on a skipped (non-finite) step the decoupled sharpness step
is skipped with it (on the device); under DDP the authors ascend on the local gradient (their
README's ``no_sync``) and all-reduce g afterwards, here the ascent gradient is all-reduced first
unless the trainer's ``--ddp-local-ascent`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import FRACTION, POSITIVE, Flag
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO
from flatmin.optim.theta import finite_copy_

DECOUPLE = Hyper("decouple", Flag(), True, "WSAM: the sharpness step bypasses the base optimizer")
MAX_NORM = Hyper("max_norm", POSITIVE, None, "WSAM: clip g and g_s each to this norm before combining them "
                 "(the authors'; none: no clipping, their released default)", "wsam_max_norm")
CLIP_EPS = 1e-6  # torch's clip_grad_norm_ guard, which the authors call
HYPERS = (RHO, Hyper("gamma", FRACTION, 0.9, "WSAM: sharpness weight γ in [0, 1) (0.9)", "wsam_gamma"),
          ADAPTIVE, DECOUPLE, MAX_NORM)


class WSAM(SharpnessRule):
    """SAM with the sharpness weighted by γ/(1−γ), optionally decoupled from the base update; keeps g."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, gamma: float = 0.9, adaptive: bool = False, decouple: bool = True, *,
                 max_norm: float | None = None, foreach: bool | None = None, check_finite: bool = True,
                 nonfinite: str | None = None, **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, gamma=gamma, adaptive=adaptive)
        super().__init__(params, base_optimizer, defaults, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        self.decouple = DECOUPLE.check(decouple)
        self.max_norm = MAX_NORM.check(max_norm)
        self._inv_scale: Tensor | float = 1.0  # 1/loss scale of the step (the sharpness step is unscaled)
        self._pending: list[tuple[dict[str, Any], list[Tensor]]] = []  # sharpness steps for _after_step

    @staticmethod
    def weight(group: dict[str, Any]) -> float:
        """α = γ/(1−γ)."""
        return group["gamma"] / (1 - group["gamma"])

    def clip(self, tensors: list[Tensor]) -> None:
        """``max_norm``: tensors ← tensors·min(1, max_norm/(‖tensors‖ + 1e-6)), the norm over all of them
        unscaled (a device tensor: no host read)."""
        norm = self.global_norm(tensors) * self._inv_scale
        coef = torch.clamp(self.max_norm / (norm + CLIP_EPS), max=1.0)
        torch._foreach_mul_(tensors, coef.to(tensors[0].dtype))

    def _direction(self, ratio: Tensor | float | None) -> None:
        """``max_norm``: g and g_s clipped, each by its own norm. Then coupled: .grad ← α·g_s + (1−α)·g;
        decoupled: kept ← g_s − g, .grad ← g."""
        self._pending = []
        final = self._ascent_scale if ratio is None else ratio * (1.0 if self._ascent_scale is None
                                                                   else self._ascent_scale)
        self._inv_scale = 1.0 if final is None else 1.0 / final  # the sharpness step is unscaled
        slots = self.slots_with_kept()
        for _, params, _, _ in slots:
            self.to_final_units(self.kept_of(params), ratio)
        if self.max_norm is not None and slots:
            self.clip([k for s in slots for k in self.kept_of(s.params)])
            self.clip([g for s in slots for g in s.grads])
        for group, params, _, grads in slots:
            kept, alpha = self.kept_of(params), self.weight(group)
            if not self.decouple:
                K.axpby_(grads, kept, alpha, 1 - alpha, self.foreach)
                continue
            sharp = torch._foreach_sub(grads, kept) if self.foreach else [g - k for g, k in zip(grads, kept)]
            K.copy_(grads, kept, self.foreach)
            K.copy_(kept, sharp, self.foreach)
            self._pending.append((group, params))

    @torch.no_grad()
    def _after_step(self, found: Tensor | None) -> None:
        """Decoupled: θ ← θ − lr·α·(g_s − g)/scale, masked to nothing when the step was skipped."""
        pending, self._pending = self._pending, []
        for group, params in pending:
            sharp = self.kept_of(params)
            inv = self._inv_scale
            if isinstance(inv, Tensor):
                inv = inv.to(sharp[0].dtype)
            coef = -group["lr"] * self.weight(group) * inv  # lr may be a tensor: no float(), no sync
            if found is not None:
                finite_copy_(sharp, sharp)
                coef = coef * (1 - found.to(sharp[0].dtype))
            K.axpby_(self.views(params), sharp, 1.0, coef, self.foreach)


register(RuleInfo(
    "wsam", WSAM, "weighted SAM: sharpness as a regulariser weighted by γ/(1−γ)",
    paper="Yue et al., KDD 2023", code="intelligent-machine-learning/dlrover (atorch)", hypers=HYPERS,
    kept="g", neutral={"rho": 0.0, "gamma": 0.0, "max_norm": None},
    examples=({"rho": 0.05}, {"rho": 0.05, "decouple": False}, {"rho": 0.05, "max_norm": 0.01})))

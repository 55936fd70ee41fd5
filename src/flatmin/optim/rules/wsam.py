"""WSAM — sharpness as a weighted regulariser (Yue, Jiang, Ye, Gao, Liu & Zhang, KDD 2023).

    L_WSAM(θ) = L(θ) + γ/(1−γ)·[L(θ+ε) − L(θ)],   ε SAM's ascent,

so with α = γ/(1−γ), g = ∇L(θ), g_s = ∇L(θ+ε):

- ``decouple=False``: the base optimizer steps with α·g_s + (1−α)·g;
- ``decouple=True`` (default, as the authors): it steps with g, and then
  θ ← θ − lr·α·(g_s − g) — the sharpness term bypasses the base optimizer's momentum, adaptivity
  and weight decay (lr: the group's learning rate).

γ = 1/2 without decoupling is SAM exactly; γ = 0 is the base optimizer on g. Follows the authors'
WSAM (``first_step``/``second_step`` in their released optimizer). Differences: θ is restored by copy;
the authors' ``max_norm`` clips g and g_s separately, here clipping is the driver's
(``max_grad_norm``, the trainer's ``grad_clip``) on the direction the base optimizer receives;
on a skipped (non-finite) step the decoupled sharpness step is skipped with it (on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import FRACTION, Flag
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO
from flatmin.optim.theta import finite_copy_

DECOUPLE = Hyper("decouple", Flag(), True, "WSAM: the sharpness step bypasses the base optimizer")
HYPERS = (RHO, Hyper("gamma", FRACTION, 0.9, "WSAM: sharpness weight γ in [0, 1) (0.9)", "wsam_gamma"),
          ADAPTIVE, DECOUPLE)


class WSAM(SharpnessRule):
    """SAM with the sharpness weighted by γ/(1−γ), optionally decoupled from the base update; keeps g."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, gamma: float = 0.9, adaptive: bool = False, decouple: bool = True, *,
                 foreach: bool | None = None, check_finite: bool = True, nonfinite: str | None = None,
                 **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, gamma=gamma, adaptive=adaptive)
        super().__init__(params, base_optimizer, defaults, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        self.decouple = DECOUPLE.check(decouple)
        self._inv_scale: Tensor | float = 1.0  # 1/loss scale of the step (the sharpness step is unscaled)
        self._pending: list[tuple[dict[str, Any], list[Tensor]]] = []  # sharpness steps for _after_step

    @staticmethod
    def weight(group: dict[str, Any]) -> float:
        """α = γ/(1−γ)."""
        return group["gamma"] / (1 - group["gamma"])

    def _direction(self, ratio: Tensor | float | None) -> None:
        """Coupled: .grad ← α·g_s + (1−α)·g. Decoupled: kept ← g_s − g, .grad ← g."""
        self._pending = []
        final = self._ascent_scale if ratio is None else ratio * (1.0 if self._ascent_scale is None
                                                                   else self._ascent_scale)
        self._inv_scale = 1.0 if final is None else 1.0 / final  # the sharpness step is unscaled
        for group, params, _, grads in self.slots_with_kept():
            kept, alpha = self.kept_of(params), self.weight(group)
            self.to_final_units(kept, ratio)
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
    kept="g", neutral={"rho": 0.0, "gamma": 0.0},
    examples=({"rho": 0.05}, {"rho": 0.05, "decouple": False})))

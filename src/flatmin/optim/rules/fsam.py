"""FriendlySAM (F-SAM; Li, Zhou, He, Cheng & Huang, CVPR 2024): ascend along the batch-specific part
of the gradient only.

    m_t = λ·m_{t−1} + (1−λ)·g_t            (an estimate of the full gradient; m_1 = g_1)
    d_t = g_t − σ·m_{t−1}                   (the first step: d_1 = g_1)
    ε = ρ·T²d/‖Td‖,  then the base optimizer steps from θ with ∇f(θ+ε).

σ = 0 is SAM exactly. Follows the authors' code (nblt/F-SAM, ``FriendlySAM.first_step``): the
full-gradient component removed is the EMA *before* this step's gradient enters it (m_{t−1}), the
EMA starts at the first gradient, norms are global. Differences: gradients are unscaled before the
EMA (a GradScaler's changing scale would otherwise mix scales in m), the EMA is updated as
m ← (λ + (1−λ)σ)·m + (1−λ)·d (the same value, without a copy of g), and a skipped (non-finite)
step leaves m bit for bit (`carried_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, UNIT
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

HYPERS = (RHO, Hyper("sigma", NONNEGATIVE, 1.0, "FriendlySAM: share σ of the gradient EMA removed (1.0)",
                     "fsam_sigma"),
          Hyper("lmbda", UNIT, 0.9, "FriendlySAM: EMA decay λ in [0, 1] (0.9)", "fsam_lmbda"), ADAPTIVE)


class FriendlySAM(SharpnessRule):
    """SAM whose ascent direction is g − σ·EMA(g); the EMA m is kept (1× params) and checkpointed."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9, adaptive: bool = False, *,
                 foreach: bool | None = None, check_finite: bool = True, nonfinite: str | None = None,
                 **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive)
        super().__init__(params, base_optimizer, defaults, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)

    def _ascend(self, grad_scale: Tensor | float | None = None) -> None:
        """d ← g − σ·m; m ← λm + (1−λ)g; then SAM's ascent along d."""
        slots = self.slots()
        for group, params, _, grads in slots:
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale)
            fresh = [i for i, p in enumerate(params) if p not in self._kept]
            if fresh:
                self.keep([params[i] for i in fresh], [grads[i] for i in fresh])
            old = [i for i in range(len(params)) if i not in set(fresh)]
            if old:
                sigma, lmbda = group["sigma"], group["lmbda"]
                d, m = [grads[i] for i in old], self.kept_of([params[i] for i in old])
                K.axpby_(d, m, 1.0, -sigma, self.foreach)
                K.axpby_(m, d, lmbda + (1 - lmbda) * sigma, 1 - lmbda, self.foreach)
        self.sam_ascend(slots, consume=self._consume)

    def carried_state(self) -> list[Tensor]:
        """The EMA m: a skipped step leaves it as it was."""
        return list(self._kept.values())

    def extra_state(self) -> dict[str, Any]:
        """The gradient EMA m."""
        return {"momentum": self.kept_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue from the saved EMA."""
        self.load_kept_state(state.get("momentum", {}))


register(RuleInfo(
    "fsam", FriendlySAM, "FriendlySAM: ascend along the batch-specific part of g (g − σ·EMA(g))",
    paper="Li et al., CVPR 2024", code="nblt/F-SAM", hypers=HYPERS, kept="EMA of g",
    neutral={"rho": 0.0}, examples=({"rho": 0.05},)))

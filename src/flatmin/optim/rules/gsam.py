"""GSAM — Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022).

    ε = ρ_t·T²g/‖Tg‖ at θ (SAM's ascent),  g_p = ∇f(θ+ε),
    d = g_p − α·g_⊥,   g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²)·g_p   (the part of g orthogonal to g_p),

and the base optimizer steps from θ with d. Descending along −g_⊥ lowers the surrogate gap
f(θ+ε) − f(θ) without raising f_p. α = 0 is SAM exactly.

As in the authors' code (juntang-zhuang/GSAM): one inner product and norms over the whole model
(unweighted by |w| even with ``adaptive``), the guards ``cos = ⟨g,g_p⟩/(‖g_p‖‖g‖ + 1e-12)`` and
``g_⊥ = g − cos·‖g‖·g_p/(‖g_p‖ + 1e-12)``. Differences: θ is restored by copy (the authors subtract
ε), and ρ follows the learning rate only when ``rho_min`` is given — the authors' ProportionScheduler,
(ρ_t − ρ_min)/(ρ − ρ_min) = (lr_t − lr_min)/(lr_max − lr_min), with lr_max each group's learning rate
at construction (``group["lr_max"]``) and ρ_t read from the group's current lr at every step (so any
torch LR scheduler drives it; the authors call ``update_rho_t()`` by hand).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

HYPERS = (RHO, Hyper("alpha", NONNEGATIVE, 0.4, "GSAM: weight α of the surrogate-gap direction (0.4)",
                     "gsam_alpha"), ADAPTIVE,
          Hyper("rho_min", NONNEGATIVE, None, "GSAM: ρ at lr_min (None: constant ρ; the authors' schedule)"),
          Hyper("lr_min", NONNEGATIVE, 0.0, "GSAM: the learning rate at which ρ reaches rho_min"))


class GSAM(SharpnessRule):
    """SAM's ascent, then the update g_p − α·(component of g orthogonal to g_p); keeps g (1× params)."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False, *,
                 rho_min: float | None = None, lr_min: float = 0.0, foreach: bool | None = None,
                 check_finite: bool = True, nonfinite: str | None = None, **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, alpha=alpha, adaptive=adaptive, rho_min=rho_min, lr_min=lr_min)
        super().__init__(params, base_optimizer, defaults, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        for group in self.param_groups:
            self._record_lr_max(group)

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ, α ≥ 0; ρ_min in [0, ρ]; lr_min ≥ 0."""
        super().validate_group(group)
        if group["rho_min"] is not None:
            if group["rho_min"] > group["rho"]:
                raise ValueError(f"rho_min must be <= rho, got rho_min={group['rho_min']!r} > "
                                 f"rho={group['rho']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A new group records its learning rate as lr_max too."""
        super().add_param_group(param_group)
        self._record_lr_max(self.param_groups[-1])

    @staticmethod
    def _record_lr_max(group: dict[str, Any]) -> None:
        """lr_max: the group's learning rate when it joined (unless given)."""
        if group.get("lr_max") is None and group.get("lr") is not None:
            group["lr_max"] = float(group["lr"])

    def radius(self, group: dict[str, Any]) -> float | Tensor:
        """ρ, or ρ_t proportional to the learning rate between (lr_min, ρ_min) and (lr_max, ρ)."""
        rho, rho_min = group["rho"], group["rho_min"]
        lr_max, lr_min = group.get("lr_max"), group["lr_min"]
        if rho_min is None or lr_max is None or not lr_max > lr_min:
            return rho
        return rho_min + (rho - rho_min) * (group["lr"] - lr_min) / (lr_max - lr_min)  # lr may be a tensor

    def _direction(self, ratio: Tensor | float | None) -> None:
        """.grad ← g_p − α·g_⊥ = (1 + α·c)·g_p − α·g,  c = cos·‖g‖/(‖g_p‖ + 1e-12)."""
        slots = self.slots_with_kept()
        if not slots:
            return
        new = [g for s in slots for g in s.grads]
        old = self.kept_of([p for s in slots for p in s.params])
        self.to_final_units(old, ratio)
        inner = self.dot(old, new)
        new_norm, old_norm = self.global_norm(new), self.global_norm(old)
        cos = inner / (new_norm * old_norm + K.TINY)
        c = cos * old_norm / (new_norm + K.TINY)
        for s in slots:
            alpha = s.group["alpha"]
            K.axpby_(s.grads, self.kept_of(s.params), 1 + alpha * c, -alpha, self.foreach)


register(RuleInfo(
    "gsam", GSAM, "surrogate-gap guided SAM: SAM's gradient minus α·(the part of g orthogonal to it)",
    paper="Zhuang et al., ICLR 2022", code="juntang-zhuang/GSAM", hypers=HYPERS, kept="g",
    neutral={"rho": 0.0, "alpha": 0.0, "rho_min": None},
    examples=({"rho": 0.05, "alpha": 0.4}, {"rho": 0.05, "rho_min": 0.01})))

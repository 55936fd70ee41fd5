"""MSAM — Momentum-SAM (Becker, Altrock & Risse, TMLR 2024): perturb along the momentum, no extra pass.

    ε_t = −ρ·v/‖v‖,   v the base optimizer's momentum after the previous step,

and the base optimizer steps from θ with ∇f(θ+ε_t): one forward/backward per step, like SGD.
v is SGD's ``momentum_buffer`` (the authors' MSAM is SGD) or Adam/AdamW's ``exp_avg`` (their
AdamW_MSAM); v has the sign of the gradient, and the gradient is taken at θ − ρ·v/‖v‖, where the
authors' code keeps the weights between steps. Norm over the whole model, 1e-12 guard.
Before the base optimizer has a momentum (the first step; a base without one, e.g. SGD with
momentum=0) the step is unperturbed: ρ has no effect.

Follows the authors' code (MarlonBecker/MSAM) in value: there the weights are *stored* at θ+ε
between steps (so evaluation needs ``move_back_from_momentumAscent``); here θ is kept and restored
bit for bit after each step, which gives the same θ trajectory while the model outside a step is
always at θ. ρ per group (the authors support one group), the norm still global. A skipped
(non-finite) step leaves v untouched (it is base-optimizer state), so the next step perturbs as
the skipped one did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import RuleInfo, check_group, register
from flatmin.optim.rules.sam import RHO

HYPERS = (dataclasses.replace(RHO, default=0.3),)

MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")  # SGD; Adam, AdamW, NAdam, ...


class MSAM(PerturbedOptimizer):
    """Perturbation −ρ·v/‖v‖ from the base optimizer's momentum before the step's only pass."""

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.3, *, foreach: bool | None = None, check_finite: bool = True,
                 nonfinite: str | None = None, **base_kwargs: Any) -> None:
        defaults = dict(rho=rho)
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ ≥ 0 and finite."""
        check_group(HYPERS, group)

    def momentum_of(self, p: Tensor) -> Tensor | None:
        """The base optimizer's momentum of p, None before it has one."""
        state = self.base_optimizer.state.get(p, {})
        for key in MOMENTUM_KEYS:
            if isinstance(state.get(key), Tensor):
                return state[key]
        return None

    @torch.no_grad()
    def _begin(self) -> None:
        """θ ← θ − ρ·v/‖v‖ (one norm over every group)."""
        slots = []
        for group in self.param_groups:
            pairs = [(p, self.momentum_of(p)) for p in group["params"] if p.requires_grad]
            pairs = [(p, v) for p, v in pairs if v is not None]
            if pairs:
                slots.append(self.slot(group, [p for p, _ in pairs], [v for _, v in pairs]))
        self.sam_ascend(slots, scale=-1.0, consume=False)  # SAM's ascent along −v

    def perturb(self, grad_scale: object = None) -> None:
        """The two-call form's first call (before the forward pass): MSAM perturbs before its one pass."""
        self.begin_step()

    def ascent_passes(self) -> int:
        """No ascent pass: the direction is the momentum."""
        return 0


register(RuleInfo(
    "msam", MSAM, "momentum-SAM: perturb along −ρ·v/‖v‖ (the base optimizer's momentum), no extra pass",
    paper="Becker, Altrock & Risse, TMLR 2024", code="MarlonBecker/MSAM", hypers=HYPERS, passes="1",
    neutral={"rho": 0.0}, examples=({"rho": 0.3},)))

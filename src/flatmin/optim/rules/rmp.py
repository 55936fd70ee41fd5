"""RMP — random model perturbation, the AMP paper's control baseline (§5.1, radius 0.1).

Sampling: d ~ N(0, I) over the parameters of a group, Δ = r·d/‖d‖ — a point drawn uniformly on
the sphere of radius r (``ball="global"``), or on each tensor's own sphere of radius r
(``ball="per_tensor"``). In high dimension nearly all of a ball's volume lies at its surface, so
this is also what "uniform in the ball" gives in practice. The gradient at θ+Δ then drives the
base optimizer from θ. Only one forward/backward per step: RMP costs what ERM costs.
The draws come from the base's `normal_draws`: the same numbers however the parameters are laid out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE
from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register
from flatmin.optim.rules.amp import HYPERS as AMP_HYPERS

BALL = next(h for h in AMP_HYPERS if h.name == "ball")  # the same option as AMP's
HYPERS = (Hyper("radius", NONNEGATIVE, 0.1, "RMP radius r (0.1)", "rmp_radius"), BALL)


class RMP(PerturbedOptimizer):
    """Random perturbation of radius r before each gradient evaluation.

    ``step(closure)`` perturbs, calls the closure once at θ+Δ, restores θ and takes the base step.
    Two-call form: ``opt.perturb()`` before the forward pass, ``opt.restore_and_step()`` after
    the backward pass. Random numbers come from ``generator`` (default: the global RNG of the
    parameters' device), so a seeded run is reproducible.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        radius: float = 0.1,
        *,
        ball: str = "global",
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(radius=radius, ball=ball)
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self.generator = generator

    def validate_group(self, group: dict[str, Any]) -> None:
        """r ≥ 0 and finite; a known ball."""
        check_group(HYPERS, group)

    @torch.no_grad()
    def _begin(self) -> None:
        """params ← θ + Δ with Δ uniform on the sphere of radius r (needs no gradient)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            self.save_theta(params)
            draws, norms = self.normal_draws(params, self.generator, with_norms=True)
            K.random_perturb(self.views(params), draws, norms, radius=group["radius"], ball=group["ball"],
                             foreach=self.foreach)

    def perturb(self, grad_scale: object = None) -> None:
        """The two-call form's first call: RMP perturbs before its one and only pass."""
        self.begin_step()

    def ascent_passes(self) -> int:
        """No ascent: the direction is random."""
        return 0


register(RuleInfo(
    "rmp", RMP, "random model perturbation: a uniform draw on the r-sphere before the one pass",
    paper="Zheng et al., CVPR 2021 (§5.1 baseline)", code="", hypers=HYPERS, passes="1",
    order=20, neutral={"radius": 0.0}, examples=({"radius": 0.05}, {"radius": 0.05, "ball": "per_tensor"})))

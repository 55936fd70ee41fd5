"""Interval SAM: SAM's two-pass step every k-th step, the base optimizer's one-pass step between
(the ``interval`` of MosaicML Composer's SAM, composer/algorithms/sam).

    step t with t ≡ 0 (mod k):  e = ρ·g/‖g‖ at θ, then the base optimizer steps from θ with ∇f(θ + e);
    any other step:             the base optimizer steps with ∇f(θ)  (one forward/backward).

A step costs 1 + 1/k passes on average; k = 1 is SAM exactly (bit for bit), ρ = 0 the base optimizer.
Follows Composer's ``SAMOptimizer`` (a step counter from 0, the perturbed step when it is a multiple of
``interval``, one global norm). Differences: θ is restored by copy (Composer subtracts e), the norm
guard is 1e-12 as every flatmin rule (Composer's ``epsilon`` defaults to 1e-12 too), and ρ is per
group; a skipped (non-finite) step still counts in the k-cycle (its position is a host counter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from flatmin.checks import POSITIVE_INT
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules.sam import ADAPTIVE, RHO, SAM

INTERVAL = Hyper("interval", POSITIVE_INT, 1, "interval SAM: a SAM step every k steps, plain ones between",
                 "sam_interval")
HYPERS = (RHO, INTERVAL, ADAPTIVE)


class IntervalSAM(SAM):
    """SAM every ``interval`` steps (2 passes), the base optimizer alone between (1 pass)."""

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, interval: int = 1, adaptive: bool = False, *, foreach: bool | None = None,
                 check_finite: bool = True, nonfinite: str | None = None, **base_kwargs: Any) -> None:
        INTERVAL.check(interval)
        super().__init__(params, base_optimizer, rho, adaptive, foreach=foreach, check_finite=check_finite,
                         nonfinite=nonfinite, **base_kwargs)
        self.interval = interval
        self._steps = 0  # steps begun
        self._sam = True  # whether the current step is a SAM step

    def _begin(self) -> None:
        """Every ``interval``-th step (counting from 0) is a SAM step."""
        self._sam = self._steps % self.interval == 0
        self._steps += 1

    def ascent_passes(self) -> int:
        """One ascent pass on a SAM step, none between."""
        return 1 if self._sam else 0

    def extra_state(self) -> dict[str, Any]:
        """Where in the k-cycle the run is."""
        return {"steps": self._steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the k-cycle."""
        self._steps = int(state.get("steps", 0))


register(RuleInfo(
    "interval_sam", IntervalSAM, "SAM every k steps, the base optimizer alone between (Composer's interval)",
    paper="Foret et al., ICLR 2021; MosaicML Composer", code="mosaicml/composer", hypers=HYPERS,
    passes="1 + 1/k", order=32, neutral={"rho": 0.0}, examples=({"rho": 0.05, "interval": 2},)))

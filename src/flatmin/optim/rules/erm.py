"""ERM as a perturbation rule with no perturbation: the base optimizer under the same protocol.

The trainer drives every method through `flatmin.optim.driver`; wrapping the plain optimizer
gives ERM the same guarded, sync-free update (a non-finite step skipped on the device and
counted) and the same state-dict checks, with no extra pass. Its ``state_dict()`` is the base
optimizer's plus the ``"perturbation"`` record, and it loads a plain optimizer's state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import RuleInfo, register


class ERM(PerturbedOptimizer):
    """The base optimizer, one pass per step, with the guarded update of every flatmin method."""

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD, *,
                 foreach: bool | None = None, check_finite: bool = True, nonfinite: str | None = None,
                 **base_kwargs: Any) -> None:
        super().__init__(params, {}, base_optimizer, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)

    def ascent_passes(self) -> int:
        """No ascent pass: the gradient at θ drives the update."""
        return 0


register(RuleInfo(
    "erm", ERM, "no perturbation: the base optimizer under the same guarded protocol", paper="—", code="",
    passes="1", aliases={"none": {}}, plain_in_factory=True, order=0, neutral={}))

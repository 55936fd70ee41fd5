"""LookSAM (Liu, Mai, Chen, Hsieh & You, CVPR 2022): SAM's exact step every k steps, its
"sharpness" direction reused in between.

Every k-th step (the exact step), with g = ∇f(θ) and g_s = ∇f(θ + ρ·T²g/‖Tg‖):

    g_v = g_s − ‖g_s‖·cos(g, g_s)·g/‖g‖      (the part of g_s orthogonal to g; kept)

and the base optimizer steps with g_s (SAM's step). On the k−1 steps between, one pass at θ only:

    d = g + α·(‖g‖/‖g_v‖)·g_v.

k = 1 is SAM exactly. The LookSAM authors released no code; this follows Algorithm 1 of the paper,
with the inner product and norms over the whole model (one vector, as written there), guards
``cos = ⟨g,g_s⟩/(‖g‖‖g_s‖ + 1e-12)``, ``‖g_v‖ + 1e-12``. The popular collection's LookSAM projects
and normalises each tensor separately; here they are global. Its default k = 10, α = 0.7, ρ = 0.1
are kept. In the two-call form ``first_step`` does nothing on the reuse steps (as there), so the
second pass is at θ: the saving is real only through ``step(closure)``, the trainer or `drive`.
A skipped exact step leaves g_v bit for bit (`carried_state`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, POSITIVE_INT
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

K_STEPS = Hyper("k", POSITIVE_INT, 10, "LookSAM: exact SAM step every k steps (10)", "looksam_k")
HYPERS = (dataclasses.replace(RHO, default=0.1), K_STEPS,
          Hyper("alpha", NONNEGATIVE, 0.7, "LookSAM: weight α of the reused direction (0.7)",
                "looksam_alpha"),
          ADAPTIVE)


class LookSAM(SharpnessRule):
    """An exact SAM step every ``k`` steps (2 passes), 1 pass with the kept g_v between; g_v: 1× params."""

    hypers = HYPERS

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        rho: float = 0.1,
        k: int = 10,
        alpha: float = 0.7,
        adaptive: bool = False,
        *,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        K_STEPS.check(k)
        defaults = dict(rho=rho, alpha=alpha, adaptive=adaptive)
        super().__init__(
            params,
            base_optimizer,
            defaults,
            base_kwargs,
            foreach=foreach,
            check_finite=check_finite,
            nonfinite=nonfinite,
        )
        self.k = k
        self._steps = 0  # steps begun
        self._exact = True  # whether the current step is an exact (two-pass) one

    def _begin(self) -> None:
        """Every k-th step (or while no g_v is kept) is exact."""
        self._exact = self._steps % self.k == 0 or not self._kept
        self._steps += 1

    def ascent_passes(self) -> int:
        """One ascent pass on an exact step, none between."""
        return 1 if self._exact else 0

    def _direction(self, ratio: Tensor | float | None) -> None:
        """Exact step: g_v ← g_s − c·g in g's buffer (.grad stays g_s); else .grad ← g + α‖g‖/‖g_v‖·g_v."""
        slots = self.slots_with_kept()
        if not slots:
            return
        grads = [g for s in slots for g in s.grads]
        kept = self.kept_of([p for s in slots for p in s.params])
        if self._exact:
            self.to_final_units(kept, ratio)
            g_norm, gs_norm = self.global_norm(kept), self.global_norm(grads)
            cos = self.dot(kept, grads) / (g_norm * gs_norm + K.TINY)
            K.axpby_(kept, grads, -gs_norm * cos / (g_norm + K.TINY), 1.0, self.foreach)
            return
        ratio = self.global_norm(grads) / (self.global_norm(kept) + K.TINY)
        for s in slots:
            K.axpby_(s.grads, self.kept_of(s.params), 1.0, s.group["alpha"] * ratio, self.foreach)

    def carried_state(self) -> list[Tensor]:
        """An exact step rewrites g_v (a skipped one leaves it as it was); the steps between only read it."""
        return list(self._kept.values()) if self._exact else []

    def extra_state(self) -> dict[str, Any]:
        """Where in the k-cycle we are, and g_v."""
        return {"steps": self._steps, "g_v": self.kept_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the k-cycle with the saved g_v."""
        self._steps = int(state.get("steps", 0))
        self.load_kept_state(state.get("g_v", {}))


register(RuleInfo(
    "looksam", LookSAM, "LookSAM: SAM's exact step every k steps, its orthogonal direction reused between",
    paper="Liu et al., CVPR 2022", code="", hypers=HYPERS, passes="1 + 1/k", kept="g_v",
    neutral={"rho": 0.0, "alpha": 0.0}, examples=({"rho": 0.05, "k": 2},)))

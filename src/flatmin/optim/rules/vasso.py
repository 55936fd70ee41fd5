"""VaSSO — variance-suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023): SAM's
ascent along a moving average of the gradient instead of this batch's gradient alone.

    d_t = (1 − θ)·d_{t−1} + θ·g_t       (g_t = ∇f_t(x_t); d_1 = g_1, the average starts at a gradient)
    ε_t = ρ·T²d_t/‖T d_t‖,              then the base optimizer steps from x_t with ∇f_t(x_t + ε_t)

with T = I (T = |x| element-wise with ``adaptive``). Averaging suppresses the minibatch noise in
the adversary ε (the paper's "friendly adversary") at no extra gradient: two passes a step,
as SAM, and d kept between steps (1× the parameters). θ = 1 is SAM exactly (bit for bit), ρ = 0
the base optimizer; θ = 0 keeps ascending along the first gradient.

Follows the authors' code (BingcongLi/VaSSO, solver/vasso.py, ``VASSO.first_step`` and
``_avg_grad_norm``; checked line by line): d starts as a copy of a parameter's first gradient and is
then ``d.mul_(1 − θ).add_(g, alpha=θ)``; ε = ρ·d/(‖d‖ + guard) with ONE norm over every parameter that
has a gradient this step; a parameter without a gradient keeps its d and is not perturbed; the
update is the base optimizer's from x with the gradient at x + ε (weight decay at x). Their
defaults θ = 0.9 and ρ = 0.05 are kept (their train.sh uses ρ = 0.2 for WRN-28-10 on CIFAR-100).
Differences:

- the norm guard is 1e-12, as every flatmin rule (the authors': 1e-7);
- x is restored by copy (the authors subtract ε, which may leave x a rounding away);
- ρ and θ are read per parameter group (the authors write one value into every group);
- a loss scale (GradScaler) is divided out of g before it enters d (the authors use no scaler; a
  changing scale would otherwise mix units in d);
- ``adaptive`` (ASAM's |x|-scaled ascent along d) is flatmin's, off by default; the authors have none;
- a skipped step (non-finite, or a loss-scale overflow) leaves d bit for bit; when every step so far
  was skipped, d has not started, and the first good step starts it from its gradient as the
  authors do (a device flag, no host sync). One edge: a parameter whose first gradient arrives in a
  skipped step after the run's first good step starts from θ·g rather than g;
- with a model, the driver (trainer, integrations) updates BatchNorm running statistics only in the
  pass at x (the authors' loop updates them in both passes), as for every flatmin rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import UNIT
from flatmin.optim import _kernels as K
from flatmin.optim.base import Slot
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

THETA = Hyper("theta", UNIT, 0.9, "VaSSO: weight θ of the new gradient in the average d (0.9)", "vasso_theta")
HYPERS = (RHO, THETA, ADAPTIVE)


class VaSSO(SharpnessRule):
    """SAM whose ascent follows d = EMA_θ(g); d (1× params) is kept across steps and checkpointed."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, theta: float = 0.9, adaptive: bool = False, *,
                 foreach: bool | None = None, check_finite: bool = True, nonfinite: str | None = None,
                 **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, theta=theta, adaptive=adaptive)
        super().__init__(params, base_optimizer, defaults, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        self._started: Tensor | None = None  # 1 once a good step has put a gradient into d (on the device)

    # -- the step ----------------------------------------------------------------------------

    def _ascend(self, grad_scale: Tensor | float | None = None) -> None:
        """d ← (1−θ)·d + θ·g, then x ← x + ρ·T²d/‖Td‖."""
        slots = self.slots()
        started = self.started()
        directions = []
        for s in slots:
            if grad_scale is not None:  # d averages gradients of several steps: one unit for all of them
                torch._foreach_div_(s.grads, grad_scale)
            directions.append(self.average(s, started))
        self.ascend_along(slots, directions)

    def started(self) -> Tensor:
        """The device flag saying d holds a gradient (made 0 on first use; a skipped step puts it back)."""
        if self._started is None:
            self._started = torch.zeros((), dtype=torch.float32, device=self._device())
        return self._started

    def average(self, slot: Slot, started: Tensor) -> list[Tensor]:
        """d ← (1−θ)·d + θ·g (the authors' arithmetic); a d not yet started takes g itself."""
        params, grads = slot.params, slot.grads
        new = [i for i, p in enumerate(params) if p not in self._kept]
        old = [i for i, p in enumerate(params) if p in self._kept]
        d = self.kept(self._kept, params)
        if new:  # a parameter's first gradient: d starts as a copy of it
            K.copy_([d[i] for i in new], [grads[i] for i in new], self.foreach)
        if old:
            theta = slot.group["theta"]
            d_old, g_old = [d[i] for i in old], [grads[i] for i in old]
            K.axpby_(d_old, g_old, 1.0 - theta, theta, self.foreach)
            K.axpby_(d_old, g_old, started, 1.0 - started, self.foreach)  # d·1 + g·0 once started, else g
        return d

    def ascend_along(self, slots: list[Slot], directions: list[list[Tensor]]) -> None:
        """SAM's ascent (one norm over every group) along d; ε is built in g's storage, spent once d has
        it, unless the caller keeps its gradients (``first_step(zero_grad=False)``)."""
        if self._consume:
            for s, d in zip(slots, directions):
                K.copy_(s.grads, d, self.foreach)
            self.sam_ascend(slots)
        else:
            self.sam_ascend([s._replace(grads=d) for s, d in zip(slots, directions)], consume=False)

    def _after_step(self, found: Tensor | None) -> None:
        """d has started once a step is taken (a skipped one puts the flag back with d)."""
        if self._started is not None:
            self._started.fill_(1.0)

    # -- what is kept --------------------------------------------------------------------------

    def carried_state(self) -> list[Tensor]:
        """The flag and d: a skipped step leaves them as they were."""
        return ([] if self._started is None else [self._started]) + list(self._kept.values())

    def held_buffers(self) -> list[Tensor]:
        """θ copies, guard snapshots, d and the flag."""
        return super().held_buffers() + ([] if self._started is None else [self._started])

    def extra_state(self) -> dict[str, Any]:
        """d by parameter position, and whether it has started."""
        out: dict[str, Any] = {"average": self.kept_state()}
        if self._started is not None:
            out["started"] = self._started
        return out

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue from the saved d (started if it holds anything and no flag was saved)."""
        self.load_kept_state(state.get("average", {}))
        flag = state.get("started")
        if flag is None and self._kept:
            flag = torch.ones(())
        self._started = None if flag is None else \
            flag.detach().to(self._device(), torch.float32, copy=True)


register(RuleInfo(
    "vasso", VaSSO, "VaSSO: SAM's ascent along an EMA of the gradient (variance-suppressed adversary)",
    paper="Li & Giannakis, NeurIPS 2023", code="BingcongLi/VaSSO", hypers=HYPERS, kept="EMA of g",
    neutral={"rho": 0.0},
    examples=({"rho": 0.05, "theta": 0.5}, {"rho": 0.5, "theta": 0.9, "adaptive": True})))

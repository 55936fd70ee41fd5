"""MSAM — Momentum-SAM (Becker, Altrock & Risse, TMLR 2024): perturb along the momentum, no extra pass.

    ε_t = −ρ·v/‖v‖,   v the base optimizer's momentum after the previous step,

and the base optimizer steps from θ with ∇f(θ+ε_t): one forward/backward per step, like SGD.
v is SGD's ``momentum_buffer`` (the authors' MSAM is SGD) or Adam/AdamW's ``exp_avg`` (their
AdamW_MSAM); v has the sign of the gradient, and the gradient is taken at θ − ρ·v/‖v‖, where the
authors' code keeps the weights between steps. Norm over the whole model, 1e-12 guard.
Before the base optimizer has a momentum (the first step; a base without one, e.g. SGD with
momentum=0) the step is unperturbed: ρ has no effect.

Follows the authors' code (MarlonBecker/MSAM, ``optimizer/msam.py`` ``MSAM.step`` and
``optimizer/adamW_msam.py``), checked against it run side by side (``tests/test_authors_forms.py``,
12 float64 steps with momentum 0.9 and weight decay). There the weights are *stored* at θ+ε between
steps (evaluation needs ``move_back_from_momentumAscent``); here θ is kept and restored bit for bit
after each step, so the model outside a step is always at θ. Known differences:

- **Weight decay's point** (``decay_at``). The authors' SGD MSAM adds wd·p to the gradient while p
  is still the stored θ+ε, i.e. the decay is taken at the perturbed point: wd·(θ − ρ·v/‖v‖).
  ``decay_at="perturbed"`` does that (the gradient gets wd·(p − θ) before the base optimizer adds
  its wd·θ); the default ``"theta"`` leaves the decay to the base optimizer at θ, as every other
  flatmin rule and SGD do (the gradient of (wd/2)‖θ‖² at the θ being updated). The trajectories
  part by wd·ρ per step: max |Δθ| = 1.6e-3 after 12 steps (wd = 5e-3, ρ = 0.3, lr 0.1, momentum 0.9,
  the test's MLP); with ``"perturbed"`` they agree to 6e-17 (their code) and 1e-16 (the loop). Their
  AdamW MSAM decays decoupled, at θ, *after* the Adam step (θ ← (θ − step)(1 − lr·wd); torch's AdamW
  decays before it: 9e-6 after 12 steps at wd = 1e-2, not offered; equal to 1e-16 without decay);
  ``"perturbed"`` is refused with AdamW (its decay never enters the gradient).
- **No Nesterov.** The authors' MSAM has no Nesterov (it takes a ``nesterov`` argument and ignores
  it; their configs say ``nesterov = False``): the trainer's SGD for ``msam`` defaults to
  ``nesterov=False`` (its registry entry's ``sgd_defaults``; ``create_optimizer(..., base="sgd")``
  likewise), overridable with ``--nesterov true``. Given Nesterov, flatmin's MSAM runs it.
- **ρ.** Their class default is 0.3 (flatmin's default); every MSAM command of their README and
  their configs use ρ = 3 (SGD and AdamW alike).
- Clipping: the authors' loop clips the raw gradient (their decay is added inside ``step``); with
  ``decay_at="perturbed"`` the driver's ``max_grad_norm`` clips g + wd·ε. A ρ schedule: their
  move back uses the new ρ with the old ε (a drift when ρ changes); here θ comes back by copy. Their
  last extra epoch recomputes BatchNorm statistics at θ (the statistics of training are θ+ε's, as
  here); flatmin does not. ρ per group (the authors support one group), the norm still global; a
  skipped (non-finite) step leaves v untouched (it is base-optimizer state), so the next step
  perturbs as the skipped one did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import Choice
from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register
from flatmin.optim.rules.sam import RHO

DECAY_AT = Hyper("decay_at", Choice(("theta", "perturbed")), "theta",
                 "MSAM: weight decay at θ (the base optimizer's) or at the perturbed point (the authors')",
                 "msam_decay_at")
HYPERS = (dataclasses.replace(RHO, default=0.3), DECAY_AT)

MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")  # SGD; Adam, AdamW, NAdam, ...


class MSAM(PerturbedOptimizer):
    """Perturbation −ρ·v/‖v‖ from the base optimizer's momentum before the step's only pass."""

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.3, *, decay_at: str = "theta", foreach: bool | None = None,
                 check_finite: bool = True, nonfinite: str | None = None, **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, decay_at=decay_at)
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        for group in self.param_groups:
            self._check_decay(group)

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ ≥ 0 and finite, ``decay_at`` one of its choices."""
        check_group(HYPERS, group)
        if hasattr(self, "base_optimizer"):
            self._check_decay(group)

    def _check_decay(self, group: dict[str, Any]) -> None:
        """The perturbed point's decay needs a decay that enters the gradient (not AdamW's)."""
        decoupled = isinstance(self.base_optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay")
        if group.get("decay_at") == "perturbed" and group.get("weight_decay") and decoupled:
            raise ValueError("decay_at='perturbed' needs a weight decay that enters the gradient (SGD, "
                             "Adam); AdamW decays θ itself (the authors' AdamW MSAM: at θ)")

    @torch.no_grad()
    def _direction(self, ratio: Tensor | float | None) -> None:
        """``decay_at="perturbed"``: .grad += wd·(θ+ε − θ), so with the base optimizer's wd·θ the decay is
        wd·(θ+ε), the authors' (θ+ε not yet restored; .grad unscaled when the driver has a scaler)."""
        saved = self._theta.pairs()  # θ of what this step perturbed
        for group in self.param_groups:
            wd = group.get("weight_decay", 0.0)
            if group.get("decay_at", "theta") != "perturbed" or not wd or not saved:
                continue
            params = [p for p in group["params"] if p.grad is not None and p in saved]
            if not params:
                continue
            grads, weights = self.views([p.grad for p in params]), self.views(params)
            thetas = self.views([saved[p] for p in params])
            if self.foreach:
                torch._foreach_add_(grads, torch._foreach_sub(weights, thetas), alpha=wd)
            else:
                for g, w, t in zip(grads, weights, thetas):
                    g.add_(w - t, alpha=wd)

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
    sgd_defaults={"nesterov": False}, neutral={"rho": 0.0},
    examples=({"rho": 0.3}, {"rho": 0.3, "decay_at": "perturbed"})))

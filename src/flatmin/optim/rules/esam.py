"""ESAM — Efficient SAM (Du, Yan, Feng, Zhou, Zhen, Goh & Tan, ICLR 2022): stochastic weight
perturbation (SWP) and sharpness-sensitive data selection (SDS).

SWP, as in the authors' code (dydjw9/Efficient_SAM, ``ESAM.second_step``): after each update every
parameter tensor independently sits out the next step's ascent pass with probability 1 − β
(``requires_grad`` off: its weight gradient is not computed, which is where the saving comes from),
and the others are perturbed by ε = (ρ/β)·T²g/‖Tg‖, the norm over the tensors that took part. The
final pass computes every gradient again; the first step uses every tensor. β = 1 is SAM exactly.
Tensors are drawn on the host (Python's ``random.Random(seed)``; no device sync), at least one tensor
always takes part (the authors do not guard against none; tiny models would otherwise fail), and
the draw is checkpointed. Between steps the skipped tensors have ``requires_grad=False``: build other
optimizers or check gradients before the first step, or call ``release()`` to switch them back on.
The authors use 1e-7 as the norm guard; here 1e-12 as every flatmin rule (so β = 1 ≡ SAM bit for bit).

SDS (the authors' ``gamma``, their ``ESAM.step``): the final pass uses only the examples whose
loss rose most under ε, ``instance_sharpness = l_after − l_before`` with l_before from the ascent
pass at θ and l_after from a gradient-free forward at θ+ε. Here `select` keeps the ⌊γ·B⌋ sharpest
examples by ``torch.topk`` (a fixed count, so no host sync). The authors take the ⌊γ·B⌋-th largest
value as a cutoff and keep the examples *strictly* above it — ⌊γ·B⌋ − 1 of them without ties, the
paper's γ·B only to within one — and switch selection off for γ ≥ 0.99; their gradient-free forward
runs in train mode and so moves BatchNorm's running statistics at θ+ε, which the driver does not
allow (every pass but the step's first leaves them alone). The per-example losses come from the
caller: the trainer (plain cross-entropy), Lightning (the module's ``per_example_loss``),
`driver.drive(probe=...)`, or, in the two-call form,
``idx = opt.select(l_before, l_after)`` between ``first_step`` and the final backward on ``x[idx]``;
``step(closure)`` cannot provide them and refuses ``gamma < 1``.

Under DDP the tensors a rank skips must be the same on every rank (same seed) and the model must
tolerate parameters without gradients in the ascent pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import SHARE
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

BETA = Hyper("beta", SHARE, 1.0, "ESAM: share β of tensors perturbed per step (the trainer's 0.5)",
             "esam_beta", 0.5)
GAMMA = Hyper("gamma", SHARE, 1.0, "ESAM: share of the batch kept by data selection (trainer: 0.5; 1: none)",
              "esam_gamma", 0.5)
HYPERS = (RHO, BETA, GAMMA, ADAPTIVE)


class ESAM(SharpnessRule):
    """SAM with stochastic weight perturbation (each tensor joins the ascent with probability β) and
    sharpness-sensitive data selection (the final pass on the γ share of the batch made sharpest by ε)."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, beta: float = 1.0, gamma: float = 1.0, adaptive: bool = False, *,
                 seed: int = 0, foreach: bool | None = None, check_finite: bool = True,
                 nonfinite: str | None = None, **base_kwargs: Any) -> None:
        BETA.check(beta)
        GAMMA.check(gamma)
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self.beta, self.gamma = float(beta), float(gamma)
        self._rng = random.Random(seed)
        self._off: list[Tensor] = []  # tensors sitting out the next ascent pass

    def select_share(self) -> float:
        """γ: the share of the batch the final pass keeps."""
        return self.gamma

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """The ⌊γ·B⌋ (at least one) examples whose loss rose most under ε: where the sharpness is."""
        n = loss_before.numel()
        k = max(1, min(n, int(n * self.gamma)))
        return torch.topk((loss_after - loss_before).reshape(-1).float(), k).indices

    def _ascend(self, grad_scale: object = None) -> None:
        """Every tensor back on; ε = (ρ/β)·T²g/‖Tg‖ over the tensors that took part (those that sat out are
        left out by name too: a wrapper that computes their gradient anyway changes nothing)."""
        off = set(self._off)
        self.release()
        slots = self.slots()
        if off:
            pairs = [[(p, g) for p, g in zip(s.params, s.grads) if p not in off] for s in slots]
            slots = [self.slot(s.group, [p for p, _ in ps], [g for _, g in ps])
                     for s, ps in zip(slots, pairs) if ps]
        self.sam_ascend(slots, scale=1.0 / self.beta, consume=self._consume)

    def release(self) -> None:
        """Switch ``requires_grad`` back on for the tensors the draw left out."""
        for p in self._off:
            p.requires_grad_(True)
        self._off = []

    def _after_step(self, found: Tensor | None) -> None:
        """Draw the tensors that sit out the next ascent pass (each with probability 1 − β)."""
        self.release()
        if self.beta >= 1:
            return
        live = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        off = [p for p in live if self._rng.random() > self.beta]
        if len(off) == len(live) and off:
            off = off[1:]  # at least one tensor ascends
        for p in off:
            p.requires_grad_(False)
        self._off = off

    def extra_state(self) -> dict[str, Any]:
        """The draw's random state and which tensors sit out."""
        order = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {"rng": self._rng.getstate(), "off": [order[p] for p in self._off]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the same draws."""
        self.release()
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))
        order = [p for g in self.param_groups for p in g["params"]]
        self._off = [order[i] for i in state.get("off", [])]
        for p in self._off:
            p.requires_grad_(False)


register(RuleInfo(
    "esam", ESAM, "efficient SAM: stochastic weight perturbation (β), sharpness-sensitive data selection (γ)",
    paper="Du et al., ICLR 2022", code="dydjw9/Efficient_SAM", hypers=HYPERS, passes="≈ 1 + β (final on γ·B)",
    needs="per-example losses when gamma < 1", from_config=lambda cfg: {"seed": cfg.seed},
    unused_params=lambda kw: kw.get("beta", 1.0) < 1,
    neutral={"rho": 0.0, "beta": 1.0, "gamma": 1.0},
    examples=({"rho": 0.05, "beta": 0.5}, {"rho": 0.05, "gamma": 0.5})))

"""Lookbehind-SAM (Mordido, Malviya, Baratin & Chandar, ICML 2024): k SAM ascent steps per batch, each
from the point the previous one reached, and one descent that interpolates between θ (the slow
weights) and where k descent steps would have led (the fast weights).

The authors' step on one batch (θ the slow weights; θ'_i the perturbed point, θ_i the fast weights):

    θ'_0 = θ_0 = θ
    for i = 1..k:   θ'_i = θ'_{i−1} + ρ·T²g'_{i−1}/‖T g'_{i−1}‖,   g'_i = ∇f(θ'_i)    (k steps back)
                    θ_i  = θ_{i−1} − η·g'_i                                            (fast weights)
    θ ← θ + α·(θ_k − θ)                                                                (1 step forward)

(T = |θ'| with ``adaptive``, ASAM's sphere; else I). For gradient descent θ_k − θ = −η·Σ g'_i, so the
batch's step is ONE step of the base optimizer from θ along

    d = α · Σ_{i=1..k} ∇f(θ'_i),

which is what this rule does, on flatmin's one pass order: ``ascent_passes() = k`` (the passes at
θ'_0..θ'_{k−1}: each one's gradient is the next ascent's, and for i ≥ 1 also a descent gradient,
summed in a kept buffer), the final pass at θ'_k, then `_direction` sets ``.grad ← α·Σ g'_i``.
A step costs k + 1 passes. Adaptive α (the authors' ``alpha=-1``): per tensor,
α = (1 + cos(θ_1 − θ, θ_k − θ))/2, which for gradient descent is (1 + cos(g'_1, Σ g'_i))/2.

Exact reductions: k = 1 with α = 1 is SAM bit for bit (ASAM with ``adaptive``); ρ = 0 makes every
g'_i = ∇f(θ), so d = α·k·∇f(θ): the base optimizer when α·k = 1 (bit for bit for k = 1, 2).

Checked against the authors' code, chandar-lab/Lookbehind-SAM: lookbehind.py (``LookbehindSAM.
ascent_step``, ``LookbehindASAM.descent_step`` with its ``alpha == -1`` branch) driven as in
example_cifar.py's ``train`` (k ascent/descent pairs on one batch). Differences:

- the base optimizer steps ONCE per batch, from θ, along d; the authors step it k times on the fast
  weights, then interpolate. The two are the same for SGD without momentum or weight decay (the
  paper's gradient-descent form); with momentum, weight decay or Adam the authors' base sees k
  updates per batch (decay taken at θ_{i−1}, the momentum advanced k times) and this one sees one.
  With momentum μ both move θ by about α·k·η·g/(1 − μ) a batch once the momentum has built up; the
  transient differs (theirs builds up k times faster), and so does Adam's normalisation;
- k + 1 passes, not 2k: the authors' ascent i + 1 recomputes the gradient at θ'_i, the point and the
  batch of descent gradient i, so it is the same gradient; it differs only for a random model
  (dropout draws again) and for BatchNorm, whose running statistics the authors update on all 2k
  passes and flatmin on the first pass only (as every flatmin rule);
- the norm guard is ‖·‖ + 1e-12 (the authors' 1e-16, from the ASAM code), ρ is per group and the
  ascent's norm is over every group;
- ``adaptive=True`` is flatmin's ASAM (|θ| on every tensor); the authors' LookbehindASAM scales by
  |θ| + η (η = 0.01 in the class, 0.0 in example_cifar.py) on tensors whose name has "weight" only;
- adaptive α's cosine is taken between gradients (the authors': between fast-weight displacements;
  the same for SGD without momentum or weight decay) and stays on the device (theirs: ``.item()``
  per tensor); its guard is theirs (torch's CosineSimilarity: each norm at least 1e-8);
- θ is the slow weights at the end of every step, so there are no fast weights to evaluate apart
  (the authors evaluate on ``_backup_and_load_slow_cache()``, which is θ here);
- defaults: k = 2 and ρ = 0.05 (the README's LookbehindSAM command), α = 0.5 static (the class
  default; the README's commands use adaptive α, the paper's grid α ∈ {0.2, 0.5, 0.8}).

Nothing is carried from one step to the next (the sum of descent gradients is rebuilt every step),
so a skipped step leaves only the base optimizer's state to the guard, and a checkpoint holds no more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import POSITIVE_INT, SHARE, Flag
from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer, Slot
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register
from flatmin.optim.rules.sam import ADAPTIVE, RHO

K_STEPS = Hyper("k", POSITIVE_INT, 2, "Lookbehind: ascent steps per batch, each from the last (2)",
                "lookbehind_k")
ALPHA = Hyper("alpha", SHARE, 0.5, "Lookbehind: interpolation α toward the fast weights, in (0, 1] (0.5)",
              "lookbehind_alpha", used_with=("adaptive_alpha", (False,)))
ADAPTIVE_ALPHA = Hyper("adaptive_alpha", Flag(), False,
                       "Lookbehind: α per tensor from the fast weights' agreement (the authors' alpha=-1)",
                       "lookbehind_adaptive_alpha")
HYPERS = (RHO, K_STEPS, ALPHA, ADAPTIVE_ALPHA, ADAPTIVE)
COS_EPS = 1e-8  # adaptive α's cosine guards each norm as torch's CosineSimilarity (the authors' call) does


class LookbehindSAM(PerturbedOptimizer):
    """k chained SAM ascents per batch (k + 1 passes); one base step along α·Σ of their descent gradients.

    ``step(closure)``: the closure runs k + 1 times (at θ'_0..θ'_k) and ``step`` returns what its first
    call returned. Two-call form, as AMP's (k ascents)::

        for _ in range(k): loss(θ'_i).backward(); opt.perturb(); opt.zero_grad()
        loss(θ'_k).backward(); opt.restore_and_step()

    Kept during a step: Σ g'_i (k ≥ 2) and, with adaptive α and k ≥ 3, g'_1 (1× the parameters each).
    """

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, k: int = 2, alpha: float = 0.5, adaptive_alpha: bool = False,
                 adaptive: bool = False, *, foreach: bool | None = None, check_finite: bool = True,
                 nonfinite: str | None = None, **base_kwargs: Any) -> None:
        K_STEPS.check(k)
        defaults = dict(rho=rho, alpha=alpha, adaptive_alpha=adaptive_alpha, adaptive=adaptive)
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        self.k = k
        self._sum: dict[Tensor, Tensor] = {}  # Σ g'_i of this step's ascent passes i = 1..k−1
        self._first: dict[Tensor, Tensor] = {}  # g'_1, for adaptive α when k ≥ 3

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ ≥ 0, α in (0, 1], the flags booleans (the registry's rules)."""
        check_group(HYPERS, group)

    def ascent_passes(self) -> int:
        """k ascent passes (at θ'_0..θ'_{k−1}); the final pass is at θ'_k."""
        return self.k

    # -- k steps back ----------------------------------------------------------------------------

    def _ascend(self, grad_scale: object = None) -> None:
        """Keep g'_i as a descent gradient (i ≥ 1), then θ'_{i+1} = θ'_i + ρ·T²g'_i/‖Tg'_i‖ (θ saved once)."""
        slots = self.slots()
        i = self._ascents  # this pass's gradient is g'_i, taken at θ'_i
        if i >= 1:
            self._keep_descent(slots, first=i == 1)
        self.sam_ascend(slots, save=i == 0)  # θ, the slow weights, saved at the first ascent only

    def _keep_descent(self, slots: list[Slot], first: bool) -> None:
        """Σ g'_i ← g'_1 on the first descent gradient, += g'_i after (the ascent then consumes .grad)."""
        for s in slots:
            sums = self.kept(self._sum, s.params)
            (K.copy_ if first else K.add_)(sums, s.grads, self.foreach)
            if first and self.k >= 3 and s.group["adaptive_alpha"]:
                K.copy_(self.kept(self._first, s.params), s.grads, self.foreach)

    # -- 1 step forward --------------------------------------------------------------------------

    def _direction(self, ratio: Tensor | float | None) -> None:
        """.grad ← α·Σ_{i=1..k} g'_i (g'_k is .grad; the rest kept, brought to its loss scale)."""
        for s in self.slots():
            if self.k >= 2 and all(p in self._sum for p in s.params):
                sums = self.views([self._sum[p] for p in s.params])
                if ratio is not None:
                    torch._foreach_mul_(sums, ratio)
                K.add_(s.grads, sums, self.foreach)  # D = Σ g'_i
            if s.group["adaptive_alpha"]:
                torch._foreach_mul_(s.grads, self._adaptive_alpha(s, ratio))
            elif s.group["alpha"] != 1:
                torch._foreach_mul_(s.grads, s.group["alpha"])

    def _adaptive_alpha(self, s: Slot, ratio: Tensor | float | None) -> list[Tensor]:
        """Per tensor (1 + cos(g'_1, D))/2: how far the first fast step and the whole k agree."""
        first = s.grads if self.k == 1 else self.views([(self._sum if self.k == 2 else self._first)[p]
                                                         for p in s.params])
        if self.k >= 3 and ratio is not None:
            torch._foreach_mul_(first, ratio)  # Σ was scaled in place already; g'_1 not yet
        dots, norms_a, norms_d = self._per_tensor(first, s.grads)
        cos = dots / (norms_a.clamp_min(COS_EPS) * norms_d.clamp_min(COS_EPS))
        return list(((1 + cos) / 2).to(s.grads[0].dtype).unbind())

    def _per_tensor(self, a: list[Tensor], b: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """⟨a_t, b_t⟩, ‖a_t‖, ‖b_t‖ of each whole tensor t (finished across ranks when sharded)."""
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32
        dots = torch.stack([(x.to(dtype) * y.to(dtype)).sum() for x, y in zip(a, b)])
        na, nb = K.norms(a, self.foreach).to(dtype), K.norms(b, self.foreach).to(dtype)
        reduce = self.reduce_norms
        if reduce is not None:
            dots, na, nb = reduce.total(dots), reduce(na, "per_tensor"), reduce(nb, "per_tensor")
        return dots, na, nb

    def held_buffers(self) -> list[Tensor]:
        """θ copies, guard snapshots, Σ g'_i and (adaptive α, k ≥ 3) g'_1."""
        return super().held_buffers() + list(self._sum.values()) + list(self._first.values())


register(RuleInfo(
    "lookbehind", LookbehindSAM,
    "Lookbehind-SAM: k chained SAM ascents, one base step along α·Σ of their gradients (slow/fast weights)",
    paper="Mordido et al., ICML 2024", code="chandar-lab/Lookbehind-SAM", hypers=HYPERS, passes="k + 1",
    kept="Σ of descent grads (k ≥ 2); + g'₁ (adaptive α, k ≥ 3)",
    neutral={"rho": 0.0, "k": 1, "alpha": 1.0, "adaptive_alpha": False},
    examples=({"rho": 0.05, "k": 2, "alpha": 0.5}, {"rho": 0.05, "k": 3, "adaptive_alpha": True})))

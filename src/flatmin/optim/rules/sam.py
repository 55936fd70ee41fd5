"""SAM — Sharpness-Aware Minimization (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021).

    e(w) = ρ · T_w² ∇L(w) / ‖T_w ∇L(w)‖,   then the gradient at w + e(w) updates w.

T_w = I for SAM and T_w = |w| (element-wise) for ASAM (``adaptive=True``). Unlike AMP's
clipped ascent, SAM always moves exactly to the sphere: it is AMP with N = 1 and ζ → ∞ up to
the norm (global over all groups here, as in the widely used PyTorch implementation, with ρ
taken per group). The API follows that implementation: ``first_step`` / ``second_step``.

ASAM, two forms. The default (``eta=0``, ``weights_only=False``) is the widely used PyTorch
collection's (davda54/sam): T_w = |w| on every tensor. The authors' (SamsungLabs/ASAM, ``asam.py``
``ASAM.ascent_step``) is ``eta=0.01, weights_only=True``: T_w = |w| + η on the weight tensors and
T_w = I on the biases (which |w| alone would freeze where they are 0). Checked against their code
run side by side and a loop written from it (``tests/test_authors_forms.py``, 12 float64 steps of SGD
with momentum and weight decay: max |Δθ| 5.5e-13 against their code — their 1e-16 norm guard against
flatmin's 1e-12 — and 1.1e-16 against the loop; the default form is 0.12 away from theirs there).
Differences from their code: the authors pick the scaled tensors by
name ("weight" in the parameter's name, so a normalisation layer's 1-D scale is scaled too); here a
"weight" is a tensor of ≥ 2 dimensions (a 1-D scale is left at T = I) — a group with
``adaptive=False`` (T = I) or ``weights_only=False`` (all scaled) gives any split by name exactly;
the norm guard is 1e-12 (theirs 1e-16); θ is restored by copy (theirs subtracts e); ρ per group.
The default stays davda54's form (it is what the benchmark ran, and η = 0 on every tensor is
today's behaviour bit for bit); ρ is the authors' (0.5 on CIFAR: the trainer's presets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, POSITIVE_INT, Flag
from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register

RHO = Hyper("rho", NONNEGATIVE, 0.05, "radius ρ of the ascent", "rho", None)
ADAPTIVE = Hyper("adaptive", Flag(), False, "ASAM's |w|-scaled sphere instead of SAM's")
ETA = Hyper("eta", NONNEGATIVE, 0.0, "ASAM: T = |w| + η (the authors' 0.01; 0: davda54's |w|)", "asam_eta")
WEIGHTS_ONLY = Hyper("weights_only", Flag(), False, "ASAM: scale only tensors of ≥ 2 dims, biases "
                     "unscaled (the authors'; false: every tensor, davda54's)", "asam_weights_only")
SPLITS = Hyper("splits", POSITIVE_INT, 1, "SAM/ASAM m-sharpness: sub-batches, own ascent each (1)",
               "sam_splits")
HYPERS = (RHO, ADAPTIVE, ETA, WEIGHTS_ONLY, SPLITS)


def first_step(opt: PerturbedOptimizer, zero_grad: bool) -> None:
    """The popular SAM API's first half for any rule with a ``_consume`` flag: one ascent (a second
    one in the same step is refused), nothing on a step whose rule makes none (LookSAM's reuse)."""
    if not opt._begun:
        opt.begin_step()
    if opt.ascent_passes():
        opt._consume = zero_grad
        try:
            opt.perturb()
        finally:
            opt._consume = True
    if zero_grad:
        opt.zero_grad(set_to_none=True)


class SAM(PerturbedOptimizer):
    """SAM/ASAM around any base optimizer; θ is restored bit for bit after the perturbed pass.

    ``splits = G > 1`` is m-sharpness (Foret et al. §4.1, m = B/G): the batch is cut into G
    contiguous sub-batches, each takes its own ascent from w and its own gradient at w + e_k(w), and
    the update uses their mean (the authors' per-device ascent, then ``pmean``). ``step(closure)``
    then calls ``closure(split=k, splits=G)``, which returns the mean loss of sub-batch k
    (`flatmin.optim.driver.sub_batch` gives its slice); in the two-call form, call ``next_split()``
    between one sub-batch's final backward and the next one's ``first_step``.

    ``step(closure)`` calls the closure twice (at w, then at w + e(w)) and returns the first
    result, detached; a non-finite loss restores w, skips the update on the device and
    :class:`flatmin.errors.NonFiniteLossError` at the next ``poll()``. For loops without a closure::

        loss(w).backward();        opt.first_step(zero_grad=True)
        loss(w + e).backward();    opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.0,
        weights_only: bool = False,
        splits: int = 1,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, weights_only=weights_only)
        self.validate_group(defaults)
        SPLITS.check(splits)
        super().__init__(params, defaults, base_optimizer, base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self.splits = splits

    def ascent_splits(self) -> int:
        """m-sharpness: each of ``splits`` sub-batches ascends from θ on its own gradient."""
        return self.splits

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ ≥ 0 and finite, η ≥ 0 (the registry's rules)."""
        check_group(HYPERS, group)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e(w) using the current gradients (the ascent half)."""
        first_step(self, zero_grad)

    _consume = True  # whether e(w) may be built in the gradients' storage

    def _ascend(self, grad_scale: object = None) -> None:
        """w ← w + e(w) (the base's `sam_ascend`); a loss scale cancels in the normalisation."""
        self.sam_ascend(self.slots(), consume=self._consume)

    def ascent_passes(self) -> int:
        """One ascent pass (the closure runs twice)."""
        return 1

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to w exactly, then the base update with the gradient taken at w + e(w)."""
        self.restore_and_step()
        if zero_grad:
            self.zero_grad(set_to_none=True)


register(RuleInfo(
    "sam", SAM, "sharpness-aware minimisation: one normalised ascent step to the ρ-sphere",
    paper="Foret et al., ICLR 2021", code="google-research/sam", hypers=(RHO, SPLITS),
    kept="Σ of sub-batch grads (splits > 1)", needs="sub-batches when splits > 1", order=30,
    neutral={"rho": 0.0},
    examples=({"rho": 0.05}, {"rho": 0.05, "splits": 2})))
register(RuleInfo(
    "asam", SAM, "adaptive SAM: the ascent on the |w|-scaled sphere", paper="Kwon et al., ICML 2021",
    code="SamsungLabs/ASAM", hypers=(RHO, ETA, WEIGHTS_ONLY, SPLITS), fixed={"adaptive": True},
    needs="sub-batches when splits > 1", order=31, neutral={"rho": 0.0},
    examples=({"rho": 0.5}, {"rho": 0.5, "eta": 0.01, "weights_only": True})))

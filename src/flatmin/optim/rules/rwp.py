"""RWP / ARWP — random weight perturbation (Li et al., 2022, "Efficient Generalization Improvement Guided
by Random Weight Perturbation") with the mixed loss and the adaptive, Fisher-damped perturbation of its
sequel (Li et al., TMLR 2024, "Revisiting Random Weight Perturbation for Efficiently Improving
Generalization", openreview WbbgOHpoPX: m-RWP, ARWP).

The objective mixes the loss at a random point with the loss at θ, (1−λ)·f(θ) + λ·E_ε f(θ + ε). One step:

    g   = ∇f(θ)                                         (the clean pass; BatchNorm statistics move here)
    ε_j = σ·‖θ_j‖·z_j / √(1 + η·Σ_j F),   z ~ N(0, I)    (j: a filter, i.e. a row θ[j, ...] of a tensor
                                                          with ≥ 2 dims; a 1-d tensor (bias, norm
                                                          layer) takes its whole norm ‖θ‖ + 1e-16 and
                                                          its own F element by element)
    g_ε = ∇f(θ + ε)                                     (the perturbed pass)
    F   ← β·F + g_ε²                                    (ARWP's running Fisher; η = 0: none is kept)
    d   = λ·g_ε + (1−λ)·g,  computed as g + λ·(g_ε − g)

and the base optimizer steps from θ (restored by copy) with d. ε depends on θ, F (earlier steps) and
the generator only — never on this step's g — so the two gradients are independent.

Exact reductions: σ = 0 is the base optimizer bit for bit for every λ (g_ε = g, and g + λ·0 = g: that is
why d is written as g + λ·(g_ε − g)); λ = 0 is the base optimizer too (g_ε is computed, then ignored);
λ = 1 in every group drops the clean pass: one pass at θ + ε, the authors' 1×-cost ARWP (their
``ARWP`` optimizer); η = 0 is the plain RWP perturbation (F is then neither kept nor checkpointed).

Follows the authors' code, checked by reading it (nblt/mARWP ``train_marwp.py``, ``train()``: the
filter-wise noise, its division by √(1 + η·row-sum of F), F ← β·F + g_ε² from the perturbed pass's raw
gradient after the noise of this step is drawn, the mix ``lmbda·g1 + (1−lmbda)·g0``, BatchNorm statistics
moving in the clean pass only; nblt/mARWP ``utils.py``, ``ARWP.first_step``/``second_step``: the 1× form;
nblt/RWP ``train_rwp_parallel.py``, ``train()``: the same noise, γ = σ, α = λ, split across ranks).
Hyper-parameters keep the sequel's names (σ, λ, η, β; the 2022 code's γ and α are σ and λ); defaults are
their argparse defaults (σ = 0.01, λ = 0.5, β = 0.9) with η = 0 (plain RWP; their ARWP default is 1, their
scripts use η = 0.1, β = 0.99, σ = 0.015).

Differences: (1) the authors compute g and g_ε on two different batches (their single-GPU loop alternates
batches and doubles the epochs; on DDP each rank has its own batch); here both passes use the step's one
batch, so a step consumes one batch, not two (a ``step(closure)`` closure may still feed each pass its own
batch). (2) θ is restored by copy, not by subtracting ε. (3) The noise is z ~ N(0, I) from ``generator``
(the base's ``normal_draws``: the same numbers for any number of FSDP ranks) times the scale, not
``torch.normal(0, std)``: the same distribution, another stream. (4) Their ``ARWP`` class puts the guard in
the ≥ 2-d scale too ((σ + 1e-16)·‖θ_j‖); here, as in ``train_marwp.py``, only the 1-d tensors' whole norm
gets ``+ 1e-16``. (5) Their ARWP runs σ on a schedule (``CosineInc``: σ grows to (1 + inc)·σ; m-ARWP's
optional ``--incstd`` grows it from the weight decay to σ); none is built in, but σ is read from each group
at every step, so a schedule may set ``group["sigma"]``. (6) Gradients are unscaled (a GradScaler's scale)
before they enter F; a skipped (non-finite) step leaves F bit for bit (`carried_state`). (7) A non-finite
clean gradient skips the step (their code has no guard): ε does not read it, so the base checks it
(`ascent_unread`) rather than leaving it to the final gradient's check. (8) Parameters with
``requires_grad`` are perturbed, frozen ones are
left alone (they perturb every parameter). (9) BatchNorm statistics move in the clean pass only where the
caller gives the driver the model (the trainer, Lightning, ``drive(model=...)``); ``step(closure)`` cannot
freeze them, as for every rule. (10) The authors' split across DDP ranks (below) is not built in.

Cost and parallelism. Two passes per step (one when λ = 1), run one after the other by the driver, each
on the whole batch. They need not be: ε needs no gradient, so f at θ and at θ + ε can be evaluated at the
same time. The authors split them across ranks (``train_rwp_parallel.py``, ``train_mrwp_parallel.py``):
odd ranks perturb their weights and scale their loss by 2λ, even ranks stay at θ and scale theirs by
2(1−λ); DDP's all-reduce mean of the gradients then *is* λ·ḡ_ε + (1−λ)·ḡ, and each rank makes one
forward/backward per step (on 2 GPUs, ERM's wall time; each gradient from half the ranks' batches; an odd
rank subtracts its noise before ``optimizer.step()``). flatmin does not do this: the driver's pass plan is
the same on every rank, and "2 ranks ≡ one process" would not hold by design (each gradient from half the
data). In one process a caller could evaluate both at once — ``torch.func.functional_call`` on the two
parameter sets stacked under ``torch.vmap``, or a copy of the model on a second CUDA stream or device —
but the protocol cannot take the result yet: ``perturb()`` keeps g and draws ε in one call, so overlapping
the passes needs a hook that draws ε before any gradient and takes g together with g_ε at
``restore_and_step`` (a change to the base, not made here).

Two-call form: ``opt.begin_step()`` before the first forward, ``opt.perturb()`` after the clean backward
(skip it when λ = 1: the step's one pass is then at θ + ε), ``opt.restore_and_step()`` after the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, UNIT
from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register
from flatmin.optim.theta import by_index, from_index

GUARD = 1e-16  # the authors' guard on a 1-d tensor's norm
HYPERS = (
    Hyper("sigma", NONNEGATIVE, 0.01, "RWP: noise scale σ, relative to each filter's norm (0.01)",
          "rwp_sigma"),
    Hyper("lmbda", UNIT, 0.5, "RWP: weight λ of the perturbed gradient in the mix (0.5; 1: one pass)",
          "rwp_lmbda"),
    Hyper("eta", NONNEGATIVE, 0.0, "RWP: ARWP's damping η of the noise by the Fisher (0: plain RWP)",
          "rwp_eta"),
    Hyper("beta", UNIT, 0.9, "RWP: ARWP's decay β of the running Fisher (0.9)", "rwp_beta"),
)


def _rows(t: Tensor, values: Tensor) -> Tensor:
    """One value per filter (row) of ``t``, shaped to broadcast over it."""
    return values.reshape((-1,) + (1,) * (t.dim() - 1))


def filter_norms(w: Tensor) -> Tensor:
    """‖θ_j‖ for each row j of a ≥ 2-d tensor (a row is never split by FSDP, so a shard's rows are whole)."""
    return _rows(w, torch.linalg.vector_norm(w.flatten(1), dim=1))


def filter_fisher(param: Tensor, fisher: Tensor) -> Tensor:
    """Σ_j F: the Fisher summed over each filter of a ≥ 2-d tensor; element by element for a 1-d one."""
    return _rows(fisher, fisher.flatten(1).sum(1)) if param.dim() > 1 else fisher


class RWP(PerturbedOptimizer):
    """Random weight perturbation: the base step on λ·∇f(θ+ε) + (1−λ)·∇f(θ), ε Gaussian and filter-wise
    scaled; ``eta > 0`` is ARWP (ε damped by a running Fisher F, kept: 1× params). Keeps g (1× params)."""

    ascent_unread = True  # ε does not read g: the base checks the clean gradient for NaN/±inf itself

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        sigma: float = 0.01,
        lmbda: float = 0.5,
        eta: float = 0.0,
        beta: float = 0.9,
        *,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(sigma=sigma, lmbda=lmbda, eta=eta, beta=beta)
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self.generator = generator
        self._g: dict[Tensor, Tensor] = {}  # the clean gradient g of this step (buffers reused)
        self._clean: set[Tensor] = set()  # the parameters whose g this step's clean pass gave
        self._fisher: dict[Tensor, Tensor] = {}  # ARWP's running Fisher F (groups with η > 0)

    def validate_group(self, group: dict[str, Any]) -> None:
        """σ, η ≥ 0; λ, β in [0, 1] (the registry's rules)."""
        check_group(HYPERS, group)

    # -- the pass order ------------------------------------------------------------------------

    def ascent_passes(self) -> int:
        """The clean pass at θ, unless every group has λ = 1 (its gradient would weigh nothing)."""
        return 1 if any(group["lmbda"] < 1 for group in self.param_groups) else 0

    @torch.no_grad()
    def _begin(self) -> None:
        """F's buffers (zeros: the authors' first step has none, and 1/√(1 + η·0) = 1); with λ = 1 the
        noise at once, the step's one pass being at θ + ε."""
        self._clean = set()
        for group in self.param_groups:
            if group["eta"] > 0:
                self.kept(self._fisher, self._trainable(group), zero=True)
        if not self.ascent_passes():
            self._perturb()

    @torch.no_grad()
    def _ascend(self, grad_scale: Tensor | float | None = None) -> None:
        """Keep the clean gradient g (in the ascent pass's loss scale), then θ ← θ + ε."""
        slots = self.slots()
        for _, params, _, grads in slots:
            K.copy_(self.kept(self._g, params), grads, self.foreach)
            self._clean.update(params)
        self._perturb()

    @torch.no_grad()
    def _direction(self, ratio: Tensor | float | None) -> None:
        """F ← β·F + g_ε² (ARWP), then .grad ← g + λ·(g_ε − g) where the clean pass gave g."""
        unscale = None if ratio is not None or self._ascent_scale is None else 1.0 / self._ascent_scale
        for group, params, _, grads in self.slots():
            if group["eta"] > 0:
                self._accumulate_fisher(group, params, grads, unscale)
            both = [i for i, p in enumerate(params) if p in self._clean]
            if both:
                self._mix(group, [params[i] for i in both], [grads[i] for i in both], ratio)
        self._clean = set()

    # -- the pieces -----------------------------------------------------------------------------

    @staticmethod
    def _trainable(group: dict[str, Any]) -> list[Tensor]:
        """The parameters a perturbation moves (frozen ones stay)."""
        return [p for p in group["params"] if p.requires_grad]

    def _perturb(self) -> None:
        """θ ← θ + ε in every group, θ saved first."""
        for group in self.param_groups:
            params = self._trainable(group)
            if not params:
                continue
            self.save_theta(params)
            draws, _ = self.normal_draws(params, self.generator)  # the same numbers for any number of ranks
            for w, z, scale in zip(self.views(params), draws, self._scales(group, params)):
                eps = z.mul_(scale)
                w.add_(eps)

    def _scales(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """ε's standard deviations: σ·‖θ_j‖ per filter (1-d: σ·(‖θ‖ + 1e-16)), over √(1 + η·Σ_j F) (ARWP)."""
        weights, sigma, eta = self.views(params), group["sigma"], group["eta"]
        flat = [w for p, w in zip(params, weights) if p.dim() <= 1]
        whole = iter(self._tensor_norms(flat)) if flat else iter(())
        scales = [sigma * filter_norms(w) if p.dim() > 1 else sigma * (next(whole) + GUARD)
                  for p, w in zip(params, weights)]
        if eta > 0:
            fisher = self.kept(self._fisher, params, zero=True)
            scales = [s / torch.sqrt(1 + eta * filter_fisher(p, f))
                      for s, p, f in zip(scales, params, fisher)]
        return scales

    def _tensor_norms(self, tensors: list[Tensor]) -> Tensor:
        """Each whole tensor's norm (a shard's finished across ranks: one all-reduce)."""
        norms = K.norms(tensors, self.foreach)
        reduce = self.reduce_norms
        return norms if reduce is None else reduce(norms, "per_tensor")

    def _accumulate_fisher(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                           unscale: Tensor | float | None) -> None:
        """F ← β·F + g_ε², g_ε as the loss defines it (a loss scale divided out first)."""
        fisher = self.kept(self._fisher, params, zero=True)
        if unscale is not None:
            grads = torch._foreach_mul(grads, unscale)
        torch._foreach_mul_(fisher, group["beta"])
        torch._foreach_addcmul_(fisher, grads, grads)

    def _mix(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
             ratio: Tensor | float | None) -> None:
        """.grad (g_ε) ← g + λ·(g_ε − g), g first brought to the final pass's loss scale."""
        kept = self.views([self._g[p] for p in params])
        if ratio is not None:
            torch._foreach_mul_(kept, ratio)
        torch._foreach_sub_(grads, kept)
        K.axpby_(grads, kept, group["lmbda"], 1.0, self.foreach)

    # -- state ----------------------------------------------------------------------------------

    def carried_state(self) -> list[Tensor]:
        """F: a skipped step leaves it as it was (g is rewritten by every step before it is read)."""
        return list(self._fisher.values())

    def held_buffers(self) -> list[Tensor]:
        """θ copies, guard snapshots, g and F."""
        return super().held_buffers() + list(self._g.values()) + list(self._fisher.values())

    def extra_state(self) -> dict[str, Any]:
        """F (by parameter position) and the noise generator's state, when one was given."""
        state: dict[str, Any] = {"fisher": by_index(self.param_groups, self._fisher)}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue from the saved F and noise stream."""
        self._fisher = from_index(self.param_groups, state.get("fisher", {}))
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


register(RuleInfo(
    "rwp", RWP, "random weight perturbation: λ·∇f(θ+ε) + (1−λ)·∇f(θ), ε filter-wise Gaussian "
    "(ARWP: damped by a running Fisher)",
    paper="Li et al., arXiv 2022 (RWP); Li et al., TMLR 2024 (m-RWP, ARWP)", code="nblt/RWP, nblt/mARWP",
    hypers=HYPERS, passes="2, independent (1 when lmbda = 1)",
    kept="g; Fisher F when eta > 0", order=21, neutral={"sigma": 0.0},
    examples=({"sigma": 0.05}, {"sigma": 0.05, "lmbda": 1.0, "eta": 0.5})))

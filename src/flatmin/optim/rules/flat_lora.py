"""Flat-LoRA — random weight perturbation in the full weight space of a LoRA fine-tune (Li, He, Li, Wang,
Shang & Huang, ICML 2025, "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape", arXiv 2409.14396).

A LoRA layer computes with W' = W + s·B·A (W frozen, A and B trained, s = α/r). Flat-LoRA minimises the
expected loss at a random point of the *full* weight space, E_ε f(W' + ε), at the cost of plain LoRA.
One step:

    ε_i = σ_t · ‖W'_i‖ / √n · z_i,   z ~ N(0, I)     (i: a filter, i.e. the output row W'[i, :] of a layer;
                                                     n: the filter's size, a Linear's input dimension)
    W  ← W + ε                                      (the frozen base weight carries the noise: W + ε + sBA
                                                     is W' + ε, and ∂f/∂A, ∂f/∂B are taken there)
    g  = ∇_{A,B} f(W + ε + sBA)                     (the step's one forward/backward)
    W  ← W (restored),  then the base optimizer steps A and B with g

σ_t rises with the steps: σ_t = σ·½(1 − cos(π·min(t, T)/T)) over the first T = ``ramp`` steps (t = the
steps begun, from 0), then σ; ``ramp=0`` is σ from the first step. ε never reads a gradient, so a step is
one pass (``ascent_passes() == 0``: the noise is drawn in `_begin`, before the pass).

Which tensors carry the noise. An optimizer sees tensors, not layers, so it must be told the LoRA
structure: `FlatLoRA(params, model=peft_model)`, `opt.bind_model(model)`, ``create_optimizer(model,
"flat_lora")`` and the Hugging Face `PerturbedTrainer` (which bind the model themselves) find every peft
LoRA Linear layer (``lora.Linear``: an ``nn.Linear`` or GPT-2's ``Conv1D`` base) whose adapter factors A or
B are in the optimizer, and perturb that layer's base weight W with the filter norms of its merged weight
W' = W + Σ s·B·A (every adapter of the layer whose factors the optimizer holds). Every other trainable
tensor with ≥ 2 dims that is not a LoRA factor (a peft ``modules_to_save`` head; a whole plain model)
is perturbed itself, filter-wise, with W' = W: on a model without LoRA layers — the conformance
matrix's MLPs, ``flatmin train`` — Flat-LoRA is one-pass random weight perturbation of every weight
matrix (RWP with λ = 1 and the row norm divided by √n). 1-d tensors (biases, norm layers) and the
adapter factors themselves are never perturbed — once the model is bound: given only a peft model's
tensors, A and B are trainable 2-d tensors like any other and would be perturbed themselves (the factors
of other peft tuners, LoHa's or IA³'s, are always treated so). σ = 0 (or σ_t = 0, the ramp's first
step) perturbs nothing: the step is the base optimizer's, bit for bit.

Checked against the authors' code by reading it (nblt/Flat-LoRA ``logTrainer.py``,
``FlatLoraTrainer.training_step``; ``run_exp.py`` passes ``rho`` to ``utils.py``'s training loop, which
picks that trainer when ``rho > 0``): for each peft ``LoraLinear`` module,
``data = W + scaling·(B @ A)``, ``filter_norm = factor·(rho + 1e-16)/√(data.shape[1])·‖data_i‖``, noise
``torch.normal(0, filter_norm)`` added to ``module.weight`` (the base weight) before the forward of the
first micro-batch of an accumulation window and removed after the backward of its last, so one ε per
optimizer step; the factor ½(1 − cos(π·c/C)) with c the micro-batches done and C the run's micro-batches
(per-device batches per epoch × epochs): a cosine rise from 0 to 1 over the whole run. Their README's
Flat-LoRA command uses ``rho=0.05`` (their argument default 0 is refused by an assert): σ = 0.05 here.

Differences: (1) W is restored by copy from θ's buffers (bit for bit; memory: one copy of every perturbed
weight — with LoRA, of the adapted layers' base weights); the authors keep only the seed and the filter
norms and subtract the re-drawn noise (no copy, W back up to rounding). (2) The noise is z ~ N(0, I) from
``generator`` (the base's ``normal_draws``: the same numbers for any number of FSDP ranks) times the scale;
the authors reseed torch's global generator from the clock's fractional digits every step and call
``torch.normal(0, std)`` (the same distribution, not reproducible from the run's seed). (3) The schedule
runs over ``ramp`` optimizer steps given by the caller (an optimizer cannot know the run's length; the
authors' is the whole run, their C: set ``ramp`` to the run's step count for it); the flatmin default is no
ramp (σ from the first step). (4) No ``+ 1e-16`` on σ: σ_t = 0 skips the perturbation instead of adding
zero noise. (5) Their ``T`` (noise on every T-th step only; a class argument, default 1, not reachable from
``run_exp.py``) is not offered. (6) Tensors: the authors perturb peft ``LoraLinear`` layers' base weights
with adapter ``"default"`` only; here every adapter of the layer that the optimizer trains enters W', the
trainable non-LoRA weight matrices (``modules_to_save``) are perturbed too (the authors leave them at W),
and a ``fan_in_fan_out`` layer (GPT-2's ``Conv1D``, W stored as in × out) takes its filters along the stored
weight's output dimension (the authors' ``W + s·(B @ A)`` would fail on the shapes there, or take rows
of the wrong dimension when in = out). LoRA layers of another kind (Embedding,
Conv, DoRA and other variants) are refused in one line where the authors skip them silently. (7) n is a
filter's element count: a Linear's input dimension as theirs, a convolution's fan-in in the plain form.
(8) A non-finite loss or gradient skips the step on the device (their code has no guard); a skipped
step still counts in the ramp. (9) The LoRA form needs each layer's whole A and B for W's row norms,
so it is refused on sharded (FSDP) parameters; the plain form runs sharded (rows are whole on a shard).

Two-call form: ``opt.begin_step()`` (draws ε, W ← W + ε) before the forward, ``opt.restore_and_step()``
after the backward; ``opt.step(closure)`` calls the closure once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.checks import COUNT, NONNEGATIVE
from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register

SIGMA = Hyper("sigma", NONNEGATIVE, 0.05, "Flat-LoRA: noise scale σ: a filter's noise has std σ·‖W'_i‖/√n "
              "(0.05)", "flat_lora_sigma")
RAMP = Hyper("ramp", COUNT, 0, "Flat-LoRA: steps over which σ rises from 0 as ½(1 − cos πt/T) (0: σ from the "
             "first step)", "flat_lora_ramp")
HYPERS = (SIGMA, RAMP)
FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


class Target(NamedTuple):
    """A tensor the noise is added to, and what its filters' norms are taken of."""

    weight: Tensor  # W: a LoRA layer's frozen base weight, or a trained weight matrix itself
    layer: nn.Module | None  # the peft LoRA layer (None: W' = W)
    adapters: tuple[str, ...]  # the layer's adapters in W' = W + Σ s·B·A
    transposed: bool  # fan_in_fan_out: W stored as (in, out), a filter is a column


def ramp_factor(step: int, ramp: int) -> float:
    """σ_t/σ at step ``step`` (from 0): ½(1 − cos(π·t/T)) for t < T, then 1; 1 throughout when T = 0."""
    return 1.0 if ramp == 0 or step >= ramp else 0.5 * (1.0 - math.cos(math.pi * step / ramp))


def lora_factors(model: nn.Module) -> dict[Tensor, tuple[nn.Module, str]]:
    """Every LoRA factor of a peft model (A, B, embedding factors, DoRA magnitudes): its layer and adapter.
    Found by peft's attribute names, so peft need not be imported (a model without LoRA gives {})."""
    out: dict[Tensor, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if "lora_A" not in getattr(module, "adapter_layer_names", ()):
            continue
        for attr in FACTORS:
            for adapter, holder in getattr(module, attr, {}).items():
                tensors = [holder] if isinstance(holder, Tensor) else list(holder.parameters())
                for p in tensors:
                    out[p] = (module, adapter)
    return out


def _check_layer(module: nn.Module, adapter: str) -> None:
    """A LoRA layer Flat-LoRA can merge: a Linear-like base and a plain LoRA adapter (else one line)."""
    base = module.get_base_layer()
    variant = getattr(module, "lora_variant", {}).get(adapter) or getattr(module, "use_dora", {}).get(adapter)
    plain = adapter in module.lora_A and isinstance(module.lora_A[adapter], nn.Linear) \
        and getattr(base, "weight", None) is not None and base.weight.dim() == 2 and not variant
    if not plain:
        raise ValueError(f"Flat-LoRA perturbs the base weight of peft LoRA Linear layers; "
                         f"{type(module).__name__} (adapter {adapter!r}) is another kind (Embedding, Conv, "
                         "DoRA or another variant)")


class FlatLoRA(PerturbedOptimizer):
    """One pass at W + ε, ε filter-wise Gaussian with std σ_t·‖W'_i‖/√n on LoRA layers' base weights (given
    the model) or on every trainable weight matrix; W restored by copy, the base optimizer steps."""

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        sigma: float = 0.05,
        ramp: int = 0,
        *,
        model: nn.Module | None = None,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        RAMP.check(ramp)
        defaults = dict(sigma=sigma)
        self.validate_group(defaults)
        super().__init__(params, defaults, base_optimizer, base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self.ramp = ramp
        self.generator = generator
        self._steps = 0  # steps begun (the ramp's t)
        self._factors: dict[Tensor, tuple[nn.Module, str]] = {}  # LoRA factors of the bound model
        if model is not None:
            self.bind_model(model)

    def validate_group(self, group: dict[str, Any]) -> None:
        """σ ≥ 0 (the registry's rule)."""
        check_group(HYPERS, group)

    def bind_model(self, model: nn.Module) -> None:
        """Learn the model's peft LoRA layers: their base weights then carry the noise, scaled by the merged
        weights' filter norms (a model without LoRA layers changes nothing)."""
        factors = lora_factors(model)
        mine = {p for group in self.param_groups for p in group["params"]}
        for p, (module, adapter) in factors.items():
            if p in mine and p.requires_grad:
                _check_layer(module, adapter)
                if self.reduce_norms is not None:
                    raise ValueError("Flat-LoRA's LoRA form needs each layer's whole A and B for the merged "
                                     "weight's filter norms: it does not run on sharded (FSDP) parameters")
        self._factors = factors

    # -- the pass order ------------------------------------------------------------------------

    def ascent_passes(self) -> int:
        """None: ε needs no gradient; the step's one pass is at W + ε."""
        return 0

    @torch.no_grad()
    def _begin(self) -> None:
        """W ← W + ε in every group whose σ_t is not 0 (W saved first)."""
        factor = ramp_factor(self._steps, self.ramp)
        self._steps += 1
        for group in self.param_groups:
            sigma = group["sigma"] * factor
            targets = self.targets(group) if sigma > 0 else []
            if not targets:
                continue
            weights = [t.weight for t in targets]
            self.save_theta(weights)
            draws, _ = self.normal_draws(weights, self.generator)  # the same numbers for any number of ranks
            for t, w, z in zip(targets, self.views(weights), draws):
                w.add_(z.mul_(self.std(t, w, sigma)))

    # -- the pieces -----------------------------------------------------------------------------

    def targets(self, group: dict[str, Any]) -> list[Target]:
        """The tensors a group's noise goes to, in the group's order: a LoRA layer's base weight where the
        group holds its factors (once per layer), else each trainable non-factor tensor with ≥ 2 dims."""
        out, seen = [], set()
        trained = [p for p in group["params"] if p.requires_grad]
        held = set(trained)
        for p in trained:
            if p in self._factors:
                module, _ = self._factors[p]
                if id(module) not in seen:
                    seen.add(id(module))
                    out.append(self._lora_target(module, held))
            elif p.dim() >= 2:
                out.append(Target(p, None, (), False))
        return out

    @staticmethod
    def _lora_target(module: nn.Module, trained: set[Tensor]) -> Target:
        """A LoRA layer's base weight, with the adapters whose factors are ``trained``."""
        adapters = tuple(a for a in module.lora_A
                         if any(q in trained for q in (*module.lora_A[a].parameters(),
                                                       *module.lora_B[a].parameters())))
        return Target(module.get_base_layer().weight, module, adapters,
                      bool(getattr(module, "fan_in_fan_out", False)))

    @staticmethod
    def merged(t: Target, w: Tensor) -> Tensor:
        """W' = W + Σ s·(B @ A) (transposed to W's layout for fan_in_fan_out), in the wider dtype."""
        if not t.adapters:
            return w
        out = None
        for a in t.adapters:
            delta = t.layer.lora_B[a].weight @ t.layer.lora_A[a].weight
            delta = (delta.T if t.transposed else delta) * t.layer.scaling[a]
            out = w.to(torch.promote_types(w.dtype, delta.dtype)) + delta if out is None else out + delta
        return out

    def std(self, t: Target, w: Tensor, sigma: float) -> Tensor:
        """σ_t·‖W'_i‖/√n per filter i (n its size), shaped to broadcast over W's stored layout."""
        m = self.merged(t, w)
        if t.transposed:  # (in, out): a filter is a column
            norms = torch.linalg.vector_norm(m, dim=0, keepdim=True)
            n = m.shape[0]
        else:
            norms = torch.linalg.vector_norm(m.flatten(1), dim=1).reshape((-1,) + (1,) * (m.dim() - 1))
            n = m[0].numel()
        return (norms * (sigma / math.sqrt(n))).to(w.dtype)

    # -- state ----------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """The ramp's step count and the noise generator's state, when one was given."""
        state: dict[str, Any] = {"steps": self._steps}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the ramp and the noise stream."""
        self._steps = int(state.get("steps", 0))
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


register(RuleInfo(
    "flat_lora", FlatLoRA, "Flat-LoRA: one pass at W + ε, ε filter-wise Gaussian (std σ·‖W'_i‖/√n of the "
    "merged LoRA weight) on LoRA layers' base weights; plain models: every weight matrix",
    paper="Li et al., ICML 2025", code="nblt/Flat-LoRA", hypers=HYPERS, passes="1",
    kept="— (θ's copy is of the perturbed weights: with LoRA, the adapted layers' base weights)",
    needs="the model for LoRA layers (`model=`, `create_optimizer`, `PerturbedTrainer`); without: every "
    "trainable ≥ 2-d tensor", aliases={"flat-lora": {}}, order=22, neutral={"sigma": 0.0},
    examples=({"sigma": 0.05}, {"sigma": 0.1, "ramp": 3})))

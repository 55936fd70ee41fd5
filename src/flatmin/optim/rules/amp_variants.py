"""Efficient AMP: approximations of Algorithm 1 that spend fewer gradient passes per step.

Exact AMP (N = 1) costs two forward/backward passes per step. Each variant keeps AMP's ascent
Δ = Π_ε(ζ·g) (the same kernel, the same ball) and only changes where g comes from:

- ``"reuse"`` (`ReuseAMP`, in the spirit of LookSAM, Liu et al. 2022): Δ is recomputed every k
  steps (``reuse_every``) and the *same* Δ (direction and AMP's clipped length) is added to θ on
  the k−1 steps between. Approximates Δ_t by Δ_{t₀} from the last refresh t₀: exact at refreshes,
  up to k−1 steps stale in between. Passes per step: 1 + N/k. Memory: θ and Δ (2× parameters).
- ``"subbatch"`` (`SubBatchAMP`, in the spirit of ESAM, Du et al. 2022): the ascent gradient is
  taken on the first ⌈f·B⌉ examples of the batch (``ascent_fraction``). Approximates ∇J_B(θ) by
  ∇J_{B_f}(θ): same expectation, more noise; the ascent pass costs f of a pass. k and f compose
  (``ReuseAMP(..., ascent_fraction=f)``).
- ``"onepass"`` (`OnePassAMP`): Δ_t = Π_ε(ζ·g_{t−1}), g_{t−1} the gradient that drove the previous
  update (batch t−1, at θ_{t−1}+Δ_{t−1}); no extra pass. Approximates the current batch's gradient
  at θ_t by the previous batch's at the previous perturbed point, so Δ ascends the *expected*
  loss, not batch t's own (AMP's per-batch worst case is lost). For plain SGD
  g_{t−1} = (θ_{t−1} − θ_t)/η: the ascent climbs back up the last descent step (a "look-back").
  The first step is unperturbed; a skipped step changes nothing (the next one is perturbed as it would
  have been). Memory: 2× parameters (a scratch Δ while the step begins).

Each is only a perturbation rule: the pass order is `flatmin.optim.driver`'s, as for exact AMP.

`build_amp` picks one by name (the trainer's and CLI's entry point).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flatmin.checks import SHARE, Choice, Number
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules.amp import AMP, HYPERS
from flatmin.optim.theta import by_index, from_index, keep_unless_skipped_

# AMP's cheaper variants are AMP with another source of Δ: the trainer picks one by `variant`.
VARIANT = Hyper("variant", Choice(("exact", "reuse", "subbatch", "onepass")), "exact",
                "AMP: exact, reuse, subbatch or onepass (the cheaper variants)", "amp_variant")
REUSE_EVERY = Hyper("reuse_every", Number(int, 1), 5, "AMP reuse variant: new perturbation every k steps",
                    "reuse_every", 1, used_with=("variant", ("reuse",)))
ASCENT_FRACTION = Hyper("ascent_fraction", SHARE, None,
                        "AMP subbatch/reuse variants: share of the batch for ascent (subbatch 0.5, reuse 1)",
                        "ascent_fraction", 1.0, used_with=("variant", ("subbatch", "reuse")))


# --- kernels and helpers -------------------------------------------------------------------------


def check_reuse_every(k: Any) -> None:
    """k is a whole number of steps, at least 1 (k = 1 is exact AMP)."""
    REUSE_EVERY.check(k)


def check_fraction(f: Any) -> None:
    """f ∈ (0, 1]: some of the batch, at most all of it (f = 1 is exact AMP)."""
    ASCENT_FRACTION.check(f)


# --- the variants --------------------------------------------------------------------------------


class _SubBatch:
    """The sub-batch ascent rule: ascent passes use the first ⌈f·B⌉ examples of the batch."""

    ascent_fraction: float = 1.0

    def batch_fraction(self, ascent: bool) -> float:
        """f for the ascent passes, the whole batch for the final one."""
        return self.ascent_fraction if ascent else 1.0


class SubBatchAMP(_SubBatch, AMP):
    """AMP whose ascent gradient comes from the first ⌈f·B⌉ examples of the batch.

    The step driver slices the batch itself. ``step(closure)`` with f < 1 calls
    ``closure(ascent=True)`` for each ascent pass and ``closure(ascent=False)`` for the final
    one, so the closure slices: ``x[:opt.ascent_size(len(x))] if ascent else x``; ``step``
    returns the first (sub-batch) result.
    """

    def __init__(self, params: Iterable, *args: Any, ascent_fraction: float = 0.5, **kwargs: Any) -> None:
        check_fraction(ascent_fraction)
        super().__init__(params, *args, **kwargs)
        self.ascent_fraction = float(ascent_fraction)


class ReuseAMP(_SubBatch, AMP):
    """AMP that refreshes Δ every ``reuse_every`` steps and adds the kept Δ to θ in between.

    ``begin_step()`` decides whether this step refreshes (``ascent_passes()`` = N) or reuses
    (``ascent_passes()`` = 0, θ+Δ already set); `perturb` begins a step itself in the two-call
    form. A refresh whose step is skipped (non-finite) leaves the previous Δ bit for bit. The
    step counter and Δ go into ``state_dict()["perturbation"]``. Composes with ``ascent_fraction``.
    """

    def __init__(self, params: Iterable, *args: Any, reuse_every: int = 5,
                 ascent_fraction: float = 1.0, **kwargs: Any) -> None:
        check_reuse_every(reuse_every)
        check_fraction(ascent_fraction)
        super().__init__(params, *args, **kwargs)
        self.reuse_every, self.ascent_fraction = reuse_every, float(ascent_fraction)
        self._steps = 0  # steps begun
        self._refresh = True  # whether the current step recomputes Δ

    @torch.no_grad()
    def _begin(self) -> None:
        """Refresh every k-th step (or when no Δ is kept); otherwise θ ← θ + kept Δ now."""
        self._refresh = self._steps % self.reuse_every == 0 or not self._delta
        self._steps += 1
        if self._refresh:
            return
        for group in self.param_groups:
            params = [p for p in group["params"] if p in self._delta]
            if params:
                self.save_theta(params)
                K.add_(self.views(params), self.kept(self._delta, params), self.foreach)

    def ascent_passes(self) -> int:
        """N passes on a refresh step, none on a reuse step."""
        return self.inner_iter if self._refresh else 0

    def delta_storage(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """Δ is always built in kept buffers, even for N = 1: the next k−1 steps reuse it."""
        return self._delta_buffers(params)

    def carried_state(self) -> list[Tensor]:
        """A refresh rewrites the kept Δ: a skipped refresh leaves the previous one (zeros if none)."""
        return list(self._delta.values()) if self._refresh else []

    def extra_state(self) -> dict[str, Any]:
        """The step counter (where in the k-cycle we are) and the kept Δ."""
        return {"steps": self._steps, "delta": by_index(self.param_groups, self._delta)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the k-cycle with the saved Δ."""
        self._steps = int(state.get("steps", 0))
        self._delta = from_index(self.param_groups, state.get("delta", {}))


class OnePassAMP(AMP):
    """AMP with Δ from the gradient of the previous update: one forward/backward per step.

    ``begin_step()`` perturbs (from the kept gradient, built into Δ in a scratch copy: the kept
    gradient is only replaced after the update); ``ascent_passes()`` is 0. The gradient is kept after
    the base update, once unscaled; a skipped step keeps the previous one bit for bit (zeros if none:
    the next step is then unperturbed), a step the caller updated itself keeps its NaN/±inf as 0.
    """

    def __init__(self, params: Iterable, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._grads: dict[Tensor, Tensor] = {}  # the last update's gradient, then Δ built in it
        self._fresh = False  # whether _grads holds a gradient not yet used

    def validate_group(self, group: dict[str, Any]) -> None:
        """AMP's checks; N is 1 (or 0: that group unperturbed) — there is no inner loop to repeat."""
        super().validate_group(group)
        if group["inner_iter"] not in (0, 1):
            raise ValueError(f"inner_iter must be 0 or 1 for one-pass AMP, got {group['inner_iter']!r}")

    @torch.no_grad()
    def _begin(self) -> None:
        """θ ← θ + Π_ε(ζ·g_prev), Δ built in the kept gradient's storage."""
        if not self._fresh:
            return
        self._fresh = False
        for group in self.param_groups:
            params = [p for p in group["params"] if p in self._grads] if group["inner_iter"] else []
            if params:
                self.save_theta(params)
                scratch = K.clone(self.kept(self._grads, params), self.foreach)
                K.amp_ascent(self.views(params), scratch, self.thetas_of(params), None,
                             step_size=group["inner_lr"], epsilon=group["epsilon"], ball=group["ball"],
                             first=True, reduce=self.reduce_norms, foreach=self.foreach)

    def ascent_passes(self) -> int:
        """No ascent pass: the direction is the previous step's gradient."""
        return 0

    @torch.no_grad()
    def _after_step(self, found: Tensor | None) -> None:
        """Keep this update's gradient for the next step (the previous one stays if this step was skipped)."""
        for s in self.slots():
            if s.group["inner_iter"]:
                keep_unless_skipped_(self.kept(self._grads, s.params, zero=True), s.grads, found)
        self._fresh = True

    def held_buffers(self) -> list[Tensor]:
        """θ copies plus the kept gradient."""
        return super().held_buffers() + list(self._grads.values())

    def extra_state(self) -> dict[str, Any]:
        """The kept gradient (only while it is unused: afterwards it holds Δ)."""
        return {"fresh": self._fresh, "grad": by_index(self.param_groups, self._grads) if self._fresh else {}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Perturb the next step with the saved gradient."""
        self._grads = from_index(self.param_groups, state.get("grad", {}))
        self._fresh = bool(state.get("fresh", False)) and bool(self._grads)


VARIANTS: dict[str, type[AMP]] = {
    "exact": AMP, "reuse": ReuseAMP, "subbatch": SubBatchAMP, "onepass": OnePassAMP,
}
assert tuple(VARIANTS) == VARIANT.rule.values, "the registry's AMP variants and VARIANTS must agree"


def build_amp(params: Iterable, variant: str = "exact", *, reuse_every: int | None = None,
              ascent_fraction: float | None = None, **amp_kwargs: Any) -> AMP:
    """AMP or an efficient variant by name, so a config or the CLI picks one with plain values.

    ``reuse_every`` belongs to "reuse", ``ascent_fraction`` to "subbatch" and "reuse"; None or
    the neutral values (1, 1.0) are accepted with every variant, anything else is a ValueError.
    ``amp_kwargs`` are `AMP`'s (epsilon, inner_lr, inner_iter, base_optimizer, ball, lr, ...).
    """
    VARIANT.check(variant)
    if reuse_every is not None:
        check_reuse_every(reuse_every)
        if reuse_every != 1 and variant != "reuse":
            raise ValueError(f"reuse_every={reuse_every!r} applies only to variant='reuse', not {variant!r}")
        if variant == "reuse":
            amp_kwargs["reuse_every"] = reuse_every
    if ascent_fraction is not None:
        check_fraction(ascent_fraction)
        if ascent_fraction != 1 and variant not in ("subbatch", "reuse"):
            raise ValueError(f"ascent_fraction={ascent_fraction!r} applies only to variants "
                             f"'subbatch' and 'reuse', not {variant!r}")
        if variant in ("subbatch", "reuse"):
            amp_kwargs["ascent_fraction"] = ascent_fraction
    return VARIANTS[variant](params, **amp_kwargs)


def _build(params: Iterable, base: Any, **kwargs: Any) -> AMP:
    """AMP or one of its variants, by the ``variant`` keyword."""
    return build_amp(params, kwargs.pop("variant", "exact"), base_optimizer=base, **kwargs)


register(RuleInfo(
    "amp", AMP, "adversarial model perturbation: N clipped ascent steps inside an ε-ball (Algorithm 1)",
    paper="Zheng, Zhang & Mao, CVPR 2021", code="hiyouga/AMP-Regularizer",
    hypers=(*HYPERS, VARIANT, REUSE_EVERY, ASCENT_FRACTION), passes="N + 1 (reuse 1 + N/k; onepass 1)",
    kept="Δ (N > 1, reuse); g (onepass)", make=_build,
    aliases={"amp-reuse": {"variant": "reuse"}, "amp-subbatch": {"variant": "subbatch"},
             "amp-onepass": {"variant": "onepass"}},
    order=10, neutral={"epsilon": 0.0},
    examples=({"epsilon": 0.05}, {"epsilon": 0.05, "ball": "per_tensor"}, {"epsilon": 0.05, "inner_iter": 2},
              {"epsilon": 0.05, "variant": "reuse", "reuse_every": 2},
              {"epsilon": 0.05, "variant": "subbatch", "ascent_fraction": 0.5},
              {"epsilon": 0.05, "variant": "onepass"})))

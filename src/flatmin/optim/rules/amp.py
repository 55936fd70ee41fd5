"""AMP — Adversarial Model Perturbation (Zheng, Zhang & Mao, CVPR 2021), Algorithm 1.

    min_θ max_{‖Δ‖≤ε} L_ERM(θ + Δ)

For each batch:  Δ ← 0;  N times:  Δ ← Δ + ζ·∇J(θ+Δ),  Δ ← ε·Δ/‖Δ‖ if ‖Δ‖ > ε;
then the gradient at θ+Δ drives the base optimizer *from θ* (weight decay, momentum, Nesterov
are the base optimizer's business, applied at θ).

The ball. ``ball="global"``: ‖Δ‖ is the norm of the whole perturbation of a parameter group,
as the paper writes it. ``ball="per_tensor"``: each parameter tensor is clipped to ε on its own,
which is what the authors' released code does and what produced the paper's tables (so the
paper presets use it). For a model with T tensors the per-tensor ball allows a total
perturbation of up to ε·√T.

Memory. θ is kept in one parameter-sized buffer (reused across steps) so that restoring it is a
copy, bit for bit. With N = 1 that is the only extra buffer: Δ is built in place in the
gradients (which the next backward pass overwrites anyway). N > 1 adds one buffer for Δ.

Cheaper approximations (perturbation reuse, sub-batch ascent, one pass) live in
`flatmin.optim.rules.amp_variants`, built by name with `flatmin.optim.build_amp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, Choice, Number
from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer, check_nonnegative
from flatmin.optim.registry import Hyper, check_group

BALL = Choice(("global", "per_tensor"))
HYPERS = (
    Hyper("epsilon", NONNEGATIVE, 0.5, "AMP: radius ε of the perturbation ball", "epsilon", None),
    Hyper("inner_lr", NONNEGATIVE, 1.0, "AMP: inner learning rate ζ", "inner_lr", None),
    Hyper("inner_iter", Number(int, 0), 1, "AMP: inner iterations N (ascent passes per step)", "inner_iter"),
    Hyper("ball", BALL, "global", "AMP/RMP: global (the paper) or per_tensor (the authors' code)",
          "ball", None),
)


class AMP(PerturbedOptimizer):
    """Adversarial model perturbation around any base optimizer.

    Keyword-compatible with the authors' optimizer: ``AMP(params, lr, epsilon, inner_lr=1,
    inner_iter=1, base_optimizer=SGD, **base_kwargs)``.

    ``step(closure)``: the closure zeroes grads, runs forward and backward, and returns the loss
    or ``(outputs, loss)``; it is called N+1 times and ``step`` returns what the first call
    returned (detached). A non-finite loss or gradient skips the base step on the device (θ and
    the base optimizer's state untouched, no host sync) and is counted; ``opt.poll()`` then raises
    :class:`flatmin.errors.NonFiniteLossError` (``nonfinite="skip"`` only counts, ``"off"`` checks
    nothing).

    Two-call form (a gradient scaler, manual optimisation)::

        loss(θ).backward();      opt.perturb()            # N times, each after a backward
        loss(θ+Δ).backward();    opt.restore_and_step()   # or restore_and_step(scaler=scaler)

    ``perturb()`` consumes the gradients (they become Δ): zero them before the next backward.
    Misuse (a perturb() too many, restore_and_step() with no perturb()) raises a RuntimeError.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        epsilon: float = 0.5,
        inner_lr: float = 1.0,
        inner_iter: int = 1,
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        *,
        ball: str = "global",
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(epsilon=epsilon, inner_lr=inner_lr, inner_iter=inner_iter, ball=ball)
        self.validate_group(defaults)
        if lr is not None:
            check_nonnegative("lr", lr)
            base_kwargs["lr"] = lr
        super().__init__(params, defaults, base_optimizer, base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self._delta: dict[Tensor, Tensor] = {}  # Δ buffers, only for groups with N > 1

    def validate_group(self, group: dict[str, Any]) -> None:
        """ε, ζ ≥ 0 and finite; N a non-negative integer; a known ball (the registry's rules)."""
        check_group(HYPERS, group)

    @property
    def inner_iter(self) -> int:
        """The number of ascent passes a step makes (the largest N over the groups)."""
        return max(group["inner_iter"] for group in self.param_groups)

    def ascent_passes(self) -> int:
        """N gradient passes feed the ascent (the closure runs N+1 times)."""
        return self.inner_iter

    def _ascend(self, grad_scale: Tensor | float | None) -> None:
        """One ascent iteration from the current gradients; params become θ + Δ.

        ``grad_scale``: the loss scale of a gradient scaler, divided out of the gradients.
        """
        first = not self.perturbed
        for s in self.slots():
            group = s.group
            if self._ascents >= group["inner_iter"]:
                continue
            if first:
                self.save_theta(s.params)
            step_size = group["inner_lr"] if grad_scale is None else group["inner_lr"] / grad_scale
            K.amp_ascent(s.weights, s.grads, self.thetas_of(s.params), self.delta_storage(group, s.params),
                         step_size=step_size, epsilon=group["epsilon"], ball=group["ball"], first=first,
                         reduce=self.reduce_norms, foreach=self.foreach)

    def delta_storage(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor] | None:
        """Where Δ is built: in the gradients when N = 1 (no memory), else in kept buffers."""
        return None if group["inner_iter"] == 1 else self._delta_buffers(params)

    def held_buffers(self) -> list[Tensor]:
        """θ copies plus the Δ buffers (only groups with N > 1 have any)."""
        return super().held_buffers() + list(self._delta.values())

    def _delta_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Persistent Δ storage for N > 1 (zeroed at the first iteration of each step)."""
        return self.kept(self._delta, params, zero=True)


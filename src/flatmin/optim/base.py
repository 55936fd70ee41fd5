"""What AMP, SAM and RMP share: wrap a base optimizer, keep θ, restore it bit for bit, delegate.

A perturbation method evaluates the gradient at θ+Δ but updates θ. The wrapper owns the
parameter groups *jointly* with the base optimizer (the same dicts), so LR schedulers,
`zero_grad` and per-group hyperparameters act on both, and `state_dict()` is the base
optimizer's (momentum etc.) plus the perturbation hyperparameters stored in the groups
(and, under ``"perturbation"``, whatever a method keeps between steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.errors import NonFiniteLossError
from flatmin.optim import _kernels as K

BALLS = ("global", "per_tensor")


def check_nonnegative(name: str, value: Any) -> None:
    """Reject negative or non-finite hyperparameters with a message naming the argument."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_ball(ball: Any) -> None:
    """Only the two documented projections exist."""
    if ball not in BALLS:
        raise ValueError(f"ball must be one of {BALLS}, got {ball!r}")


def loss_of(result: Any) -> Tensor | float:
    """The closure returns a loss or (outputs, loss): the loss is the last element."""
    return result[-1] if isinstance(result, (tuple, list)) else result


def detached(result: Any) -> Any:
    """What `step` returns: the first closure result, cut from the graph."""
    if isinstance(result, (tuple, list)):
        return type(result)(x.detach() if isinstance(x, Tensor) else x for x in result)
    return result.detach() if isinstance(result, Tensor) else result


class PerturbedOptimizer(Optimizer):
    """Base of the perturbation optimizers; subclasses define `perturb` and `step`."""

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        base_optimizer: Callable[..., Optimizer],
        base_kwargs: dict[str, Any],
        *,
        foreach: bool | None,
        check_finite: bool,
    ) -> None:
        super().__init__(params, defaults)
        if not callable(base_optimizer):
            raise ValueError(f"base_optimizer must be an optimizer class, got {base_optimizer!r}")
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.foreach = True if foreach is None else bool(foreach)
        self.check_finite = bool(check_finite)
        self.skipped_steps = 0  # steps whose base update was skipped for a non-finite loss
        self._theta: dict[Tensor, Tensor] = {}  # θ while perturbed; buffers reused across steps
        self._saved: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, θ copies) per group

    # -- parameter groups ----------------------------------------------------------------------

    def validate_group(self, group: dict[str, Any]) -> None:
        """Subclasses check their per-group hyperparameters here."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapper and the base optimizer at once (they share the dicts)."""
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            self.validate_group(self.param_groups[-1])
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.validate_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    @staticmethod
    def params_with_grad(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters that received a gradient this pass (frozen ones are left alone)."""
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    # -- θ kept exactly --------------------------------------------------------------------------

    @property
    def perturbed(self) -> bool:
        """True between a perturbation and the matching `restore()`."""
        return bool(self._saved)

    def save_theta(self, params: list[Tensor]) -> None:
        """Copy θ into buffers kept across steps, so that restore is a copy, not θ+Δ−Δ."""
        thetas = []
        for p in params:
            buf = self._theta.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = self._theta[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            thetas.append(buf)
        K.copy_(thetas, params, self.foreach)
        self._saved.append((params, thetas))

    def thetas_of(self, params: list[Tensor]) -> list[Tensor]:
        """The saved θ buffers of already-saved parameters."""
        return [self._theta[p] for p in params]

    @torch.no_grad()
    def restore(self) -> None:
        """Put θ back bit for bit; harmless when nothing is perturbed."""
        for params, thetas in self._saved:
            K.copy_(params, thetas, self.foreach)
        self._saved.clear()

    def held_buffers(self) -> list[Tensor]:
        """Every buffer kept across steps (θ copies here; subclasses add Δ or stored gradients)."""
        return list(self._theta.values())

    # -- the update ----------------------------------------------------------------------------

    def call_closure(self, closure: Callable[..., Any], ascent: bool = False) -> Any:
        """Run a closure with autograd on (step runs under no_grad); with a sub-batch ascent
        (``ascent_fraction < 1``) the closure is told which pass it serves: ``closure(ascent=...)``."""
        with torch.enable_grad():
            return closure(ascent=ascent) if self.ascent_fraction < 1 else closure()

    def base_step(self, losses: list[Tensor | float]) -> None:
        """θ is back; skip the base update if a loss was non-finite, else take it."""
        if self.check_finite and losses:
            stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().reshape(())
                                   .to(self._device()) for v in losses])
            if not bool(torch.isfinite(stacked).all()):  # the one host sync of a checked step
                self.skipped_steps += 1
                raise NonFiniteLossError(
                    f"non-finite loss in {type(self).__name__}.step "
                    f"(losses: {[float(v) for v in stacked]}); parameters restored, step skipped"
                )
        self.base_optimizer.step()

    def _device(self) -> torch.device:
        """The device of the first parameter (where loss checks are gathered)."""
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def restore_and_step(self, step: Callable[[], Any] | None = None) -> None:
        """Last call of a step: θ back, then the base update (``step``: e.g. a scaler's step)."""
        self.restore()
        (step or self.base_optimizer.step)()

    # -- the protocol one training loop drives every method with -----------------------------
    #   begin_step(); ascent_passes() × (forward/backward on an ascent batch; perturb(scale));
    #   forward/backward on the batch; restore_and_step(step)

    ascent_fraction: float = 1.0  # share of the batch the ascent passes use (1: all of it)

    def ascent_size(self, batch_size: int) -> int:
        """⌈ascent_fraction·B⌉ examples, at least one (the slack absorbs 0.3·10 = 3.0000000000000004)."""
        return min(batch_size, max(1, math.ceil(self.ascent_fraction * batch_size - 1e-9)))

    def begin_step(self) -> None:
        """Perturb before any gradient is taken (RMP, reuse-style variants); default: nothing."""

    def ascent_passes(self) -> int:
        """How many gradient passes feed `perturb` before the final pass of this step."""
        raise NotImplementedError

    def perturb(self, grad_scale: Tensor | float | None = None) -> None:
        """One ascent update from the current gradients (``grad_scale``: a loss scale to divide out)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One batch: the closure (zero grads, forward, backward, return the loss or (outputs, loss))
        runs once per ascent pass and once at the final point; returns the first result, detached."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that zeroes grads, runs forward and "
                "backward and returns the loss; without one, use the two-call form (see the class docs)"
            )
        results = []
        try:
            self.begin_step()
            for _ in range(self.ascent_passes()):
                results.append(self.call_closure(closure, ascent=True))
                self.perturb()
                self.zero_grad(set_to_none=True)
            results.append(self.call_closure(closure))
        finally:
            self.restore()
        self.base_step([loss_of(r) for r in results])
        return detached(results[0])

    # -- state -----------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """What a method carries from step to step besides the base optimizer (a stored Δ, a counter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Take back what `extra_state` saved (called after the groups are loaded)."""

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (the groups carry the perturbation hyperparameters too),
        plus ``"perturbation"``: the method's `extra_state`, when it has one."""
        if self.perturbed:
            raise RuntimeError("state_dict() while perturbed would save θ+Δ; call restore() first")
        state, extra = self.base_optimizer.state_dict(), self.extra_state()
        return {**state, "perturbation": extra} if extra else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer and share its (new) group dicts again."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("perturbation", {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self.validate_group(group)
        self.load_extra_state(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base_optimizer!r})"

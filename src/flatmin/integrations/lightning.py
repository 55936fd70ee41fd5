"""AMP, SAM and RMP in a LightningModule with automatic optimisation, at any precision.

Lightning hands the optimizer one closure (training_step, zero_grad, backward) per batch, and
with ``precision="16-mixed"`` it runs that closure itself, then calls
``scaler.step(optimizer)`` with no closure — a second pass is then impossible from inside
``optimizer.step``, which is where SAM integrations usually break. Here the step is driven by
`flatmin.optim.driver` like everywhere else, from `PerturbedModule.optimizer_step`; the driver
hands the final pass to Lightning (its ``finish`` hook):

    ascent passes:  closure() at θ (and θ+Δ for N > 1), each followed by ``perturb(loss scale)``
    final pass:     Lightning's own ``optimizer.step(closure)`` at θ+Δ — the precision plugin runs
                    the closure, unscales, clips, skips on inf/NaN and updates the scaler as for
                    any optimizer; `PerturbedStep.step` puts θ back (bit for bit) and updates.

θ is restored even when the scaler skips the step (the overflow then leaves θ untouched). The
final pass leaves BatchNorm running statistics alone (they belong to θ, see `flatmin.optim.bn`).
Usage::

    class Net(PerturbedModule, L.LightningModule):
        def configure_optimizers(self):
            return PerturbedStep(flatmin.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1))

``training_step`` runs once per gradient pass (N+1 times for AMP, twice for SAM);
``self.perturbation_pass`` says which one ("ascent" or "final") for logging only once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from flatmin.optim import Pass, PerturbedOptimizer, drive


class PerturbedStep(Optimizer):
    """The last pass of a perturbed step, shaped as the optimizer Lightning's precision plugins call.

    Shares parameter groups and state with the wrapped AMP/SAM/RMP (schedulers and checkpoints
    see the base optimizer, as with the unwrapped one).
    """

    def __init__(self, perturbed: PerturbedOptimizer) -> None:
        if not isinstance(perturbed, PerturbedOptimizer):
            raise ValueError(f"perturbed must be a flatmin AMP/SAM/RMP optimizer, "
                             f"got {type(perturbed).__name__}")
        if perturbed.batch_fraction(True) < 1:
            raise ValueError("sub-batch ascent (ascent_fraction < 1) needs a closure that takes ascent=...; "
                             "Lightning's closure does not")
        self.perturbed = perturbed
        super().__init__(perturbed.param_groups, perturbed.defaults)
        self.param_groups = perturbed.param_groups
        self.state = perturbed.base_optimizer.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Final pass (the closure, unless a precision plugin already ran it), θ back, base update."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        losses = [result] if isinstance(result, torch.Tensor) else []
        self.perturbed.restore_and_step(losses=losses)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's (base optimizer state plus the perturbation's)."""
        return self.perturbed.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer and share its (new) groups again."""
        self.perturbed.load_state_dict(state_dict)
        self.param_groups = self.perturbed.param_groups
        self.state = self.perturbed.base_optimizer.state

    def __repr__(self) -> str:
        return f"PerturbedStep({self.perturbed!r})"


class PerturbedModule:
    """LightningModule mixin: runs a `PerturbedStep` optimizer's ascent passes before Lightning's step."""

    perturbation_pass: str = "final"

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """Ascent passes through Lightning's closure, then Lightning's (precision-aware) final step."""
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> the torch optimizer
        if not isinstance(raw, PerturbedStep) or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        if self.trainer.accumulate_grad_batches != 1:  # type: ignore[attr-defined]
            raise ValueError("AMP/SAM under Lightning need accumulate_grad_batches=1 "
                             "(the ascent is per batch)")
        opt = raw.perturbed
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # type: ignore[attr-defined]

        def ascent(p: Pass) -> Any:
            self.perturbation_pass = "ascent"
            return optimizer_closure()

        def final() -> Any:
            self.perturbation_pass = "final"
            return optimizer.step(closure=optimizer_closure)  # Lightning's precision-aware step

        drive(opt, ascent, model=self, scaler=scaler, finish=final)  # type: ignore[arg-type]
        opt.restore()  # a step skipped by Lightning's scaler (inf/NaN) leaves θ+Δ behind: put θ back
        return None

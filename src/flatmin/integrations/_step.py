"""The optimizer a framework sees: a view of a flatmin rule that shares its groups and state."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from flatmin.optim import PerturbedOptimizer


class OptimizerView(Optimizer):
    """Shares parameter groups and state with the wrapped AMP/SAM/RMP (schedulers and checkpoints
    see the rule's base optimizer, as with the unwrapped one); subclasses define `step`."""

    def __init__(self, perturbed: PerturbedOptimizer) -> None:
        if not isinstance(perturbed, PerturbedOptimizer):
            raise ValueError(f"perturbed must be a flatmin AMP/SAM/RMP optimizer (a PerturbedOptimizer), "
                             f"got {type(perturbed).__name__}")
        self.perturbed = perturbed
        super().__init__(perturbed.param_groups, perturbed.defaults)
        self.param_groups = perturbed.param_groups
        self.state = perturbed.base_optimizer.state

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's (base optimizer state plus the perturbation's)."""
        return self.perturbed.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer and share its (new) groups again."""
        self.perturbed.load_state_dict(state_dict)
        self.param_groups = self.perturbed.param_groups
        self.state = self.perturbed.base_optimizer.state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.perturbed!r})"

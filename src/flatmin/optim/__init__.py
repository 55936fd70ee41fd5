"""Perturbation rules — AMP (the paper), SAM/ASAM and RMP (its baselines), efficient AMP variants,
plain ERM, and SAM's family — each declared once in `flatmin.optim.registry` by its own file in
`flatmin.optim.rules`, all driven by one step protocol (`flatmin.optim.driver`)."""

from flatmin.optim import registry
from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.bn import frozen_running_stats
from flatmin.optim.driver import Pass, accumulate, drive
from flatmin.optim.factory import create_optimizer
from flatmin.optim.rules.amp_variants import VARIANTS, OnePassAMP, ReuseAMP, SubBatchAMP, build_amp

RULES = registry.public_classes()  # every registered rule's class, by its name (AMP, SAM, GSAM, ...)
globals().update(RULES)

__all__ = [*RULES, "PerturbedOptimizer", "frozen_running_stats", "ReuseAMP", "SubBatchAMP", "OnePassAMP",
           "VARIANTS", "build_amp", "drive", "accumulate", "Pass", "create_optimizer", "registry"]

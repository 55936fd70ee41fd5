"""Perturbation rules — AMP (the paper), SAM/ASAM and RMP (its baselines), efficient AMP variants,
plain ERM, and SAM's family (`flatmin.optim.rules`) — all driven by one step protocol
(`flatmin.optim.driver`)."""

from flatmin.optim.base import PerturbedOptimizer
from flatmin.optim.bn import frozen_running_stats
from flatmin.optim.driver import Pass, accumulate, drive
from flatmin.optim.factory import create_optimizer
from flatmin.optim.rules import BSAM, ESAM, GSAM, MSAM, WSAM, FriendlySAM, LookSAM
from flatmin.optim.rules.amp import AMP
from flatmin.optim.rules.amp_variants import VARIANTS, OnePassAMP, ReuseAMP, SubBatchAMP, build_amp
from flatmin.optim.rules.erm import ERM
from flatmin.optim.rules.rmp import RMP
from flatmin.optim.rules.sam import SAM

__all__ = ["AMP", "SAM", "RMP", "ERM", "PerturbedOptimizer", "frozen_running_stats",
           "ReuseAMP", "SubBatchAMP", "OnePassAMP", "VARIANTS", "build_amp", "drive", "accumulate", "Pass",
           "create_optimizer", "GSAM", "FriendlySAM", "LookSAM", "WSAM", "BSAM", "ESAM", "MSAM"]

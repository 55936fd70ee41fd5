"""Evidence of flatness: landscapes, sharpness, the theorems, and the paper's figures as commands.

The library functions need only torch; the commands' figures need matplotlib (`flatmin[plot]`).
"""

from flatmin.analysis._common import DatasetLoss
from flatmin.analysis.landscape import Landscape, loss_curve_1d, loss_surface_2d, random_direction
from flatmin.analysis.sharpness import (
    Estimate,
    dataset_loss,
    epsilon_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    hvp,
)
from flatmin.analysis.theory import (
    amp_loss,
    gamma_amp_star,
    inverted_gaussian,
    minimize_with_amp,
    operational_region,
)

__all__ = [
    "DatasetLoss", "Estimate", "Landscape", "amp_loss", "dataset_loss", "epsilon_sharpness",
    "gamma_amp_star", "hessian_top_eigenvalue", "hessian_trace", "hvp", "inverted_gaussian",
    "loss_curve_1d", "loss_surface_2d", "minimize_with_amp", "operational_region", "random_direction",
]

"""flatmin: training neural networks toward flat minima.

AMP (Zheng et al., CVPR 2021), SAM/ASAM (Foret et al. 2021; Kwon et al. 2021) and the random
perturbation baseline RMP as drop-in PyTorch optimizers, with SAM's family (GSAM, FriendlySAM,
LookSAM, WSAM, BSAM, ESAM, MSAM) on the same core, plus the AMP paper's data, models,
training protocol, experiments and flatness analyses.
"""

from flatmin._version import __version__
from flatmin.optim import AMP, BSAM, ESAM, GSAM, MSAM, RMP, SAM, WSAM, FriendlySAM, LookSAM, create_optimizer

__all__ = ["AMP", "SAM", "RMP", "GSAM", "FriendlySAM", "LookSAM", "WSAM", "BSAM", "ESAM", "MSAM",
           "create_optimizer", "__version__"]

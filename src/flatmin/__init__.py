"""flatmin: training neural networks toward flat minima.

AMP (Zheng et al., CVPR 2021), SAM/ASAM (Foret et al. 2021; Kwon et al. 2021) and the random
perturbation baseline RMP as drop-in PyTorch optimizers, with SAM's family (GSAM, FriendlySAM,
LookSAM, WSAM, BSAM, ESAM, MSAM) on the same core, plus the AMP paper's data, models,
training protocol, experiments and flatness analyses.
"""

from flatmin.optim import AMP, BSAM, ESAM, GSAM, MSAM, RMP, SAM, WSAM, FriendlySAM, LookSAM

__version__ = "0.1.0"
__all__ = ["AMP", "SAM", "RMP", "GSAM", "FriendlySAM", "LookSAM", "WSAM", "BSAM", "ESAM", "MSAM",
           "__version__"]

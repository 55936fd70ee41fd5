"""flatmin: training neural networks toward flat minima.

AMP (Zheng et al., CVPR 2021), SAM/ASAM (Foret et al. 2021; Kwon et al. 2021) and the random
perturbation baseline RMP as drop-in PyTorch optimizers, with SAM's family (GSAM, FriendlySAM,
LookSAM, WSAM, BSAM, ESAM, MSAM) on the same core, plus the AMP paper's data, models,
training protocol, experiments and flatness analyses. The rules exported here are the ones
`flatmin.optim.registry` lists: a rule registered in its own file is public without an edit here.
"""

from flatmin._version import __version__
from flatmin.optim import RULES, create_optimizer

globals().update(RULES)

__all__ = [*RULES, "create_optimizer", "__version__"]

"""The sharpness-aware family on the one perturbation core: GSAM, FriendlySAM, LookSAM, WSAM, bSAM,
ESAM (stochastic weight perturbation) and MSAM, each a rule driven by `flatmin.optim.driver`.

Argument names and defaults follow the most-installed collection where it has the method, so a
user switches by changing the import. Each file's docstring says where it follows the authors'
code and where (and why) it differs. m-sharpness (per-micro-batch ascent) is not a rule: it needs the
pass order inside the micro-batch loop (see docs/family.md).
"""

from flatmin.optim.family.bsam import BSAM, VariationalUpdate
from flatmin.optim.family.esam import ESAM
from flatmin.optim.family.fsam import FriendlySAM
from flatmin.optim.family.gsam import GSAM
from flatmin.optim.family.looksam import LookSAM
from flatmin.optim.family.msam import MSAM
from flatmin.optim.family.wsam import WSAM

__all__ = ["GSAM", "FriendlySAM", "LookSAM", "WSAM", "BSAM", "VariationalUpdate", "ESAM", "MSAM"]

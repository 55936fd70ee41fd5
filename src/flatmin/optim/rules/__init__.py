"""The perturbation rules, one file each — AMP and its cheaper variants, SAM/ASAM, RMP, ERM — and
the sharpness-aware family on the one perturbation core: GSAM, FriendlySAM, LookSAM, WSAM, bSAM,
ESAM (stochastic weight perturbation) and MSAM, each a rule driven by `flatmin.optim.driver`.

Argument names and defaults follow the most-installed collection where it has the method, so a
user switches by changing the import. Each file's docstring says where it follows the authors'
code and where (and why) it differs. m-sharpness (per-micro-batch ascent) is not a rule: it needs the
pass order inside the micro-batch loop (see docs/family.md).
"""

from flatmin.optim.rules.bsam import BSAM, VariationalUpdate
from flatmin.optim.rules.esam import ESAM
from flatmin.optim.rules.fsam import FriendlySAM
from flatmin.optim.rules.gsam import GSAM
from flatmin.optim.rules.looksam import LookSAM
from flatmin.optim.rules.msam import MSAM
from flatmin.optim.rules.wsam import WSAM

__all__ = ["GSAM", "FriendlySAM", "LookSAM", "WSAM", "BSAM", "VariationalUpdate", "ESAM", "MSAM"]

"""SAM-ON — SAM on the normalisation layers only (Mueller, Vlaar, Rolnick & Hein, "Normalization Layers
Are All That Sharpness-Aware Minimization Needs", NeurIPS 2023).

Let N be the perturbed tensors (the normalisation layers' scales and shifts) and g = ∇L(θ):

    e_p = ρ · T_p² g_p / ‖(T_q g_q)_{q∈N}‖   for p ∈ N,     e_p = 0   for p ∉ N,
    then the base optimizer steps from θ with ∇L(θ + e) — for EVERY parameter, perturbed or not.

The norm is taken over N only, so the perturbation of N has length ρ whatever the rest of the
network holds. T = I is SAM-ON (the authors' ``SAM_ON``); T = |θ| (``adaptive=True``) is ASAM-ON, the
authors' default ``ASAM_ON`` (their README's command: ``--elementwise --normalize_bias`` with
train.py's η = 0, i.e. T = |θ| on every perturbed tensor, exactly flatmin's ``adaptive``).

Which tensors are in N. An optimizer sees tensors, not modules, so each parameter group says:
``{"params": [...], "perturb": True}`` perturbs the group's tensors, ``"perturb": False`` leaves them
alone. `SAMON.norm_groups(model)` builds the two groups from the model's normalisation modules
(BatchNorm, LayerNorm, GroupNorm, LocalResponseNorm, RMSNorm: `flatmin.optim.factory.NORMS`). When a
group says nothing (``perturb=None``, the default), N is the normalisation modules' parameters of the
model the optimizer was bound to (`bind_model`: ``flatmin train``, ``create_optimizer`` and the Hugging
Face trainer bind it) — the authors' N. An optimizer built from bare tensors and never bound takes the
group's **1-D tensors**: every normalisation scale and shift is 1-D, so all of them ascend — and so do
the biases of linear and convolutional layers, which the authors leave at θ (the documented
approximation).
``perturb=True`` on every group is SAM (ASAM) bit for bit; ρ = 0 is the base optimizer bit for bit.

Checked against the authors' code (mueller-mp/SAM-ON, ``sam_on.py``: ``SAM_ON.ascent_step``,
``ASAM_ON.ascent_step`` and ``descent_step``; ``train.py``'s loop): the norm over the normalisation
parameters' gradients only, e = ρ·g/‖g‖ (ASAM-ON: ρ·T²g/‖Tg‖) added to those tensors, θ restored by
copy, then the base optimizer's step (its weight decay included) with the gradient at θ + e on every
tensor; BatchNorm statistics move in both passes under ``step(closure)`` as in their loop (the
trainer's driver moves them in the first pass only, as for every rule).

Differences: the authors pick N by name (a parameter whose name contains "norm" or "bn"); here by
group flag, by module type (`norm_groups`), or by the 1-D default above. The norm guard is 1e-12
(flatmin's ``K.TINY``, so that N = everything ≡ SAM bit for bit) where the authors add 1e-16.
ρ is per group. Not offered: ASAM-ON's η > 0 (their class default 0.01; train.py's default and the
README's command use 0), ASAM-ON without ``normalize_bias`` (biases unscaled), the ℓ∞ ascent
(``p='infinity'``), layer-wise T (``layerwise``), and train.py's ``start_sam``/``end_sam`` epochs
(plain base steps outside them). The authors' ``no_norm`` ablation (everything but N) is the groups
flagged the other way round. Their published ρ is larger than SAM's (train.py's default 0.5; the
README's ASAM-ON command ρ = 10): the class default here is SAM's 0.05.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.checks import Flag
from flatmin.errors import FlatminWarning
from flatmin.optim.base import Slot
from flatmin.optim.factory import NORMS
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

PERTURB = Hyper("perturb", Flag(), None,
                "SAM-ON: whether a group's tensors ascend (unsaid: the bound model's norm layers, else 1-D)")
HYPERS = (RHO, PERTURB, ADAPTIVE)


def perturbed(group: dict[str, Any], p: Tensor, norms: set[int] | None = None) -> bool:
    """Whether ``p`` is in N: its group's flag; else (nothing said) whether a normalisation module of the
    bound model owns it (`SAMON.bind_model`); else, with no model known, whether it is 1-D like a norm's
    scale."""
    flag = group["perturb"]
    if flag is not None:
        return flag
    return id(p) in norms if norms is not None else p.ndim <= 1


class SAMON(SharpnessRule):
    """SAM (ASAM with ``adaptive=True``) whose ascent moves only the normalisation parameters; every
    parameter is then updated with the gradient at the perturbed point."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, adaptive: bool = False, *, perturb: bool | None = None,
                 foreach: bool | None = None, check_finite: bool = True, nonfinite: str | None = None,
                 **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, perturb=perturb),
                         base_kwargs, foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self._norms: set[int] | None = None  # ids of the bound model's normalisation parameters

    def bind_model(self, model: nn.Module) -> None:
        """The authors' N for groups that say nothing: the parameters of the model's normalisation modules
        (`flatmin train`, `create_optimizer` and the Hugging Face trainer call this with the model)."""
        groups = self.norm_groups(model)
        self._norms = {id(p) for group in groups if group["perturb"] for p in group["params"]}
        unsaid = [p for g in self.param_groups if g["perturb"] is None for p in g["params"]]
        if unsaid and not self._norms & {id(p) for p in unsaid}:
            kinds = ", ".join(n.__name__ for n in NORMS)
            warnings.warn(f"SAM-ON: {type(model).__name__} has no normalisation layer ({kinds}), so its "
                          "ascent moves nothing: every step is the base optimizer's at twice the cost; use "
                          "SAM, or a model with normalisation layers", FlatminWarning, stacklevel=2)

    @staticmethod
    def norm_groups(model: nn.Module) -> list[dict[str, Any]]:
        """The model's trainable parameters as two groups: its normalisation layers' (``perturb=True``)
        and the rest (``perturb=False``) — the authors' N, found by module type instead of by name."""
        norm, rest, seen = [], [], set()
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    (norm if isinstance(module, NORMS) else rest).append(p)
        groups = [{"params": norm, "perturb": True}, {"params": rest, "perturb": False}]
        return [g for g in groups if g["params"]]

    def ascent_slots(self) -> list[Slot]:
        """The groups' tensors in N with their gradients: the only ones the ascent moves or measures."""
        out = []
        for s in self.slots():
            params = [p for p in s.params if perturbed(s.group, p, self._norms)]
            if params:
                out.append(self.slot(s.group, params, [p.grad for p in params]))
        return out

    def _ascend(self, grad_scale: object = None) -> None:
        """θ_N ← θ_N + ρ·T²g/‖Tg‖ with the norm over N alone (a loss scale cancels); the rest stays at θ."""
        self.sam_ascend(self.ascent_slots(), consume=self._consume)


register(RuleInfo(
    "samon", SAMON, "SAM on the normalisation layers only: ascent and its norm over their parameters, "
    "every tensor updated", paper="Mueller et al., NeurIPS 2023", code="mueller-mp/SAM-ON", hypers=HYPERS,
    needs="the model (`bind_model`) or groups marked `perturb=True`; neither: the 1-D tensors", order=33,
    neutral={"rho": 0.0}, examples=({"rho": 0.05}, {"rho": 0.5, "adaptive": True})))

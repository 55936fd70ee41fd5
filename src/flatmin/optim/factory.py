"""`create_optimizer(model, "amp", base="sgd", lr=0.1, weight_decay=5e-4, epsilon=0.1)`: a ready
optimizer for any training loop (plain PyTorch, timm, Lightning) in one line.

Parameter groups follow timm's rule: biases and normalisation weights get no weight decay — a
parameter is exempt when its module is a normalisation layer or it has ndim <= 1, or when the
model's ``no_weight_decay()`` names it (``no_decay_bias_and_norm=False`` turns the rule off).
Given plain parameters instead of a module, only the ndim rule applies; given param-group dicts,
they are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatmin.errors import UnknownNameError
from flatmin.optim.rules import BSAM, ESAM, GSAM, MSAM, WSAM, FriendlySAM, LookSAM
from flatmin.optim.rules.amp_variants import build_amp
from flatmin.optim.rules.rmp import RMP
from flatmin.optim.rules.sam import SAM

BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
}
# The paper's SGD (§5.1) when base="sgd" is named; a class passed as `base` gets no defaults.
BASE_DEFAULTS: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9, "nesterov": True}}
NORMS = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                          nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t is not None)

Builder = Callable[..., Optimizer]  # (params, base class, **base kwargs and method kwargs)


def _amp(variant: str) -> Builder:
    """AMP or one of its efficient variants, by `build_amp`'s name."""
    return lambda params, base, **kw: build_amp(params, variant, base_optimizer=base, **kw)


def _plain(params: list[dict[str, Any]], base: type[Optimizer], **kw: Any) -> Optimizer:
    """No perturbation: the base optimizer itself, with the same parameter groups."""
    return base(params, **kw)


def _bsam(params: list[dict[str, Any]], **kw: Any) -> Optimizer:
    """bSAM brings its own (Adam-like) update: SGD's momentum defaults do not apply; N is required."""
    if "num_data" not in kw:
        raise ValueError("bsam needs num_data=N, the size of the training set (its posterior's scale)")
    return BSAM(params, **{k: v for k, v in kw.items() if k not in ("momentum", "nesterov")})


# One line per method: name -> builder. Method kwargs (epsilon, rho, radius, ...) go to the class.
METHODS: dict[str, Builder] = {
    "erm": _plain,
    "none": _plain,
    "amp": _amp("exact"),
    "amp-onepass": _amp("onepass"),
    "amp-reuse": _amp("reuse"),
    "amp-subbatch": _amp("subbatch"),
    "sam": lambda params, base, **kw: SAM(params, base, **kw),
    "asam": lambda params, base, **kw: SAM(params, base, adaptive=True, **kw),
    "rmp": lambda params, base, **kw: RMP(params, base, **kw),
    "gsam": lambda params, base, **kw: GSAM(params, base, **kw),
    "fsam": lambda params, base, **kw: FriendlySAM(params, base, **kw),
    "looksam": lambda params, base, **kw: LookSAM(params, base, **kw),
    "wsam": lambda params, base, **kw: WSAM(params, base, **kw),
    "esam": lambda params, base, **kw: ESAM(params, base, **kw),
    "msam": lambda params, base, **kw: MSAM(params, base, **kw),
    "bsam": lambda params, base, **kw: _bsam(params, **kw),
}


def param_groups(model_or_params: nn.Module | Iterable, weight_decay: float,
                 no_decay_bias_and_norm: bool = True) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed and an exempt group (empty groups dropped)."""
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        named = getattr(model, "no_weight_decay", lambda: ())()
        exempt_ids = {id(p) for n, p in model.named_parameters() if n in set(named)}
        decay, exempt, seen = [], [], set()
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                skip = isinstance(module, NORMS) or p.ndim <= 1 or id(p) in exempt_ids
                (exempt if no_decay_bias_and_norm and skip else decay).append(p)
    else:
        params = list(model_or_params)
        if params and isinstance(params[0], dict):
            return params  # the caller's own groups
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if not (no_decay_bias_and_norm and p.ndim <= 1)]
        exempt = [p for p in params if no_decay_bias_and_norm and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model_or_params: nn.Module | Iterable, name: str = "amp", *,
                     base: str | type[Optimizer] = "sgd", lr: float | None = None,
                     weight_decay: float = 0.0, no_decay_bias_and_norm: bool = True,
                     **method_kwargs: Any) -> Optimizer:
    """A flatmin optimizer (or the plain base for "erm"/"none") around ``base``, timm-style groups.

    ``method_kwargs`` are the method's (AMP: epsilon, inner_lr, inner_iter, ball, reuse_every,
    ascent_fraction; SAM/ASAM: rho; RMP: radius) plus any of the base optimizer's (momentum, betas).
    """
    key = name.lower()
    if key not in METHODS:
        raise UnknownNameError("optimizer", name, list(METHODS))
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise UnknownNameError("base optimizer", base, list(BASES))
        kwargs = {**BASE_DEFAULTS.get(base.lower(), {}), **method_kwargs}
        if kwargs.get("momentum", 0) == 0 and "nesterov" not in method_kwargs:
            kwargs.pop("nesterov", None)  # momentum=0 given: plain SGD, not an invalid Nesterov
        base = BASES[base.lower()]
    elif isinstance(base, type) and issubclass(base, Optimizer):
        kwargs = dict(method_kwargs)
    else:
        raise TypeError(f"base must be one of {', '.join(BASES)} or an Optimizer class, got {base!r}")
    if lr is not None:
        kwargs["lr"] = lr
    groups = param_groups(model_or_params, weight_decay, no_decay_bias_and_norm)
    return METHODS[key](groups, base, weight_decay=weight_decay, **kwargs)

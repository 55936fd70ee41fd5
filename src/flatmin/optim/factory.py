"""`create_optimizer(model, "amp", base="sgd", lr=0.1, weight_decay=5e-4, epsilon=0.1)`: a ready
optimizer for any training loop (plain PyTorch, timm, Lightning) in one line.

Parameter groups follow timm's rule: biases and normalisation weights get no weight decay — a
parameter is exempt when its module is a normalisation layer or it has ndim <= 1, or when the
model's ``no_weight_decay()`` names it (``no_decay_bias_and_norm=False`` turns the rule off).
Given plain parameters instead of a module, only the ndim rule applies; given param-group dicts,
they are used as they are. Frozen parameters (``requires_grad=False``: a peft LoRA model's base weights)
are left out, so a LoRA-wrapped model gets its adapters optimised; given the module, a rule that reads
the model's structure learns it (`PerturbedOptimizer.bind_model`: Flat-LoRA finds the LoRA layers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatmin.errors import UnknownNameError
from flatmin.optim import registry

BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
}
# The paper's SGD (§5.1) when base="sgd" is named, less what a rule's authors set otherwise (its registry
# entry's ``sgd_defaults``: MSAM has no Nesterov); a class passed as `base` gets no defaults.
BASE_DEFAULTS: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9, "nesterov": True}}
NORMS = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                          nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def names() -> list[str]:
    """Every name create_optimizer takes: the registry's rules and their aliases."""
    return list(registry.names())


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
    found = registry.names()
    key = name.lower()
    if key not in found:
        raise UnknownNameError("optimizer", name, list(found))
    info, fixed = found[key]
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise UnknownNameError("base optimizer", base, list(BASES))
        own = info.sgd_defaults if base.lower() == "sgd" else {}  # the authors' SGD (MSAM: no Nesterov)
        kwargs = {**BASE_DEFAULTS.get(base.lower(), {}), **own, **method_kwargs}
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
    if info.plain_in_factory:  # no perturbation: the base optimizer itself, with the same groups
        return base(groups, weight_decay=weight_decay, **kwargs)
    opt = info.build(groups, base, weight_decay=weight_decay, **fixed, **kwargs)
    if isinstance(model_or_params, nn.Module):  # a rule that reads the model's structure (Flat-LoRA's LoRA)
        opt.bind_model(model_or_params)
    return opt

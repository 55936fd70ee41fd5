"""The popular two-call API for the rules that need the data, written once for the tests that
compare it with the trainer, Lightning and the sync counter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.optim.driver import sub_batch


def esam_step(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ESAM with data selection: ascent on the batch, select by loss rise, final pass on the selection."""
    before = F.cross_entropy(model(x), y, reduction="none")
    before.mean().backward()
    opt.first_step(zero_grad=True)
    with torch.no_grad():
        idx = opt.select(before.detach(), F.cross_entropy(model(x), y, reduction="none"))
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.second_step(zero_grad=True)
    return idx


def msharp_step(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, splits: int,
                freeze: Callable[[nn.Module], Any] = lambda m: contextlib.nullcontext()) -> None:
    """m-sharpness: per sub-batch first_step and final backward, next_split() between; one update."""
    for k in range(splits):
        if k:
            opt.next_split()
        part = sub_batch(len(x), k, splits)
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.first_step(zero_grad=True)
        with freeze(model):
            F.cross_entropy(model(x[part]), y[part]).backward()
    opt.second_step(zero_grad=True)

"""m-sharpness as a part (Foret et al. §4.1): each sub-batch ascends from θ on its own gradient, and
the update uses the mean of the sub-batches' final gradients.

`Splits` keeps the finished sub-batches' final gradients summed in buffers like the parameters (kept
across steps) and folds them into ``.grad`` before the update. One foreach op per sub-batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flatmin.optim import _kernels as K
from flatmin.optim.sharded import local
from flatmin.optim.theta import kept_buffer, param_order


class Splits:
    """The running sum of the finished sub-batches' final gradients of the step under way."""

    def __init__(self, foreach: bool) -> None:
        self.foreach = foreach
        self.sums: dict[Tensor, Tensor] = {}  # parameter -> summed final gradient (buffers reused)
        self.done = 0  # sub-batches finished in the current step

    def add(self, groups: Iterable[dict[str, Any]]) -> None:
        """Put the finished sub-batch's final gradient aside (the caller then zeroes ``.grad``)."""
        params = [p for p in param_order(groups) if p.grad is not None]
        if not self.done:
            self.sums = {p: kept_buffer(self.sums, p) for p in params}
            K.copy_(local(list(self.sums.values())), local([p.grad for p in params]), self.foreach)
        else:
            for p in params:  # a tensor first reached in this sub-batch starts from zero
                if p not in self.sums:
                    self.sums[p] = torch.zeros_like(p)
            torch._foreach_add_(local([self.sums[p] for p in params]), local([p.grad for p in params]))
        self.done += 1

    def fold(self, groups: Iterable[dict[str, Any]]) -> None:
        """The mean of the sub-batches' final gradients into ``.grad`` (the last one is there already)."""
        if not self.done:
            return
        summed = [p for p in self.sums if p.grad is not None]
        if summed:
            torch._foreach_add_(local([p.grad for p in summed]), local([self.sums[p] for p in summed]))
        for p in self.sums:  # a tensor the last sub-batch did not reach (rare): its sum alone
            if p.grad is None:
                p.grad = self.sums[p].clone()
        grads = [p.grad for p in param_order(groups) if p.grad is not None]
        torch._foreach_div_(local(grads), float(self.done + 1))
        self.done = 0

    def buffers(self) -> list[Tensor]:
        """The sum buffers (memory held across steps)."""
        return list(self.sums.values())

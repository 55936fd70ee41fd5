"""Where a run executes: one process, or one rank of a torchrun job.

The training loop only talks to this interface, so one loop serves both: `shard` picks this
rank's slice of the global batch, `wrap` makes the model data-parallel, `all_reduce_sum` combines
statistics, and only the main rank writes files.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn


class SingleProcess:
    """The default: everything local, rank 0 of 1."""

    rank, world_size, is_main = 0, 1, True

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch of indices: all of it."""
        return idx

    def wrap(self, model: nn.Module, local_ascent: bool) -> nn.Module:
        """The module the forward passes go through."""
        return model

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum a statistic over ranks (a no-op here)."""
        return t

    def ascent_context(self, net: nn.Module) -> Any:
        """Context for ascent passes (per-rank ascent skips the all-reduce under DDP)."""
        return nullcontext()

    def no_sync(self, net: nn.Module) -> Any:
        """A factory of contexts that skip the gradient all-reduce (micro-batches but the last)."""
        return None

    reduce_flag = None  # how ranks agree that a step is skipped (one rank: nothing to agree on)

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for)."""


def current(device: torch.device) -> SingleProcess:
    """The execution context of this process: torchrun's if launched by it, else a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from flatmin.train import ddp

        return ddp.TorchrunProcess.from_env(device)
    return SingleProcess()

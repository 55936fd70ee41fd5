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
    evaluates = True  # whether this rank runs the evaluation passes (FSDP: every rank must)
    grad_weight = 1.0  # loss factor for this rank's backward (FSDP's share of an uneven batch)

    def full_state(self, model: nn.Module, opt: Any) -> tuple[dict, dict]:
        """The model's and optimizer's state in the single-process layout (what a checkpoint holds)."""
        return model.state_dict(), opt.state_dict()

    def local_optimizer_state(self, opt: Any, state: dict) -> dict:
        """A saved optimizer state as this rank's optimizer loads it."""
        return state

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for)."""


def current(device: torch.device, *, fsdp: bool = False,
            param_dtype: torch.dtype | None = None) -> SingleProcess:
    """The execution context of this process: torchrun's if launched by it (DDP, or FSDP with ``fsdp``;
    ``param_dtype``: FSDP's all-gather precision), else a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from flatmin.train import ddp

        if fsdp:
            return ddp.FSDPProcess.from_env(device, param_dtype=param_dtype)
        return ddp.TorchrunProcess.from_env(device)
    return SingleProcess()

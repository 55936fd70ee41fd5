"""Where a run executes: one process, or one rank of a torchrun job.

The training loop only talks to this interface, so one loop serves both: `shard` picks this
rank's slice of the global batch, `wrap` makes the model data-parallel, `all_reduce_sum` combines
statistics, and only the main rank writes files.

The torchrun side, in detail:

``torchrun --nproc_per_node=W -m flatmin train ... --batch-size B`` runs W copies of the one
training loop. Every rank draws the same seeded permutation, cuts the same global batches of B
and keeps its own contiguous part (`shard`); DistributedDataParallel averages the gradients, so
W ranks with B/W examples each take the single-process step on B examples.

Two details make that exact rather than approximate:

* The loss is a mean per rank and DDP averages over ranks; that is the mean over the global
  batch only when the shards are equal. Our gradient all-reduce (`weighted_allreduce`) weights
  each rank by its share of the global batch instead, so an uneven batch (B not divisible by W,
  or the last, partial batch of an epoch) is still the global mean.
* The perturbation optimizers keep θ in buffers and restore it; every rank restores its own,
  identical θ, and all ranks apply the same averaged gradient, so θ never drifts between ranks.

AMP/SAM's ascent passes go through DDP as well, so by default the ascent direction is the
all-reduced global gradient and every rank perturbs identically (the paper's algorithm on the
global batch). With ``ddp_local_ascent`` the ascent passes run under ``no_sync``: each rank
perturbs along its own shard's gradient (SAM's m-sharpness with m = B/W), one all-reduce fewer
per step. See docs/distributed.md.
"""

# No `from __future__ import annotations` here: DDP checks the comm hook's annotations at runtime.
import atexit
import os
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatmin.errors import ConfigError


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



def shard(idx: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous part of a global batch; sizes differ by at most one."""
    if len(idx) < world_size:
        raise ConfigError(
            f"a batch of {len(idx)} example(s) cannot be shared by {world_size} ranks (the last batch of "
            "an epoch is the remainder of the training set); choose a batch size whose remainder is 0 "
            f"or at least {world_size}")
    return idx.tensor_split(world_size)[rank]


def weighted_allreduce(process: "TorchrunProcess", bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: Σ_r share_r · ∇(mean loss on rank r) = the gradient of the global-batch mean."""
    buf = bucket.buffer()
    if process.share is None:  # equal shards: DDP's own average, bit for bit
        buf.div_(process.world_size)
    else:
        buf.mul_(process.share)
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


class TorchrunProcess(SingleProcess):
    """Rank ``rank`` of ``world_size`` processes started by torchrun (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.device = device
        self.local_ascent = False
        self.share: float | None = None  # this rank's share of the current batch when shards differ

    @classmethod
    def from_env(cls, device: torch.device) -> "TorchrunProcess":
        """Join the job torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT."""
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if device.type == "cuda":
            if device.index is not None:
                raise ConfigError(f"under torchrun use --device cuda (rank r takes cuda:LOCAL_RANK), "
                                  f"not {device}")
            torch.cuda.set_device(local_rank)  # plain "cuda" tensors of this process land there
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    rank=rank, world_size=world_size)
            atexit.register(_destroy)
        elif dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ConfigError(f"an existing process group (rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}) disagrees with RANK/WORLD_SIZE")
        return cls(rank, world_size, device)

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch; remembers its share for the gradient all-reduce."""
        part = shard(idx, self.rank, self.world_size)
        self.share = None if len(idx) % self.world_size == 0 else len(part) / len(idx)
        return part

    def wrap(self, model: nn.Module, local_ascent: bool) -> nn.Module:
        """DDP around the model (it broadcasts rank 0's parameters now), with the weighted all-reduce."""
        self.local_ascent = local_ascent
        ids = [self.device.index] if self.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
        net.register_comm_hook(self, weighted_allreduce)
        return net

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum a statistic over ranks (a copy; the argument is left alone)."""
        out = t.clone()
        dist.all_reduce(out)
        return out

    def ascent_context(self, net: nn.Module) -> Any:
        """Per-rank ascent: the ascent passes skip DDP's gradient all-reduce."""
        return net.no_sync() if self.local_ascent else nullcontext()

    def no_sync(self, net: nn.Module) -> Any:
        """DDP's no_sync: micro-batches but the last accumulate locally, then one all-reduce."""
        return net.no_sync if isinstance(net, DistributedDataParallel) else None

    def reduce_flag(self, found: Tensor) -> Tensor:
        """Every rank skips when any rank saw a non-finite loss (a collective, not a host read)."""
        out = found.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others will read)."""
        dist.barrier()


def _destroy() -> None:
    """Leave the process group cleanly at exit (NCCL warns otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current(device: torch.device) -> SingleProcess:
    """The execution context of this process: torchrun's if launched by it, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TorchrunProcess.from_env(device)
    return SingleProcess()

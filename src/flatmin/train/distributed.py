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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatmin.errors import ConfigError
from flatmin.optim.sharded import full_state, shard_optimizer_state


class SingleProcess:
    """The default: everything local, rank 0 of 1."""

    rank, world_size, is_main = 0, 1, True

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch of indices: all of it."""
        return idx

    def wrap(self, model: nn.Module, local_ascent: bool, unused: bool = False) -> nn.Module:
        """The module the forward passes go through (``unused``: some tensors sit out a pass)."""
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

    @property
    def evaluates(self) -> bool:
        """Only rank 0 evaluates (θ is the same on every rank)."""
        return self.is_main

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch; remembers its share for the gradient all-reduce."""
        part = shard(idx, self.rank, self.world_size)
        self.share = None if len(idx) % self.world_size == 0 else len(part) / len(idx)
        return part

    def wrap(self, model: nn.Module, local_ascent: bool, unused: bool = False) -> nn.Module:
        """DDP around the model (it broadcasts rank 0's parameters now), with the weighted all-reduce;
        ``unused``: a rule leaves some tensors without a gradient in a pass (ESAM's β < 1), so DDP
        looks for them in every backward (a cost DDP only pays for such a rule)."""
        self.local_ascent = local_ascent
        ids = [self.device.index] if self.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
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


class FSDPProcess(TorchrunProcess):
    """Rank ``rank`` with parameters, gradients and optimizer state sharded (``fully_shard``, FSDP2).

    Each module that owns parameters, then the root, is sharded along dim 0 over all ranks; the
    perturbation optimizers work on the shards (`flatmin.optim.sharded`). FSDP averages the ranks'
    gradients (a reduce-scatter), so an uneven batch weights each rank's loss by share·W instead of a
    comm hook. Every rank evaluates (a forward pass gathers the layers from all ranks); checkpoints hold
    the full state, gathered to rank 0, in the single-process layout.
    """

    param_dtype: torch.dtype | None = None  # FSDP's all-gather precision (--precision bf16/fp16)

    @classmethod
    def from_env(cls, device: torch.device, param_dtype: torch.dtype | None = None) -> "FSDPProcess":
        """Join torchrun's job; ``param_dtype``: the precision layers are gathered and computed in."""
        process = super().from_env(device)
        process.param_dtype = param_dtype
        return process

    evaluates = True

    @property
    def grad_weight(self) -> float:
        """share·W on an uneven batch (FSDP's average then gives the global-batch mean), else 1."""
        return 1.0 if self.share is None else self.share * self.world_size

    def wrap(self, model: nn.Module, local_ascent: bool, unused: bool = False) -> nn.Module:
        """Shard each layer that owns parameters (gathered one at a time in a pass), then the root."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if local_ascent:
            raise ConfigError("ddp_local_ascent is a DDP option; under --fsdp the ascent gradient is global")
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32) \
            if self.param_dtype is not None else MixedPrecisionPolicy()
        mesh = init_device_mesh(self.device.type, (self.world_size,))  # --device's kind, not the default
        return shard_model(model, mesh=mesh, mp_policy=policy)

    def ascent_context(self, net: nn.Module) -> Any:
        """The ascent passes reduce their gradients like every pass."""
        return nullcontext()

    def no_sync(self, net: nn.Module) -> Any:
        """Micro-batches but the last keep unsharded local gradients; the last one reduce-scatters."""
        return lambda: _gradient_sync_off(net)

    def full_state(self, model: nn.Module, opt: Any) -> tuple[dict, dict]:
        """Each DTensor gathered in turn (collective), kept on rank 0 only: the single-process layout."""
        return full_state(model.state_dict(), self.is_main), full_state(opt.state_dict(), self.is_main)

    def local_optimizer_state(self, opt: Any, state: dict) -> dict:
        """A full optimizer state cut into this rank's shards (no communication: every rank read the file)."""
        return shard_optimizer_state(state, [p for group in opt.param_groups for p in group["params"]])


def shard_model(model: nn.Module, **options: Any) -> nn.Module:
    """``fully_shard`` each module that owns parameters (inner ones first), then the root.

    The root too reshards after every forward pass (FSDP would keep its own parameters gathered for
    the backward): a perturbation written into the shards between an evaluation and the next
    training forward (RMP, reused Δ) must reach the forward pass, not a stale gathered copy.
    """
    from torch.distributed.fsdp import fully_shard

    for module in reversed(list(model.modules())[1:]):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            fully_shard(module, **options)
    fully_shard(model, reshard_after_forward=True, **options)
    return model


@contextmanager
def _gradient_sync_off(net: nn.Module) -> Iterator[None]:
    """FSDP2's no_sync: backward passes inside accumulate unreduced gradients."""
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def current(device: torch.device, *, fsdp: bool = False,
            param_dtype: torch.dtype | None = None) -> SingleProcess:
    """The execution context of this process: torchrun's if launched by it (DDP, or FSDP with ``fsdp``;
    ``param_dtype``: FSDP's all-gather precision), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if fsdp:
            return FSDPProcess.from_env(device, param_dtype=param_dtype)
        return TorchrunProcess.from_env(device)
    return SingleProcess()

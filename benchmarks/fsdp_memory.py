"""Per-rank memory held by AMP under FSDP vs DDP, and the step-time ratio FSDP/DDP.

    python benchmarks/fsdp_memory.py --world-size 2 --steps 20 --json fsdp_memory.json

Spawns ``--world-size`` CPU processes (gloo on loopback, one thread each). Each rank builds the same
MLP (MNIST-1D input, 2×2048 hidden units: 4.3M parameters) twice — one copy wrapped by DDP, one by
FSDP2 (``fully_shard`` per layer, as ``flatmin train --fsdp`` does) — each with AMP (N given by
``--inner-iter``; SGD with momentum) and trains both with the trainer's own `train_step` on the same
batches, one step of each in turn (round-robin, so load drift on a shared machine hits both alike).

Memory is *counted*, not sampled: the bytes this rank holds between steps — parameters, AMP's θ/Δ
buffers and the non-finite guard's snapshots (`held_buffers`; a fused base optimizer needs none), the
optimizer's state — each tensor's local part
(a DTensor counts its shard). Gradients are listed apart: DDP keeps full ones, FSDP reduce-scatters
them to shards. Rank 0 prints bytes per rank and the ratio FSDP/DDP, and the median step time of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp
from torch import Tensor

from flatmin.data import load_dataset
from flatmin.models import create_model
from flatmin.optim.sharded import local
from flatmin.train.config import TrainConfig
from flatmin.train.distributed import FSDPProcess, TorchrunProcess
from flatmin.train.loop import StepContext, train_step
from flatmin.train.methods import Batch, get_method


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbytes(tensors: list[Tensor]) -> int:
    """Bytes of this rank's part of each tensor (each storage counted once)."""
    seen, total = set(), 0
    for t in local(tensors):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def held(model: torch.nn.Module, opt) -> dict[str, int]:
    """What a rank keeps from one step to the next, by kind."""
    params = list(model.parameters())
    state = [v for s in opt.base_optimizer.state.values() for v in s.values()
             if isinstance(v, Tensor) and v.dim() > 0]
    out = {"params": nbytes(params), "theta_delta_guard": nbytes(opt.held_buffers()),
           "optimizer_state": nbytes(state)}
    out["total"] = sum(out.values())
    out["grads"] = nbytes([p.grad for p in params if p.grad is not None])
    return out


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    """One rank: DDP and FSDP copies of one model, stepped in turn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ds = load_dataset("mnist1d")
    cfg = TrainConfig(method="amp", batch_size=args.batch_size, lr=0.05, weight_decay=5e-4, epsilon=0.5,
                      inner_lr=1.0, inner_iter=args.inner_iter, ball=args.ball, epochs=1)
    method = get_method("amp")
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_channels=1, input_shape=(1, 40), hidden=(args.width,) * 2)
    runs = {}
    for name, kind in (("ddp", TorchrunProcess), ("fsdp", FSDPProcess)):
        dist = kind.from_env(torch.device("cpu"))
        m = copy.deepcopy(model)
        net = dist.wrap(m, False)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        ctx = StepContext(cfg, method, scaler, torch.device("cpu"), 1.0, dist)
        runs[name] = (net, m, method.build_optimizer(m.parameters(), cfg), ctx, [])
    g = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        idx = torch.randperm(len(ds.train), generator=g)[:args.batch_size]
        for net, m, opt, ctx, times in runs.values():
            part = ctx.dist.shard(idx)
            batch = Batch(ds.train.x[part].float(), ds.train.y[part])
            ctx.dist.barrier()  # both start from the same line
            t = time.perf_counter()
            train_step(net, m, opt, batch, ctx)
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
    mem = {name: held(m, opt) for name, (_, m, opt, _, _) in runs.items()}
    med = {name: statistics.median(r[4]) for name, r in runs.items()}
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"AMP (N={args.inner_iter}, {args.ball} ball), mlp 2x{args.width}: {params:,} parameters, "
              f"W={args.world_size}, batch {args.batch_size}")
        print(f"{'bytes held by rank 0':28s} {'DDP':>14s} {'FSDP':>14s} {'FSDP/DDP':>9s}")
        for key in mem["ddp"]:
            a, b = mem["ddp"][key], mem["fsdp"][key]
            print(f"{key:28s} {a:14,d} {b:14,d} {b / a if a else float('nan'):9.3f}")
        print(f"median step time: DDP {1e3 * med['ddp']:.1f} ms, FSDP {1e3 * med['fsdp']:.1f} ms, "
              f"FSDP/DDP {med['fsdp'] / med['ddp']:.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": args.world_size, "params": params, "width": args.width,
                           "inner_iter": args.inner_iter, "ball": args.ball, "batch_size": args.batch_size,
                           "steps": args.steps, "memory_bytes_rank0": mem,
                           "step_ms": {k: 1e3 * v for k, v in med.items()},
                           "fsdp/ddp_time": med["fsdp"] / med["ddp"]}, f, indent=2)


def main() -> None:
    """Parse flags and spawn the ranks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=2048, help="hidden units of each of 2 layers")
    parser.add_argument("--inner-iter", type=int, default=1, help="AMP's N (N > 1 keeps a Δ buffer too)")
    parser.add_argument("--ball", default="global", choices=["global", "per_tensor"])
    parser.add_argument("--batch-size", type=int, default=100, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    mp.spawn(rank_main, args=(args, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()

"""Step time of AMP/SAM under DDP: global ascent (all-reduced) vs per-rank ascent (``no_sync``).

    python benchmarks/ddp_ascent.py --world-size 2 --method amp --model cnn1d mlp_wide --steps 60

Spawns ``--world-size`` CPU processes (gloo on loopback, one thread each). Each rank trains two
copies of the same model with the trainer's own `train_step` — one wrapped for global ascent, one
for per-rank ascent — on the same MNIST-1D shards, one step of each in turn (round-robin, so load
drift on a shared machine hits both alike). Rank 0 prints the median step time of each and the
ratio local/global; per-rank ascent saves one gradient all-reduce per step, which is worth more
the more parameters there are (``mlp_wide``: 2×1024 hidden units, 1.1M parameters, vs cnn1d's 5k).
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

from flatmin.data import load_dataset
from flatmin.models import create_model
from flatmin.train.config import TrainConfig
from flatmin.train.distributed import TorchrunProcess
from flatmin.train.loop import StepContext, train_step
from flatmin.train.methods import Batch, get_method

MODELS = {"cnn1d": dict(name="cnn1d"), "mlp_wide": dict(name="mlp", hidden=(1024, 1024))}


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    """One rank: time global and per-rank ascent side by side for each model."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ds = load_dataset("mnist1d")
    cfg = TrainConfig(method=args.method, batch_size=args.batch_size, lr=0.05, weight_decay=5e-4,
                      epsilon=0.5, inner_lr=1.0, ball="global", rho=0.05, epochs=1)
    method = get_method(args.method)
    results = {}
    for name in args.model:
        spec = dict(MODELS[name])
        torch.manual_seed(0)
        model = create_model(spec.pop("name"), num_classes=10, in_channels=1, input_shape=(1, 40), **spec)
        runs = {}
        for local in (False, True):
            dist = TorchrunProcess.from_env(torch.device("cpu"))
            m = copy.deepcopy(model)
            ctx = StepContext(cfg, method, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
                              1.0, dist)
            runs[local] = (dist.wrap(m, local), m, method.build_optimizer(m.parameters(), cfg), ctx, [])
        g = torch.Generator().manual_seed(0)
        for step in range(args.warmup + args.steps):
            idx = torch.randperm(len(ds.train), generator=g)[:args.batch_size]
            for net, m, opt, ctx, times in runs.values():
                part = ctx.dist.shard(idx)
                batch = Batch(ds.train.x[part].float(), ds.train.y[part])
                ctx.dist.barrier()  # both variants start from the same line
                t = time.perf_counter()
                train_step(net, m, opt, batch, ctx)
                elapsed = time.perf_counter() - t
                if step >= args.warmup:
                    times.append(elapsed)
        params = sum(p.numel() for p in model.parameters())
        med = {local: statistics.median(r[4]) for local, r in runs.items()}
        results[name] = {"params": params, "global_ascent_ms": 1e3 * med[False],
                         "local_ascent_ms": 1e3 * med[True], "local/global": med[True] / med[False]}
    if rank == 0:
        for name, r in results.items():
            print(f"{name:9s} {r['params']:>9,d} params  global ascent {r['global_ascent_ms']:7.2f} ms/step"
                  f"  per-rank ascent {r['local_ascent_ms']:7.2f} ms/step"
                  f"  local/global {r['local/global']:.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": args.world_size, "method": args.method,
                           "batch_size": args.batch_size, "results": results}, f, indent=2)


def main() -> None:
    """Parse flags and spawn the ranks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--method", default="amp", choices=["amp", "sam"])
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=100, help="global batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    mp.spawn(rank_main, args=(args, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()

"""AMP/ERM ratio of the trainer's own step (``flatmin.train.loop.train_step``), round-robin.

    python benchmarks/trainer_step_ratio.py --model preactresnet18 --batch-size 50 --threads 1

Uses only names that every flatmin version since the first has (train_step, StepContext,
get_method), so the same file measures an older checkout too: run it under each tree's
``PYTHONPATH`` alternately, and compare the ratios (each one is side by side in its process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flatmin.models import create_model
from flatmin.train import TrainConfig
from flatmin.train.distributed import SingleProcess
from flatmin.train.loop import StepContext, train_step
from flatmin.train.methods import Batch, get_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="erm,amp,sam")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (1, 40) if args.model in ("cnn1d", "mlp") else (3, 32, 32)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch_size, *shape), torch.randint(0, 10, (args.batch_size,))
    runs = {}
    for name in args.methods.split(","):
        torch.manual_seed(0)
        model = create_model(args.model, 10, input_shape=shape).train()
        cfg = TrainConfig(method=name, lr=0.05, weight_decay=5e-4, epsilon=0.5, inner_lr=1.0, ball="global",
                          rho=0.05, batch_size=args.batch_size, epochs=1)
        method = get_method(name)
        ctx = StepContext(cfg, method, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), 1.0,
                          SingleProcess())
        runs[name] = (model, method.build_optimizer(model.parameters(), cfg), ctx, [])
    for i in range(args.warmup + args.steps):
        for model, opt, ctx, times in runs.values():
            t = time.perf_counter()
            train_step(model, model, opt, Batch(x, y), ctx)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    sec = {name: statistics.median(r[3]) for name, r in runs.items()}
    out = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "s_per_step": sec,
           **{f"{n}_over_erm": sec[n] / sec["erm"] for n in sec if n != "erm"}}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()

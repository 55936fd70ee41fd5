"""Before/after step cost, side by side: the same timing code run against two checkouts of flatmin.

    python benchmarks/ab_step_cost.py BEFORE_DIR AFTER_DIR --rounds 3 --json OUT.json

Each round runs `TIMER` (below) once with the BEFORE checkout's src/ first on PYTHONPATH and once with
the AFTER one's; rounds alternate the order, so a drift in machine load hits both alike. Within a
run, ERM (a plain torch SGD loop), AMP and SAM (``opt.step(closure)``: the public API both checkouts
share) step round-robin on copies of one model and batch, and each method's median step time is
divided by ERM's. Printed: AMP/ERM and SAM/ERM per run and their medians per checkout. Ratios only:
seconds on a shared machine are not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TIMER = r"""
import copy, json, statistics, sys, time
import torch
from torch.nn import functional as F
import flatmin
from flatmin.models import create_model

model_name, batch, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = create_model(model_name, 10, input_shape=(3, 32, 32)).train()
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
sgd = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
nets = {name: copy.deepcopy(model) for name in ("erm", "amp", "sam")}
opts = {"erm": torch.optim.SGD(nets["erm"].parameters(), **sgd),
        "amp": flatmin.AMP(nets["amp"].parameters(), epsilon=0.5, inner_lr=1.0, **sgd),
        "sam": flatmin.SAM(nets["sam"].parameters(), rho=0.05, **sgd)}

def step(name):
    net, opt = nets[name], opts[name]
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss
    if name == "erm":
        closure()
        opt.step()
    else:
        opt.step(closure)

times = {name: [] for name in nets}
for i in range(warmup + steps):
    for name in nets:
        t = time.perf_counter()
        step(name)
        if i >= warmup:
            times[name].append(time.perf_counter() - t)
med = {name: statistics.median(v) for name, v in times.items()}
print(json.dumps({"amp_over_erm": med["amp"] / med["erm"], "sam_over_erm": med["sam"] / med["erm"],
                  "erm_s": med["erm"], "threads": torch.get_num_threads(), "flatmin": flatmin.__file__}))
"""


def run(root: Path, args: argparse.Namespace) -> dict:
    """One run of TIMER against the checkout at ``root``; its numbers."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, "-c", TIMER, args.model, str(args.batch_size), str(args.steps), str(args.warmup)]
    done = subprocess.run(cmd, check=True, env=env, cwd=root, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for which in order:
            runs[which].append(run(getattr(args, which).resolve(), args))
            print(f"round {r + 1} {which}: amp/erm {runs[which][-1]['amp_over_erm']:.3f}, "
                  f"sam/erm {runs[which][-1]['sam_over_erm']:.3f}", flush=True)
    names = ["amp", "sam"]
    print(f"\n{'method':14s} {'before ×ERM':>12s} {'after ×ERM':>11s}   (median of {args.rounds} runs each)")
    table = {}
    for name in names:
        b = statistics.median(x[f"{name}_over_erm"] for x in runs["before"])
        a = statistics.median(x[f"{name}_over_erm"] for x in runs["after"])
        table[name] = {"before": b, "after": a}
        print(f"{name:14s} {b:12.3f} {a:11.3f}")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args) | {"before": str(args.before),
                                                                     "after": str(args.after)},
                                               "median": table, "runs": runs}, indent=2, default=str))


if __name__ == "__main__":
    main()

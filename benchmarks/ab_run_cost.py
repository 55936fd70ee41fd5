"""Before/after CPU cost of whole trainer runs, side by side: the same runs trained by two checkouts.

    python benchmarks/ab_run_cost.py BEFORE_DIR AFTER_DIR --methods erm,amp,sam --rounds 2

Each round trains one run of every method (the default protocol: MNIST-1D, cnn1d, 60 epochs, one
thread, checkpoints and logs written as `flatmin compare` writes them) once with the BEFORE checkout's
src/ first on PYTHONPATH and once with the AFTER one's; rounds alternate the order, so a drift in
machine load hits both alike. Printed: each method's median process CPU seconds per run per checkout,
their ratio, and whether the two checkouts' test metrics are equal. Ratios only: seconds on a shared
machine are not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

RUNNER = r"""
import json, shutil, sys, time
import torch
torch.set_num_threads(1)
from flatmin.experiments.backends.base import train_run
from flatmin.experiments.runner import resolved
from flatmin.train.config import TrainConfig

methods, epochs, seed, out = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
result = {}
for m in methods:
    shutil.rmtree(out, ignore_errors=True)
    cfg = resolved(TrainConfig(method=m, seed=seed, epochs=epochs))
    t = time.process_time()
    r = train_run(cfg.to_dict(), out)
    result[m] = {"cpu_s": time.process_time() - t, "test": [r["test"]["error"], r["test"]["nll"]]}
print(json.dumps(result))
"""


def one(src: str, methods: str, epochs: int, seed: int) -> dict:
    """Train the methods once with ``src`` first on the path; CPU seconds and test metrics per method."""
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", RUNNER, methods, str(epochs), str(seed), f"{tmp}/run"],
                              env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--methods", default="erm,amp,sam")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for side in order:
            src = os.path.join(getattr(args, side), "src")
            runs[side].append(one(src, args.methods, args.epochs, args.seed))
    for m in args.methods.split(","):
        cpu = {side: statistics.median(x[m]["cpu_s"] for x in runs[side]) for side in runs}
        same = runs["before"][0][m]["test"] == runs["after"][0][m]["test"]
        print(f"{m}: before {cpu['before']:.2f}s  after {cpu['after']:.2f}s  after/before "
              f"{cpu['after'] / cpu['before']:.3f}  test metrics {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()

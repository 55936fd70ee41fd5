"""Before/after step cost, side by side: `benchmarks/step_cost.py` of two checkouts, run in turn.

    python benchmarks/ab_step_cost.py BEFORE_DIR AFTER_DIR --rounds 2 --json OUT.json

Each round runs the BEFORE checkout's step_cost.py (its own src/ first on PYTHONPATH), then the AFTER
one's, with the same model, batch and step counts; rounds alternate the order, so a drift in machine
load hits both alike. Printed: every method's step/ERM ratio per run, and the median over the rounds
per checkout, for the methods both checkouts time. Ratios only: seconds on a shared machine are not
a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(root: Path, args: argparse.Namespace) -> dict:
    """One step_cost.py run of the checkout at ``root``; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": str(root / "src")}
        cmd = [sys.executable, str(root / "benchmarks" / "step_cost.py"), "--model", args.model,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--json", str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=5)
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
    names = sorted({k[:-len("_over_erm")] for k in runs["before"][0] if k.endswith("_over_erm")}
                   & {k[:-len("_over_erm")] for k in runs["after"][0] if k.endswith("_over_erm")})
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

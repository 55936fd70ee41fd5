"""Does `flatmin compare`'s step-cost column agree with `benchmarks/step_cost.py`, and how noisy is each?

    python benchmarks/cost_agreement.py --dataset mnist1d --repeats 5 --json OUT.json

Each repeat, in this one process and one thread, measures (a) compare's dedicated measurement (the
trainer's epochs of every method interleaved, CPU and wall time per step) and (b) step_cost.py's
whole-step median on a synthetic batch of the same model and batch size. Prints method/ERM ratios per
repeat, their mean ± std over repeats, and (a) − (b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_cost  # noqa: E402 - the benchmark beside this file
from flatmin.experiments.paired import step_cost as dedicated  # noqa: E402
from flatmin.experiments.runner import resolved  # noqa: E402
from flatmin.train.config import TrainConfig  # noqa: E402


def one_repeat(configs: dict[str, TrainConfig], epochs: int, steps: int) -> dict[str, dict[str, float]]:
    """Ratios to ERM from both measurements, taken back to back."""
    d = dedicated(configs, epochs)
    first = next(iter(configs.values()))
    ns = argparse.Namespace(model=first.model, batch_size=first.batch_size, num_classes=10,
                            input_shape=list(step_cost.SHAPES.get(first.model, (3, 32, 32))), warmup=3,
                            steps=steps, reuse_every=5, ascent_fraction=0.5, device="cpu")
    b = step_cost.measure(ns)
    out = {}
    for m in configs:
        out[m] = {"compare_cpu": d[m]["cpu_s_per_step"] / d["erm"]["cpu_s_per_step"],
                  "compare_wall": d[m]["wall_s_per_step"] / d["erm"]["wall_s_per_step"],
                  "step_cost": 1.0 if m == "erm" else b[f"{m}_over_erm"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--methods", default="erm,amp,sam")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of the dedicated measurement")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of step_cost.py per method")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",")]
    configs = {m: resolved(TrainConfig(dataset=args.dataset, method=m)) for m in methods}
    reps = [one_repeat(configs, args.epochs, args.steps) for _ in range(args.repeats)]
    cfg = configs["erm"]
    print(f"{args.dataset} / {cfg.model}, batch {cfg.batch_size}, 1 thread, load {os.getloadavg()[0]:.1f}, "
          f"{args.repeats} repeats; ratio to ERM, mean ± std over repeats")
    summary = {}
    for m in methods[1:]:
        cols = {k: [r[m][k] for r in reps] for k in ("compare_cpu", "compare_wall", "step_cost")}
        diff = [a - b for a, b in zip(cols["compare_cpu"], cols["step_cost"])]
        summary[m] = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "values": v} for k, v in {**cols, "cpu_minus_step_cost": diff}.items()}
        print(f"{m}: " + "  ".join(f"{k} {s['mean']:.2f} ± {s['std']:.2f}" for k, s in summary[m].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "model": cfg.model, "batch_size": cfg.batch_size,
                       "repeats": args.repeats, "summary": summary}, fh, indent=2)


if __name__ == "__main__":
    main()

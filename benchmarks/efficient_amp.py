"""Do the efficient AMP variants keep AMP's gain? ERM, exact AMP and each variant on MNIST-1D.

    python benchmarks/efficient_amp.py [--seeds 5] [--epochs 40] [--reuse-every 5]
                                       [--ascent-fraction 0.5] [--json OUT.json]

Every run goes through the trainer (`flatmin.train.train`, the dataset's protocol: cnn1d,
batch 100, SGD with Nesterov momentum). Prints test error (%), NLL and ECE as mean ± std over
the seeds, the training time, and for each variant the share of exact AMP's NLL improvement
over ERM that it keeps: (NLL_ERM − NLL_variant) / (NLL_ERM − NLL_AMP) (mean NLLs over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics

from flatmin.train import TrainConfig, train


def runs(k: int, f: float) -> dict[str, dict]:
    """The configurations compared: method and AMP variant fields of `TrainConfig`."""
    return {
        "erm": dict(method="erm"),
        "amp": dict(method="amp"),
        f"amp_reuse_k{k}": dict(method="amp", amp_variant="reuse", reuse_every=k),
        f"amp_subbatch_f{f:g}": dict(method="amp", amp_variant="subbatch", ascent_fraction=f),
        "amp_onepass": dict(method="amp", amp_variant="onepass"),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the dataset's protocol")
    parser.add_argument("--reuse-every", type=int, default=5)
    parser.add_argument("--ascent-fraction", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results: dict[str, list[dict]] = {}
    for name, fields in runs(args.reuse_every, args.ascent_fraction).items():
        for seed in range(args.seeds):
            cfg = TrainConfig(dataset=args.dataset, seed=seed, epochs=args.epochs, device=args.device,
                              **fields)
            r = train(cfg, progress=False)
            results.setdefault(name, []).append({**{k: r["test"][k] for k in ("error", "nll", "ece")},
                                                 "train_time_s": r["train_time_s"]})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name][-1].items()),
                  flush=True)

    summary = {name: {k: mean_std([r[k] for r in rs]) for k in rs[0]} for name, rs in results.items()}
    gain = summary["erm"]["nll"][0] - summary["amp"]["nll"][0]
    print(f"\n{args.dataset}, {args.seeds} seeds: test error (%), NLL, ECE (mean ± std); time; kept")
    for name, s in summary.items():
        kept = (summary["erm"]["nll"][0] - s["nll"][0]) / gain if gain and name != "erm" else None
        s["kept_of_amp_nll_gain"] = kept
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("error", "nll", "ece")]
        print(f"{name:20s} " + "  ".join(cells) + f"  {s['train_time_s'][0]:7.1f}s"
              + (f"  {100 * kept:6.1f}%" if kept is not None else ""))
    if gain <= 0:
        print("note: exact AMP did not improve on ERM's NLL here; the kept shares are not meaningful")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "runs": results}, fh, indent=2)


if __name__ == "__main__":
    main()

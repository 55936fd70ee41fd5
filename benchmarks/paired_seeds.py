"""Paired per-seed differences from a `flatmin compare` results.csv (a stopgap until compare reports them).

    python benchmarks/paired_seeds.py OUT/results.csv [REFERENCE_METHOD]

Runs of one seed share the data split and the initialisation, so each method is compared with the
reference seed by seed: mean ± std of the differences, a paired t-test (scipy's ``ttest_rel``) and
how many seeds the method has the lower test error.
"""

from __future__ import annotations

import csv
import statistics
import sys

from scipy import stats


def main() -> None:
    path, ref_name = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "erm"
    by: dict[str, dict[int, dict[str, str]]] = {}
    for row in csv.DictReader(open(path)):
        by.setdefault(row["method"], {})[int(row["seed"])] = row
    ref = by[ref_name]
    print(f"| method | Δ test error vs {ref_name} (pp) | p | Δ test NLL | p | Δ test ECE "
          "| lower error (seeds) |")
    print("|---|---|---|---|---|---|---|")
    for method, runs in by.items():
        if method == ref_name:
            continue
        seeds = sorted(set(runs) & set(ref))
        cells = [method]
        for key, fmt in (("test_error", "{:+.2f} ± {:.2f}"), ("test_nll", "{:+.3f} ± {:.3f}")):
            a, b = [float(runs[s][key]) for s in seeds], [float(ref[s][key]) for s in seeds]
            d = [x - y for x, y in zip(a, b)]
            p = stats.ttest_rel(a, b).pvalue
            cells += [fmt.format(statistics.fmean(d), statistics.stdev(d)), f"{p:.3f}"]
        ece = [float(runs[s]["test_ece"]) - float(ref[s]["test_ece"]) for s in seeds]
        lower = sum(float(runs[s]["test_error"]) < float(ref[s]["test_error"]) for s in seeds)
        cells += [f"{statistics.fmean(ece):+.3f}", f"{lower}/{len(seeds)}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

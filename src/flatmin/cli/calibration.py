"""`flatmin calibration RUN_DIR ... --out DIR` or `--db DB`: reliability diagrams and ECE bars per
method, the AMP paper's Fig. 7 (`flatmin.analysis.calibration`)."""

from __future__ import annotations

import argparse

from flatmin.analysis.calibration import db_records, label_records, plot_calibration, run_record, summarize
from flatmin.checks import out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.results.plot import write_csv, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin calibration`."""
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished flatmin train --out folders")
    parser.add_argument("--db", type=options.path, default=None,
                        help="a results database of flatmin grid/compare")
    parser.add_argument("--out", type=options.path, required=True,
                        help="folder for calibration.png/.csv/.json")


def run(args: argparse.Namespace) -> int:
    """Collect the runs, summarise per method, write figure and numbers."""
    if bool(args.runs) == bool(args.db):
        raise FlatminError("give either RUN_DIRs or --db DB")
    records = db_records(args.db) if args.db else [run_record(p) for p in args.runs]
    label_records(records)
    summary = summarize(records)
    out = out_dir(args.out)
    datasets = sorted({f"{r['dataset']}/{r['model']}" for r in records})
    rows = [{k: r[k] for k in ("label", "method", "dataset", "model", "seed", "ece", "error", "nll", "path")}
            for r in records]
    files = [write_csv(out / "calibration.csv", rows),
             write_json(out / "calibration.json", {"methods": summary, "runs": rows}),
             plot_calibration(summary, out / "calibration.png", ", ".join(datasets))]
    for label, s in summary.items():
        print(f"{label}: ECE {100 * s['ece_mean']:.2f} ± {100 * s['ece_std']:.2f} % over {s['n']} run(s), "
              f"test error {s['error_mean']:.2f}%")
    for f in files:
        print(f"wrote {f}")
    return 0

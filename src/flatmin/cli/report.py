"""`flatmin report DB`: Table 1 (methods × datasets) and Table 2 (augmentation × model, ERM vs AMP)
in Markdown, what tuning chose and on which split, and the figures, from a results database."""

from __future__ import annotations

import argparse

from flatmin.checks import check_out
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.experiments.report import render
from flatmin.results.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", type=options.path, help="results database written by flatmin grid or compare")
    parser.add_argument("--out", type=options.path, default=None, help="write report.md and PNGs here")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


def run(args: argparse.Namespace) -> int:
    """Print the report; with --out also write report.md and the figures."""
    if not args.db.is_file():
        raise FlatminError(f"no results database at {args.db}")
    if args.out is not None:
        check_out(args.out)
    store = Store(args.db, read_only=True)
    try:
        text = render(store, None if args.no_figures or args.out is None else args.out)
    finally:
        store.close()
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
    return 0

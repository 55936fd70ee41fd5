"""The `flatmin` command: one subcommand per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

from flatmin.errors import FlatminError

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flatmin.train.cli", "train one model with one method (the paper's protocol)"),
    "compare": ("flatmin.experiments.compare", "ERM vs AMP vs SAM over seeds: the main job"),
    "grid": ("flatmin.experiments.grid", "run a methods x datasets x ... x seeds grid into a results DB"),
    "report": ("flatmin.experiments.report", "paper-style tables and figures from a results DB"),
    "landscape": ("flatmin.analysis.landscape", "1-D/2-D loss landscapes of checkpoints (Fig. 2)"),
    "sharpness": ("flatmin.analysis.sharpness", "Hessian eigenvalue, trace and eps-sharpness of checkpoints"),
    "radius": ("flatmin.analysis.radius", "train AMP over a range of eps; loss vs radius (Fig. 8)"),
    "theory": ("flatmin.analysis.theory", "Theorem 1 / Corollary 2 on an inverted Gaussian (Figs. 3-4)"),
    "gradnorm": ("flatmin.analysis.gradnorm", "Theorem 2: gradient norm along ERM vs AMP training"),
    "spiral": ("flatmin.analysis.spiral", "decision boundaries of ERM vs AMP on the spiral (Fig. 6)"),
    "calibration": ("flatmin.analysis.calibration", "reliability diagrams and ECE bars (Fig. 7)"),
    "cost": ("flatmin.analysis.cost", "per-epoch wall-time ratio of AMP/SAM/RMP to ERM (Sec. 5.5)"),
}


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; subcommand parsers are filled in lazily by `main`."""
    parser = argparse.ArgumentParser(prog="flatmin", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; user errors print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"flatmin {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except FlatminError as err:
        print(f"flatmin {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flatmin {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

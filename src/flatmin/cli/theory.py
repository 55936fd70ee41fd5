"""`flatmin theory --out DIR`: Theorem 1 found by flatmin's own AMP on an inverted Gaussian, and
Corollary 2's operational region, the AMP paper's Figs. 3-4 (`flatmin.analysis.theory`)."""

from __future__ import annotations

import argparse

from flatmin.analysis.theory import plot_region, plot_theorem1, theorem1
from flatmin.checks import POSITIVE, POSITIVE_INT, out_dir
from flatmin.cli import options
from flatmin.errors import FlatminError
from flatmin.results.plot import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flatmin theory`."""
    parser.add_argument("--out", type=options.path, required=True,
                        help="folder for the figures and theory.json")
    parser.add_argument("--epsilon", type=POSITIVE, default=0.5, help="AMP radius for Theorem 1")
    parser.add_argument("--steps", type=POSITIVE_INT, default=300, help="AMP steps for Theorem 1")


def run(args: argparse.Namespace) -> int:
    """Theorem 1 by flatmin.AMP, Corollary 2's region; figures + numbers."""
    if args.epsilon <= 0 or args.steps < 1:
        raise FlatminError("--epsilon must be > 0 and --steps >= 1")
    out = out_dir(args.out)
    result = theorem1(args.epsilon, args.steps)
    files = [plot_theorem1(result, out / "theorem1.png"), plot_region(out / "corollary2.png")]
    numbers = {k: v for k, v in result.items() if k != "trajectory"}
    files.append(write_json(out / "theory.json", {"theorem1": numbers}))
    print(f"Theorem 1 (eps={args.epsilon:g}): theta={result['theta_found'].tolist()} "
          f"mu={result['mu'].tolist()} |theta-mu|={result['theta_error']:.2e}; "
          f"AMP loss {result['amp_loss_found']:.8f} vs closed form {result['amp_loss_closed_form']:.8f} "
          f"(error {result['value_error']:.2e})")
    for f in files:
        print(f"wrote {f}")
    return 0

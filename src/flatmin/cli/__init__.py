"""The `flatmin` command: one subcommand per module, imported only when used.

This is the one error boundary: what a user can cause (an argument, a path, a permission, a full
disk, a device, a config or store file) ends in one line on stderr with a stable exit code, 2 for
bad usage and 1 for a failed run; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sqlite3
import sys
import warnings

from flatmin.errors import FAILED, USAGE, FlatminError, one_line_warnings

# This package is the top of the import graph: the dispatcher (here), the shared options
# (`flatmin.cli.options`) and one module per command; nothing in the library imports it.

# name -> (module, one-line help). Each module, one per command in `flatmin.cli`, defines
# `add_arguments(parser)` and `run(args) -> int`; only this dispatcher imports them.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flatmin.cli.train", "train one model with one method (the paper's protocol)"),
    "compare": ("flatmin.cli.compare", "ERM vs AMP vs SAM over seeds: the main job"),
    "grid": ("flatmin.cli.grid", "run a methods x datasets x ... x seeds grid into a results DB"),
    "report": ("flatmin.cli.report", "paper-style tables and figures from a results DB"),
    "landscape": ("flatmin.cli.landscape", "1-D/2-D loss landscapes of checkpoints (Fig. 2)"),
    "sharpness": ("flatmin.cli.sharpness", "Hessian eigenvalue, trace and eps-sharpness of checkpoints"),
    "radius": ("flatmin.cli.radius", "train AMP over a range of eps; loss vs radius (Fig. 8)"),
    "theory": ("flatmin.cli.theory", "Theorem 1 / Corollary 2 on an inverted Gaussian (Figs. 3-4)"),
    "gradnorm": ("flatmin.cli.gradnorm", "Theorem 2: gradient norm along ERM vs AMP training"),
    "spiral": ("flatmin.cli.spiral", "decision boundaries of ERM vs AMP on the spiral (Fig. 6)"),
    "calibration": ("flatmin.cli.calibration", "reliability diagrams and ECE bars (Fig. 7)"),
    "cost": ("flatmin.cli.cost", "per-epoch wall-time ratio of AMP/SAM/RMP to ERM (Sec. 5.5)"),
}


# OSErrors a user causes: (exit code, what to do). Others (EIO, EBADF, ...) are left to show a traceback.
OS_ERRORS = {
    errno.ENOSPC: (FAILED, "free some space and re-run the same command (finished work is kept)"),
    errno.EDQUOT: (FAILED, "free some space and re-run the same command (finished work is kept)"),
    errno.EACCES: (USAGE, "choose a path you may write"),
    errno.EPERM: (USAGE, "choose a path you may write"),
    errno.EROFS: (USAGE, "choose a path on a writable file system"),
    errno.ENOENT: (USAGE, "check the path"),
    errno.ENOTDIR: (USAGE, "a part of the path is a file, not a folder"),
    errno.EISDIR: (USAGE, "give a file, not a folder"),
    errno.EEXIST: (USAGE, "a file is in the way; choose another path"),
    errno.ENAMETOOLONG: (USAGE, "choose a shorter path"),
}


class UsageError(Exception):
    """Raised by a subcommand's parser instead of printing its usage and exiting."""


class _Parser(argparse.ArgumentParser):
    """argparse without the multi-line usage dump: the dispatcher prints one line instead."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _one_line(text: str) -> str:
    """Collapse a message (a parser's, say) onto one line."""
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; subcommand parsers are filled in lazily by `main`."""
    parser = argparse.ArgumentParser(prog="flatmin", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; a user-caused failure prints one line, exit 2 (usage) or 1 (failed run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    prog = f"flatmin {name}"
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warnings(prog, warnings.showwarning)
        try:
            code = _dispatch(name, rest)
            sys.stdout.flush()  # here, not at exit, so that a reader who left is met below
            return code
        except BrokenPipeError:
            return _closed_pipe()


def _closed_pipe() -> int:
    """`flatmin ... | head`: the reader left; stop quietly (no traceback, nothing more written to stdout)."""
    try:  # Python would flush stdout again at exit and print an error: point it at /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in a test)
        pass
    return 141  # 128 + SIGPIPE: what a shell reports for a process a closed pipe ended


def _dispatch(name: str, rest: list[str]) -> int:
    """Run one subcommand behind the one error boundary."""
    module = importlib.import_module(COMMANDS[name][0])
    prog = f"flatmin {name}"
    parser = _Parser(prog=prog, description=COMMANDS[name][1])
    module.add_arguments(parser)
    try:
        return int(module.run(parser.parse_args(rest)) or 0)
    except UsageError as err:
        return _fail(prog, f"{err} (see {prog} --help)", USAGE)
    except FlatminError as err:
        return _fail(prog, str(err), err.exit_code)
    except OSError as err:
        if err.errno not in OS_ERRORS:
            raise
        code, hint = OS_ERRORS[err.errno]
        where = f"{err.filename}: " if err.filename else ""
        return _fail(prog, f"{where}{err.strerror or err}; {hint}", code)
    except sqlite3.DatabaseError as err:  # a store error that escaped flatmin.results.store's own checks
        hint = (OS_ERRORS[errno.ENOSPC][1] if "full" in str(err) else "move it aside and re-run the command "
                "that wrote it (finished runs are read back from their folders)")
        return _fail(prog, f"results database: {err}; {hint}", FAILED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _fail(prog: str, message: str, code: int) -> int:
    """The one line a user sees, and the exit code."""
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    return code

"""User-facing errors: one clear message, a non-zero exit from the CLI.

Exit codes are stable: 2 for bad usage (an argument, a name, a file the user pointed at), 1 for a
run that failed (a grid with runs missing, a non-finite loss, a full disk, a damaged store).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

USAGE, FAILED = 2, 1


class FlatminError(Exception):
    """A problem with the user's input (argument, name, file) that the CLI reports in one line."""

    exit_code = USAGE


class UnknownNameError(FlatminError, KeyError):
    """An unknown registry name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class NonFiniteLossError(FlatminError, FloatingPointError):
    """Training produced a NaN/inf loss; parameters and the last checkpoint are left intact."""

    exit_code = FAILED


class ConfigError(FlatminError, ValueError):
    """A configuration value out of range; the message names the field."""


class RunFailedError(FlatminError):
    """Work that started but did not finish (runs missing from a grid); the message names what."""

    exit_code = FAILED


class StoreError(FlatminError):
    """A results store that cannot be used safely; nothing was written to it."""

    exit_code = FAILED


class FlatminWarning(UserWarning):
    """Input flatmin accepts but a user likely did not mean (labels that skip a class id); the CLI
    prints it on one line."""


def one_line_warnings(prog: str, show: Callable[..., Any]) -> Callable[..., Any]:
    """A ``warnings.showwarning`` that prints flatmin's own warnings as one line (``flatmin train:
    warning: ...``) and leaves every other warning to ``show``: the CLI and its worker processes."""

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, FlatminWarning):
            print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning

"""Value rules: one validated type per kind of number, shared by the optimizers' registry, the
configuration and the command line, so a value is checked by one rule wherever it comes from.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from flatmin.errors import ConfigError


@dataclass(frozen=True)
class Number:
    """A finite int or float in [lo, hi] (either end open or absent)."""

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """Say the rule in words, for the message that rejects a value."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return (f"{what} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        return what

    def check(self, value: Any, name: str) -> int | float:
        """The value if it obeys the rule, else a ConfigError naming ``name``."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            self.kind is float or isinstance(value, int)) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        return self.kind(value)

    def __call__(self, text: str) -> int | float:
        """argparse ``type=``: parse, then check; the message says what was expected."""
        try:
            return self.check(self.kind(text), "value")
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None


POSITIVE_INT = Number(int, 1)  # batch sizes, epochs, iterations, counts
COUNT = Number(int, 0)  # seeds
FINITE = Number(float)
NONNEGATIVE = Number(float, 0)  # radii, decay, step sizes of a perturbation
POSITIVE = Number(float, 0, lo_open=True)  # learning rates, spans, sharpness radii
FRACTION = Number(float, 0, 1, hi_open=True)  # a share held out or dropped
SHARE = Number(float, 0, 1, lo_open=True)  # a share used: (0, 1]


@dataclass(frozen=True)
class Choice:
    """One of a few named values (a ball, a variant): the rule for a string option."""

    values: tuple[str, ...]

    def describe(self) -> str:
        """Say the rule in words."""
        return "one of " + ", ".join(self.values)

    def check(self, value: Any, name: str) -> str:
        """The value if it is one of the choices, else a ConfigError naming ``name``."""
        if value not in self.values:
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def __call__(self, text: str) -> str:
        """argparse ``type=``."""
        try:
            return self.check(text.strip(), "value")
        except ConfigError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None


@dataclass(frozen=True)
class Flag:
    """True or False (a switch of a rule, such as WSAM's ``decouple``)."""

    def describe(self) -> str:
        """Say the rule in words."""
        return "true or false"

    def check(self, value: Any, name: str) -> bool:
        """The value if it is a bool, else a ConfigError naming ``name``."""
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value

    def __call__(self, text: str) -> bool:
        """argparse ``type=``: true/false, yes/no, 1/0."""
        low = text.strip().lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


UNIT = Number(float, 0, 1)  # a weight or decay in [0, 1]

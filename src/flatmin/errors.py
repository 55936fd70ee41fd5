"""User-facing errors: one clear message, a non-zero exit from the CLI."""

from __future__ import annotations


class FlatminError(Exception):
    """A problem with the user's input (argument, name, file) that the CLI reports in one line."""


class UnknownNameError(FlatminError, KeyError):
    """An unknown registry name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class NonFiniteLossError(FlatminError, FloatingPointError):
    """Training produced a NaN/inf loss; parameters and the last checkpoint are left intact."""


class ConfigError(FlatminError, ValueError):
    """A configuration value out of range; the message names the field."""

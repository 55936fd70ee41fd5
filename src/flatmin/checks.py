"""Value rules: one validated type per kind of number, shared by the optimizers' registry, the
configuration and the command line, so a value is checked by one rule wherever it comes from.

Below them, the checks any command makes before work starts whatever library it drives: a device
this machine has, an output folder that can be written, a list of seeds. They sit here, at the
bottom of the import graph, so that experiments and analyses call them without importing the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flatmin.errors import ConfigError, FlatminError


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
            return parse_number(self, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def parse_number(rule: Any, text: str) -> Any:
    """A value written as text (a flag, a ``--tune`` value), by its rule (a number, a choice, a switch);
    a ConfigError says what was expected."""
    if not isinstance(rule, Number):
        return rule.parse(text)
    try:
        return rule.check(rule.kind(text), "value")
    except (ValueError, ConfigError):
        raise ConfigError(f"expected {rule.describe()}, got {text!r}") from None


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

    def parse(self, text: str) -> str:
        """The choice written as text (a ConfigError says what was expected)."""
        if text.strip() not in self.values:
            raise ConfigError(f"expected {self.describe()}, got {text!r}")
        return text.strip()

    def __call__(self, text: str) -> str:
        """argparse ``type=``."""
        try:
            return self.parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


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

    def parse(self, text: str) -> bool:
        """true/false, yes/no, 1/0 (a ConfigError otherwise)."""
        low = text.strip().lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}")

    def __call__(self, text: str) -> bool:
        """argparse ``type=``."""
        try:
            return self.parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


UNIT = Number(float, 0, 1)  # a weight or decay in [0, 1]

# Sizes a user gives or a file declares, bounded before anything is allocated: past these a run
# segfaults (OpenMP's per-thread stacks), or asks for more memory than any machine has.
THREADS = Number(int, 1, max(os.cpu_count() or 1, 1))  # torch CPU threads: at most the machine's CPUs
MAX_SEEDS = 10_000  # seeds of one comparison or grid
MAX_CLASSES = 100_000  # class ids 0..99999 (a label is an index into the model's output)
IMAGE_SIZE = Number(int, 1, 4096)  # --image-size N: N x N pixels


def memory_limit() -> int:
    """The most bytes flatmin allocates for one dataset: half of this machine's memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not Linux/macOS: 8 GiB
        return 8 << 30


def check_bytes(nbytes: int, what: str) -> None:
    """A FlatminError naming the limit when ``what`` would need more than `memory_limit` bytes."""
    if nbytes > (limit := memory_limit()):
        raise FlatminError(f"{what} needs {nbytes / 2**30:,.1f} GiB; flatmin reads at most "
                           f"{limit / 2**30:,.1f} GiB per dataset (half this machine's memory)")


def name_list(text: str, flag: str) -> list[str]:
    """``a,b`` -> [a, b]; a list with no name (``''``, ``,``) is a ConfigError, never 'all' or 'none'."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{flag} {text!r}: name at least one")
    return names


def check_device(text: str) -> str:
    """A device this machine has; anything else a ConfigError saying what is available."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {text!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {text!r}: flatmin runs on cpu, cuda or mps")
    return text


def check_out(folder: str | Path, flag: str = "--out") -> Path:
    """A folder that exists and is writable, or could be created: checked, nothing created."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == folder and not folder.is_dir():
        raise FlatminError(f"{flag} {folder} is a file, not a folder; choose a folder")
    if not probe.is_dir():
        raise FlatminError(f"{flag} {folder}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlatminError(f"{flag} {folder}: no permission to write in {probe}; choose a writable folder")
    return folder


def out_dir(folder: str | Path, flag: str = "--out") -> Path:
    """The output folder, checked and created."""
    folder = check_out(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FlatminError(f"{flag} {folder}: cannot create it ({err.strerror})") from None
    return folder


def check_seeds(value: Any, where: str) -> list[int]:
    """A count (>= 1) or a non-empty list of distinct seeds (>= 0), as seeds; at most `MAX_SEEDS`."""
    n = value if isinstance(value, int) and not isinstance(value, bool) else (
        len(value) if isinstance(value, list) else 0)
    if n > MAX_SEEDS:
        raise ConfigError(f"{where} asks for {n} seeds; at most {MAX_SEEDS} seeds per run of flatmin")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return value
    raise ConfigError(f"{where} must be a count >= 1 or a list of distinct seeds >= 0, got {value!r}")


def parse_seeds(spec: str, flag: str = "--seeds") -> list[int]:
    """``5`` -> seeds 0..4; ``0,3,7`` -> those seeds."""
    try:
        seeds = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: expected a count (5) or a list (0,3,7)") from None
    return check_seeds(seeds[0] if len(seeds) == 1 and "," not in spec else seeds, f"{flag} {spec!r}:")


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def digest(obj: Any) -> str:
    """sha256 of a payload's content (tensors' dtype, shape and bytes; plain values by repr), the same
    after a torch.save/torch.load round trip on any device: what a checkpoint or cache entry carries so
    that a byte flipped on disk is caught at load instead of used."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}:".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)}:".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()

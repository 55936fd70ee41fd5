"""What every saved result records about where it came from: git commit, library versions, threads, BLAS."""

from __future__ import annotations

import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy
import torch

from flatmin._version import __version__


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the flatmin checkout that produced a result ("+dirty" if modified), or None."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def versions() -> dict[str, str | int]:
    """Library versions, and what else can change a number on a CPU: the thread count (a run that
    collapses with 1 thread may not with 2), the kernels' instruction set and torch's BLAS."""
    return {"flatmin": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": _torch_blas()}


@lru_cache(maxsize=1)
def _torch_blas() -> str:
    """The BLAS torch was built with (its build settings' BLAS_INFO), "unknown" if it does not say."""
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


def device_name(device: torch.device | str) -> str:
    """A human name for the device a result was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

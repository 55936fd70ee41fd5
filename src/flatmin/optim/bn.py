"""Batch-norm running statistics belong to the unperturbed model.

The perturbed passes of AMP/SAM/RMP evaluate θ+Δ; letting them update BatchNorm's running
mean/variance would make the evaluation-time statistics those of a model that is never used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside: BatchNorm normalises with batch statistics but leaves its running stats untouched."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True

"""The trainer's own epochs, interleaved and timed: what a method's step costs, from CPU time.

Shared by `flatmin cost` (analysis) and `flatmin compare`'s cost column (experiments), so it lives
below both. Every contender is built as `flatmin.train.train` builds a run (minus files and
evaluation) and trained an epoch at a time in turn, so load drift hits all alike.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flatmin.data import load_dataset
from flatmin.models import create_model
from flatmin.train.config import resolve
from flatmin.train.distributed import current
from flatmin.train.loop import StepContext, lr_at, run_epoch
from flatmin.train.methods import get_method


class Cancelled(Exception):
    """A measurement told to stop before it finished."""


@dataclass
class Contender:
    """One method's model, optimizer and step context, trained an epoch at a time."""
    method: str
    model: nn.Module
    opt: torch.optim.Optimizer
    ctx: Any  # flatmin.train.loop.StepContext
    times: list[float]
    passes: list[float]  # forward passes per step, per epoch
    forwards: int = 0
    cpu_times: list[float] = field(default_factory=list)
    steps: int = 0  # optimizer steps per epoch


def _contender(cfg: Any, ds: Any, input_range: float) -> Contender:
    """Build what `flatmin.train.train` builds for one method, minus files and evaluation."""
    method = get_method(cfg.method)
    cfg = resolve(cfg, ds.defaults, ds.default_model)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=ds.num_classes, in_channels=ds.input_shape[0],
                         input_shape=ds.input_shape, dropout=cfg.dropout if method.dropout else 0.0)
    model.to(device)
    opt = method.build_optimizer(model.parameters(), cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ctx = StepContext(cfg, method, scaler, device, input_range, current(device))
    c = Contender(cfg.method, model, opt, ctx, [], [])

    def count(module: nn.Module, inputs: Any) -> None:
        c.forwards += 1

    model.register_forward_pre_hook(count)
    return c


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_clock() -> Callable[[], float]:
    """This thread's CPU time when torch runs on one thread (every kernel then runs on the calling thread,
    and another thread of the process does not count), else the whole process's."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def measure_configs(configs: list[Any], epochs: int, stop: threading.Event | None = None) -> list[Contender]:
    """One contender per config (same data as the first), 1 + epochs interleaved epochs each; wall
    and CPU time (`cpu_clock`) of every epoch but the first (CPU time ignores waits for a busy core).
    ``stop``: checked before every epoch; once set, `Cancelled` is raised."""
    base = configs[0].replace(epochs=epochs + 1)
    ds = load_dataset(base.dataset, data_dir=base.data_dir, val_fraction=base.val_fraction, seed=base.seed,
                      augment=base.augment, download=base.download, **base.dataset_options)
    device = torch.device(base.device)
    ds.train.x, ds.train.y = ds.train.x.to(device), ds.train.y.to(device)
    sample = ds.transform(ds.train.x[:2048], False)
    input_range = float(sample.max() - sample.min())
    contenders = [_contender(c.replace(epochs=epochs + 1), ds, input_range) for c in configs]
    steps = -(-len(ds.train) // contenders[0].ctx.cfg.batch_size)
    clock = cpu_clock()
    for epoch in range(epochs + 1):
        k = epoch % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            if stop is not None and stop.is_set():
                raise Cancelled("the step-cost measurement was cancelled")
            for group in c.opt.param_groups:
                group["lr"] = lr_at(c.ctx.cfg, epoch)
            c.forwards = 0
            _sync(device)
            t0, cpu0 = time.perf_counter(), clock()
            run_epoch(c.model, c.model, c.opt, ds, epoch, c.ctx, progress=False)
            _sync(device)
            if epoch > 0:
                c.times.append(time.perf_counter() - t0)
                c.cpu_times.append(clock() - cpu0)
                c.passes.append(c.forwards / steps)
    for c in contenders:
        c.steps = steps
    return contenders

"""What the optimizer and trainer tests share: tiny seeded models, fixed batches, the closures the
optimizers are called with, and the building blocks of the papers' plain loops (the gradient at given
weights, the base step from θ). The float64 fixture is `float64` in conftest.py."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.train import TrainConfig
from flatmin.train.distributed import SingleProcess
from flatmin.train.loop import StepContext
from flatmin.train.methods import get_method

SGD_KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)
EPS, ZETA = 0.05, 0.5  # clipped and unclipped ascents both occur
BASES = {
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)),
    "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)),
}
TINY = 1e-12


def tiny_model(seed: int = 0, sizes: tuple[int, int, int] = (5, 7, 3), norm: nn.Module | None = None
               ) -> nn.Module:
    """in → hidden → tanh → out, seeded; ``norm`` (BatchNorm, Identity) goes after the first layer."""
    torch.manual_seed(seed)
    d_in, hidden, d_out = sizes
    return nn.Sequential(nn.Linear(d_in, hidden), *([norm] if norm is not None else []), nn.Tanh(),
                         nn.Linear(hidden, d_out))


def batches(n_steps: int = 8, seed: int = 1, batch: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (x, y) batches for `tiny_model`'s default sizes: 5 features, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n_steps)]


def fixed_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of n examples, 4 features, every one of 3 classes."""
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3


def make_closure(model, opt, x, y, calls=None):
    """The closure of `step(closure)` returning (outputs, loss); ``calls`` collects each loss."""
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if calls is not None:
            calls.append(loss.detach())
        return out, loss
    return closure


def closure_for(model, opt, x, y, calls=None):
    """The documented closure: slices the batch itself when told it serves an ascent pass."""
    def closure(ascent=False):
        n = opt.ascent_size(len(x)) if ascent else len(x)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[:n]), y[:n])
        loss.backward()
        if calls is not None:
            calls.append((ascent, n))
        return loss
    return closure


def run(model, opt, data):
    """`opt.step(closure_for(...))` over the batches."""
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))
    return model


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def ctx_for(accumulate: int = 1) -> StepContext:
    """The trainer's step context for ERM on the CPU, one process, no loss scaling."""
    cfg = TrainConfig(accumulate=accumulate)
    return StepContext(cfg, get_method("erm"), torch.amp.GradScaler("cpu", enabled=False),
                       torch.device("cpu"), 1.0, SingleProcess())


def base_step_at_theta(params, theta, grads, base) -> None:
    """The base optimizer's update from θ with gradients taken at the perturbed point."""
    with torch.no_grad():
        for p, t, g in zip(params, theta, grads):
            p.copy_(t)
            p.grad = g
    base.step()


class Loop:
    """What every reference needs: the gradient at given weights, norms, the base step from θ."""

    def __init__(self, model, base_cls=None, base_kw=None):
        self.model, self.params = model, list(model.parameters())
        self.base = base_cls(self.params, **base_kw) if base_cls is not None else None

    def grad_at(self, values, x, y):
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)
        return list(torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params))

    def theta(self):
        return [p.detach().clone() for p in self.params]

    def step_from(self, theta, direction):
        with torch.no_grad():
            for p, t, d in zip(self.params, theta, direction):
                p.copy_(t)
                p.grad = d.clone()
        self.base.step()


def norm(ts):
    return math.sqrt(sum(float(t.pow(2).sum()) for t in ts))


def dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b))


def free_port() -> int:
    """A loopback port nobody is listening on (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, args: tuple, answers: str, timeout: float, world_size: int = 2,
                what: str = "ranks") -> list:
    """``worker(rank, world_size, port, *args, answers)`` on spawned ranks, bounded in time (a bound, not a
    timing assertion); each rank writes JSON to ``answers.<rank>``, returned in rank order."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world_size, free_port(), *args, answers), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    return [json.loads(Path(f"{answers}.{r}").read_text()) for r in range(world_size)]


# --- what the rules' reference tests share (tests/test_<rule>.py) ------------------------------------


def rule_net(seed: int = 0) -> nn.Module:
    """The float64 5-7-3 MLP a rule's reference test trains (the same weights for the loop and the rule)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def rule_batches(n: int, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n float64 batches of 10 examples, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
            for _ in range(n)]


def closure_steps(opt, model: nn.Module, data) -> int:
    """``opt.step(closure)`` on every batch (cross-entropy); returns how many passes the closure ran."""
    passes = 0
    for x, y in data:
        def closure(x=x, y=y):
            nonlocal passes
            passes += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return passes

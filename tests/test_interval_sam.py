"""Interval SAM against a float64 loop written from Composer's SAMOptimizer (a step counter from 0;
SAM's two passes when it is a multiple of the interval, the base optimizer's one pass otherwise)."""

from __future__ import annotations

import torch
from tests.helpers import closure_steps
from tests.helpers import rule_batches as batches
from tests.helpers import rule_net as net
from torch import nn
from torch.nn import functional as F

import flatmin
from flatmin import SAM, IntervalSAM


def composer_loop(model: nn.Module, data, rho: float, interval: int) -> None:
    """SAM every `interval` steps: e = ρ·g/(‖g‖ + 1e-12) from θ, the gradient at θ + e, θ back, SGD step."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step, (x, y) in enumerate(data):
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step % interval == 0:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
                theta = [p.detach().clone() for p in params]
                for p in params:
                    p.add_(p.grad * (rho / (norm + 1e-12)))
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
        sgd.step()


def flatmin_loop(model: nn.Module, data, **kw) -> int:
    opt = IntervalSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw)
    return closure_steps(opt, model, data)


def test_matches_the_composer_loop_and_costs_one_plus_one_over_k():
    data = batches(7)
    ours, theirs = net(), net()
    passes = flatmin_loop(ours, data, rho=0.1, interval=3)
    composer_loop(theirs, data, rho=0.1, interval=3)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert passes == 7 + 3  # SAM steps at 0, 3, 6


def test_interval_one_is_sam_bit_for_bit():
    data = batches(4)
    ours, sam = net(), net()
    flatmin_loop(ours, data, rho=0.1, interval=1)
    opt = SAM(sam.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    closure_steps(opt, sam, data)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), sam.parameters()))


def test_registered_everywhere_without_another_edit():
    """The registry made it public, a create_optimizer name, a trainer method and a flag."""
    from flatmin.cli.options import OPTIONS
    from flatmin.train import METHODS

    opt = flatmin.create_optimizer(net(), "interval_sam", lr=0.1, rho=0.05, interval=4)
    assert isinstance(opt, IntervalSAM) and opt.interval == 4
    assert "interval_sam" in METHODS and OPTIONS["--sam-interval"][0] == "sam_interval"

"""VaSSO against a float64 loop written from the authors' algorithm (BingcongLi/VaSSO, checked against
solver/vasso.py, ``VASSO.first_step``: d starts as the first gradient, then d ← (1−θ)·d + θ·g; the
ascent ρ·d/‖d‖ with one norm; the base step from x with the gradient at x + ε), and its reductions:
θ = 1 is SAM bit for bit, ρ = 0 the base optimizer."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import rule_batches as batches
from tests.helpers import rule_net as net
from torch import nn
from torch.nn import functional as F

import flatmin
from flatmin import SAM, VaSSO

BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def authors_loop(model: nn.Module, data, rho: float, theta: float, adaptive: bool = False) -> None:
    """d = g_1, then d ← (1−θ)d + θg; x + ρ·T²d/(‖Td‖ + 1e-12) (T = |x| with adaptive: flatmin's
    extension, not the authors'); the gradient there; x back; SGD step from x."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **BASE)
    d = None
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            if d is None:
                d = [p.grad.clone() for p in params]
            else:
                for di, p in zip(d, params):
                    di.mul_(1 - theta).add_(p.grad, alpha=theta)
            t = [p.abs() if adaptive else torch.ones_like(p) for p in params]
            norm = torch.linalg.vector_norm(torch.stack([(ti * di).norm() for ti, di in zip(t, d)]))
            saved = [p.detach().clone() for p in params]
            for p, ti, di in zip(params, t, d):
                p.add_(ti * ti * di * (rho / (norm + 1e-12)))
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        sgd.step()


def run(model: nn.Module, opt, data, poison_first: bool = False) -> int:
    """``opt.step(closure)`` over the batches (the first step's losses NaN when asked); the passes made."""
    passes = 0
    for t, (x, y) in enumerate(data):
        def closure(x=x, y=y, t=t):
            nonlocal passes
            passes += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if poison_first and t == 0:
                loss = loss * float("nan")
            loss.backward()
            return loss
        opt.step(closure)
    return passes


@pytest.mark.parametrize("theta, adaptive", [(0.9, False), (0.3, False), (0.5, True)])
def test_matches_the_authors_loop_with_two_passes_a_step(theta, adaptive):
    data = batches(7)
    ours, theirs = net(), net()
    opt = VaSSO(ours.parameters(), torch.optim.SGD, rho=0.1, theta=theta, adaptive=adaptive, **BASE)
    passes = run(ours, opt, data)
    authors_loop(theirs, data, rho=0.1, theta=theta, adaptive=adaptive)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert passes == 2 * 7


def test_a_skipped_first_step_leaves_d_unstarted():
    """A NaN first step changes nothing; the next one starts d from its own gradient, as the authors'
    loop started on the batches after it."""
    data = batches(5)
    ours, theirs = net(), net()
    opt = VaSSO(ours.parameters(), torch.optim.SGD, rho=0.1, theta=0.4, nonfinite="skip", **BASE)
    run(ours, opt, data, poison_first=True)
    authors_loop(theirs, data[1:], rho=0.1, theta=0.4)
    assert opt.skipped_steps == 1
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_theta_one_is_sam_bit_for_bit():
    data = batches(5)
    ours, sam = net(), net()
    run(ours, VaSSO(ours.parameters(), torch.optim.SGD, rho=0.1, theta=1.0, **BASE), data)
    run(sam, SAM(sam.parameters(), torch.optim.SGD, rho=0.1, **BASE), data)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), sam.parameters()))


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    data = batches(5)
    ours, plain = net(), net()
    run(ours, VaSSO(ours.parameters(), torch.optim.SGD, rho=0.0, theta=0.5, **BASE), data)
    sgd = torch.optim.SGD(plain.parameters(), **BASE)
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), plain.parameters()))


def test_registered_everywhere_without_another_edit():
    """The registry made it public, a create_optimizer name, a trainer method and a flag."""
    from flatmin.cli.options import OPTIONS
    from flatmin.train import METHODS

    opt = flatmin.create_optimizer(net(), "vasso", lr=0.1, rho=0.05, theta=0.5)
    assert isinstance(opt, VaSSO) and opt.param_groups[0]["theta"] == 0.5
    assert "vasso" in METHODS and OPTIONS["--vasso-theta"][0] == "vasso_theta"

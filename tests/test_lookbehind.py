"""Lookbehind-SAM against a float64 loop written from the authors' algorithm (chandar-lab/Lookbehind-SAM,
lookbehind.py's LookbehindSAM driven as example_cifar.py drives it: on one batch, k × [ascent from the
perturbed point; descent of the fast weights with the gradient there], then θ ← slow + α·(fast − slow)),
and its exact reductions (k = 1, α = 1 ≡ SAM; ρ = 0, α·k = 1 ≡ the base optimizer)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import closure_steps
from tests.helpers import rule_batches as batches
from tests.helpers import rule_net as net
from torch import nn
from torch.nn import functional as F

import flatmin
from flatmin import SAM, LookbehindSAM

LR = 0.1


def grads_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """∇f at the model's current weights."""
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def authors_loop(model: nn.Module, data, rho: float, k: int, alpha: float | None, **sgd) -> None:
    """The authors' algorithm, 2k passes a batch: k × [g at θ', θ' += ρ·g/(‖g‖ + 1e-12); g at θ'; one
    SGD step of the fast weights], then per tensor θ ← α·fast + (1 − α)·slow; ``alpha=None`` is their
    adaptive α = (1 + cos(fast₁ − slow, fast_k − slow))/2 (their alpha = -1). Their guard is 1e-16;
    1e-12 here is flatmin's (the docstring's difference), so the comparison is to rounding."""
    params = list(model.parameters())
    fast = [p.detach().clone().requires_grad_(True) for p in params]  # the base optimizer's weights
    opt = torch.optim.SGD(fast, lr=LR, **sgd)  # its state lives across batches, as theirs
    for x, y in data:
        slow = [p.detach().clone() for p in params]
        with torch.no_grad():
            for f, s in zip(fast, slow):
                f.copy_(s)
        first = None
        for i in range(k):
            g = grads_at(model, x, y)  # ascent gradient, at the perturbed point θ'
            norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(t * (rho / (norm + 1e-12)))
            for f, t in zip(fast, grads_at(model, x, y)):  # descent gradient, at the new θ'
                f.grad = t
            opt.step()
            if i == 0:
                first = [f.detach().clone() for f in fast]
        with torch.no_grad():
            for p, f, s, f1 in zip(params, fast, slow, first):
                a = alpha
                if a is None:
                    cos = F.cosine_similarity((f1 - s).flatten(), (f - s).flatten(), dim=0)
                    a = (cos + 1) / 2
                p.copy_(f * a + s * (1 - a))


def one_step_loop(model: nn.Module, data, rho: float, k: int, alpha: float, **sgd) -> None:
    """The docstring's form, k + 1 passes a batch: the same θ'_i, then ONE SGD step from θ along α·Σ g'_i."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, **sgd)
    for x, y in data:
        theta = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        for i in range(k + 1):
            g = grads_at(model, x, y)  # g'_i at θ'_i
            if i >= 1:
                total = [a + b for a, b in zip(total, g)]
            if i < k:
                norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
                with torch.no_grad():
                    for p, t in zip(params, g):
                        p.add_(t * (rho / (norm + 1e-12)))
        with torch.no_grad():
            for p, t, d in zip(params, theta, total):
                p.copy_(t)
                p.grad = d * alpha
        opt.step()


def flatmin_loop(model: nn.Module, data, **kw) -> int:
    """``step(closure)`` on every batch; returns the number of passes taken."""
    opt = LookbehindSAM(model.parameters(), torch.optim.SGD, lr=LR, **kw)
    return closure_steps(opt, model, data)


def close(a: nn.Module, b: nn.Module, atol: float = 1e-14) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("alpha", [0.5, None], ids=["alpha=0.5", "adaptive"])
def test_matches_the_authors_loop_under_gradient_descent_in_k_plus_one_passes(alpha):
    """Plain SGD (the paper's form): the authors' k fast steps + interpolation is one step along α·Σ g'_i."""
    data = batches(6)
    ours, theirs = net(), net()
    kw = {"alpha": alpha} if alpha is not None else {"adaptive_alpha": True}
    passes = flatmin_loop(ours, data, rho=0.1, k=3, **kw)
    authors_loop(theirs, data, rho=0.1, k=3, alpha=alpha)
    close(ours, theirs)
    assert passes == 6 * (3 + 1)  # the authors take 2k = 6: their ascent i+1 recomputes descent i's gradient


@pytest.mark.parametrize("k", [2, 3])
def test_adaptive_alpha_matches_the_authors_for_k_2_too(k):
    """k = 2 keeps no g'₁ apart (it is the sum): the same numbers as the authors'."""
    data = batches(4)
    ours, theirs = net(), net()
    flatmin_loop(ours, data, rho=0.05, k=k, adaptive_alpha=True)
    authors_loop(theirs, data, rho=0.05, k=k, alpha=None)
    close(ours, theirs)


def test_with_momentum_and_decay_one_base_step_per_batch():
    """SGD with momentum and weight decay: flatmin is the one-step form (its documented difference from the
    authors, whose base optimizer steps k times a batch on the fast weights), not the authors' loop."""
    data = batches(6)
    sgd = dict(momentum=0.9, weight_decay=1e-3)
    ours, mine, theirs = net(), net(), net()
    flatmin_loop(ours, data, rho=0.1, k=3, alpha=0.5, **sgd)
    one_step_loop(mine, data, rho=0.1, k=3, alpha=0.5, **sgd)
    authors_loop(theirs, data, rho=0.1, k=3, alpha=0.5, **sgd)
    close(ours, mine)
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert gap > 1e-6  # the difference the docstring lists is real, not rounding


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_k_one_alpha_one_is_sam_bit_for_bit(adaptive):
    data = batches(4)
    sgd = dict(momentum=0.9, weight_decay=1e-3)
    ours, sam = net(), net()
    flatmin_loop(ours, data, rho=0.1, k=1, alpha=1.0, adaptive=adaptive, **sgd)
    opt = SAM(sam.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=LR, **sgd)
    closure_steps(opt, sam, data)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), sam.parameters()))


@pytest.mark.parametrize("k, alpha", [(1, 1.0), (2, 0.5)])
def test_rho_zero_with_alpha_k_one_is_the_base_optimizer_bit_for_bit(k, alpha):
    """ρ = 0: every g'_i = ∇f(θ), so d = α·k·∇f(θ) — the base step itself when α·k = 1 (exact for k ≤ 2)."""
    data = batches(4)
    sgd = dict(momentum=0.9, weight_decay=1e-3)
    ours, base = net(), net()
    flatmin_loop(ours, data, rho=0.0, k=k, alpha=alpha, **sgd)
    opt = torch.optim.SGD(base.parameters(), lr=LR, **sgd)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(base(x), y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), base.parameters()))


def test_values_outside_the_rules_are_refused():
    params = net().parameters()
    for bad in ({"k": 0}, {"alpha": 0.0}, {"alpha": 1.5}, {"adaptive_alpha": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LookbehindSAM(params, torch.optim.SGD, lr=LR, **bad)


def test_registered_everywhere_without_another_edit():
    """The registry made it public, a create_optimizer name, a trainer method and its flags."""
    from flatmin.cli.options import OPTIONS
    from flatmin.train import METHODS

    opt = flatmin.create_optimizer(net(), "lookbehind", lr=0.1, rho=0.05, k=4, alpha=0.8)
    assert isinstance(opt, LookbehindSAM) and opt.k == 4 and opt.ascent_passes() == 4
    assert opt.param_groups[0]["alpha"] == 0.8
    assert "lookbehind" in METHODS
    for flag in ("--lookbehind-k", "--lookbehind-alpha", "--lookbehind-adaptive-alpha"):
        assert OPTIONS[flag][0] == flag[2:].replace("-", "_")

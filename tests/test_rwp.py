"""RWP / ARWP against float64 loops written from the authors' algorithm (nblt/mARWP ``train_marwp.py``:
the clean gradient g0, the filter-wise noise damped by √(1 + η·row-sum of F), the perturbed gradient g1,
F ← β·F + g1², θ back, the base step on λ·g1 + (1−λ)·g0; their ``ARWP`` optimizer for λ = 1), with the
same generator; and its exact reductions (σ = 0 and λ = 0 are the base optimizer bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import closure_steps
from tests.helpers import rule_batches as batches
from torch import nn
from torch.nn import functional as F

import flatmin
from flatmin import RWP
from flatmin.optim.driver import drive

BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def net(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7), *([nn.BatchNorm1d(7)] if norm else []), nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


def gradient(model: nn.Module, x, y) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def per_filter(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A value per row of t (shape [rows, 1]), repeated over the row and shaped like t (the authors' way)."""
    rows = t.reshape(t.shape[0], -1)
    return values.expand_as(rows).reshape(t.shape)


def noise_std(p: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ·‖row‖ over each filter of a ≥ 2-d tensor, σ·(‖p‖ + 1e-16) for a 1-d one."""
    if p.dim() > 1:
        return sigma * per_filter(p, p.reshape(p.shape[0], -1).norm(dim=1, keepdim=True))
    return sigma * (p.norm() + 1e-16)


def authors_loop(model: nn.Module, data, *, sigma: float, lmbda: float, eta: float, beta: float,
                 seed: int) -> list[torch.Tensor] | None:
    """m-(A)RWP on one batch per step: g0 at θ, ε filter-wise (1-d: the whole norm + 1e-16), damped by
    √(1 + η·ΣF) once F exists, g1 at θ + ε, F ← β·F + g1², θ ← θ + ε − ε, SGD on λ·g1 + (1−λ)·g0."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **BASE)
    gen = torch.Generator().manual_seed(seed)
    fisher = None
    for x, y in data:
        g0 = gradient(model, x, y) if lmbda < 1 else None
        noise = []
        with torch.no_grad():
            for i, p in enumerate(params):
                e = torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise_std(p, sigma)
                if fisher is not None:
                    f = fisher[i]
                    f = per_filter(f, f.reshape(f.shape[0], -1).sum(dim=1, keepdim=True))
                    e = e / torch.sqrt(1 + eta * f)
                noise.append(e)
                p.add_(e)
        g1 = gradient(model, x, y)
        if eta > 0:
            fisher = [g ** 2 if fisher is None else fisher[i] * beta + g ** 2 for i, g in enumerate(g1)]
        with torch.no_grad():
            for p, e, a, b in zip(params, noise, g1, g0 or g1):
                p.sub_(e)
                p.grad = lmbda * a + (1 - lmbda) * b if g0 is not None else a.clone()
        sgd.step()
    return fisher


def flatmin_loop(model: nn.Module, data, seed: int = 5, **kw) -> tuple[RWP, int]:
    gen = torch.Generator().manual_seed(seed)
    opt = RWP(model.parameters(), torch.optim.SGD, generator=gen, **BASE, **kw)
    return opt, closure_steps(opt, model, data)


@pytest.mark.parametrize("lmbda, eta", [(0.5, 0.0), (0.3, 0.5), (0.8, 2.0)])
def test_matches_the_authors_mixed_loop(lmbda, eta):
    """m-RWP (η = 0) and m-ARWP: the same weights and the same F after 6 steps; two passes a step."""
    data = batches(6)
    ours, theirs = net(), net()
    kw = dict(sigma=0.05, lmbda=lmbda, eta=eta, beta=0.9)
    opt, passes = flatmin_loop(ours, data, **kw)
    fisher = authors_loop(theirs, data, seed=5, **kw)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert passes == 2 * len(data)
    saved = opt.state_dict()["perturbation"]["fisher"]
    if eta == 0:
        assert saved == {}  # plain RWP keeps no Fisher
    else:
        for i, f in enumerate(fisher):
            torch.testing.assert_close(saved[i], f, rtol=1e-13, atol=0)


def test_lambda_one_is_the_authors_one_pass_arwp():
    """λ = 1 drops the clean pass: one pass at θ + ε a step, their ARWP optimizer (first_step/second_step)."""
    data = batches(6)
    ours, theirs = net(), net()
    kw = dict(sigma=0.05, lmbda=1.0, eta=0.5, beta=0.99)
    _, passes = flatmin_loop(ours, data, **kw)
    authors_loop(theirs, data, seed=5, **kw)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert passes == len(data)


def sgd_loop(model: nn.Module, data) -> None:
    sgd = torch.optim.SGD(model.parameters(), **BASE)
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()


@pytest.mark.parametrize("kw", [dict(sigma=0.0, lmbda=0.3, eta=0.5), dict(sigma=0.0, lmbda=0.5),
                                dict(sigma=0.0, lmbda=1.0, eta=0.5), dict(sigma=0.05, lmbda=0.0, eta=0.5)],
                         ids=["sigma0", "sigma0-half", "sigma0-one-pass", "lambda0"])
def test_sigma_zero_or_lambda_zero_is_the_base_optimizer_bit_for_bit(kw):
    data = batches(5)
    ours, ref = net(), net()
    flatmin_loop(ours, data, **kw)
    sgd_loop(ref, data)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_batchnorm_statistics_move_in_the_clean_pass_only():
    """Driven with the model (the trainer's route), BatchNorm's running statistics are those of θ's pass,
    as the authors' disable_running_stats around the perturbed pass; its 1-d weights take the whole norm."""
    data = batches(4)
    ours, ref = net(norm=True), net(norm=True)
    opt = RWP(ours.parameters(), torch.optim.SGD, sigma=0.05, lmbda=0.5,
              generator=torch.Generator().manual_seed(5), **BASE)
    for x, y in data:
        def grad_pass(p, x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(ours(x), y)
            loss.backward()
            return loss
        drive(opt, grad_pass, model=ours)
    bn = ref[1]
    momentum = bn.momentum
    params = list(ref.parameters())
    sgd = torch.optim.SGD(params, **BASE)
    gen = torch.Generator().manual_seed(5)
    for x, y in data:
        g0 = gradient(ref, x, y)
        with torch.no_grad():
            noise = []
            for p in params:
                noise.append(torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise_std(p, 0.05))
                p.add_(noise[-1])
        bn.momentum = 0.0  # the authors' disable_running_stats
        g1 = gradient(ref, x, y)
        bn.momentum = momentum
        with torch.no_grad():
            for p, e, a, b in zip(params, noise, g1, g0):
                p.sub_(e)
                p.grad = 0.5 * a + 0.5 * b
        sgd.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    torch.testing.assert_close(ours[1].running_mean, bn.running_mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours[1].running_var, bn.running_var, rtol=0, atol=1e-15)


def test_a_loss_scale_cancels_in_the_mix_and_the_fisher():
    """Under a GradScaler (its scale a power of 2) the kept g is brought to the final pass's units and F sees
    unscaled gradients: the run of the plain driver, to rounding."""
    data = batches(5)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model = net()
        opt = RWP(model.parameters(), torch.optim.SGD, sigma=0.05, lmbda=0.3, eta=0.5,
                  generator=torch.Generator().manual_seed(5), **BASE)
        for x, y in data:
            def grad_pass(p, x=x, y=y, model=model, opt=opt, scaler=scaler):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                (loss if scaler is None else scaler.scale(loss)).backward()
                return loss
            drive(opt, grad_pass, scaler=scaler)
        runs.append((model, opt.state_dict()["perturbation"]["fisher"]))
    (plain, f_plain), (scaled, f_scaled) = runs
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    for i in f_plain:
        torch.testing.assert_close(f_plain[i], f_scaled[i], rtol=1e-13, atol=0)


def test_a_checkpoint_continues_the_noise_and_the_fisher():
    """state_dict after 3 steps, loaded into a fresh optimizer (another seed): the same 6-step run."""
    data = batches(6)
    whole = net()
    flatmin_loop(whole, data, sigma=0.05, lmbda=0.5, eta=0.5)
    half = net()
    opt, _ = flatmin_loop(half, data[:3], sigma=0.05, lmbda=0.5, eta=0.5)
    state = copy.deepcopy(opt.state_dict())
    again = RWP(half.parameters(), torch.optim.SGD, sigma=0.05, lmbda=0.5, eta=0.5,
                generator=torch.Generator().manual_seed(99), **BASE)
    again.load_state_dict(state)
    for x, y in data[3:]:
        def closure(x=x, y=y):
            again.zero_grad()
            loss = F.cross_entropy(half(x), y)
            loss.backward()
            return loss
        again.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), half.parameters()))


def test_registered_everywhere_without_another_edit():
    """The registry made it public, a create_optimizer name, a trainer method and its flags."""
    from flatmin.cli.options import OPTIONS
    from flatmin.train import METHODS

    opt = flatmin.create_optimizer(net(), "rwp", lr=0.1, sigma=0.02, lmbda=0.4, eta=0.1)
    assert isinstance(opt, RWP) and opt.param_groups[0]["sigma"] == 0.02 and opt.ascent_passes() == 1
    assert "rwp" in METHODS
    assert [OPTIONS[f][0] for f in ("--rwp-sigma", "--rwp-lmbda", "--rwp-eta", "--rwp-beta")] == [
        "rwp_sigma", "rwp_lmbda", "rwp_eta", "rwp_beta"]

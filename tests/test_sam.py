"""SAM/ASAM against the formula written out here (Foret et al.; Kwon et al.)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import base_step_at_theta, batches, make_closure, tiny_model
from torch.nn import functional as F

from flatmin import SAM
from flatmin.errors import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("float64")


def reference_sam(model, data, *, rho, adaptive, base_kw):
    """e = ρ T²g/‖Tg‖ (T = |w| for ASAM); w ← SGD(w, ∇L(w+e))."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **base_kw)
    for x, y in data:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
        e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        base_step_at_theta(params, theta, torch.autograd.grad(F.cross_entropy(model(x), y), params), base)
    return model


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_formula(adaptive, foreach):
    data = batches(10)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    rho = 0.5 if adaptive else 0.05
    ref = reference_sam(tiny_model(), data, rho=rho, adaptive=adaptive, base_kw=kw)
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, foreach=foreach, **kw)
    for x, y in data:
        opt.step(make_closure(model, opt, x, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_second_step_api_equals_step(adaptive):
    data = batches(6)
    a, b = tiny_model(), tiny_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1, momentum=0.9)
    for x, y in data:
        opt_a.step(make_closure(a, opt_a, x, y))
        F.cross_entropy(b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_first_step_without_zero_grad_keeps_gradients():
    model = tiny_model()
    (x, y), = batches(1)
    opt = SAM(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=False)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    opt.restore()


@pytest.mark.parametrize("adaptive", [False, True])
def test_restore_is_bit_exact_and_state_dict(adaptive):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), rho=0.5, adaptive=adaptive, lr=0.0)
    for x, y in batches(4):
        opt.step(make_closure(model, opt, x, y))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    opt2 = SAM(tiny_model().parameters(), rho=1.0, lr=0.3)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["rho"] == 0.5 and opt2.param_groups[0]["lr"] == 0.0
    assert opt2.param_groups[0]["adaptive"] is adaptive


def test_nonfinite_and_bad_inputs():
    model = tiny_model()
    opt = SAM(model.parameters(), lr=0.1)
    (x, y), = batches(1)
    before = copy.deepcopy(model.state_dict())

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * float("inf")
        loss.backward()
        return loss

    opt.step(closure)
    with pytest.raises(NonFiniteLossError):
        opt.poll()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho"):
            SAM(model.parameters(), rho=bad, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()

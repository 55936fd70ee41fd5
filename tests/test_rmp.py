"""RMP: a random point on the sphere of radius r; one pass; θ restored exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import base_step_at_theta, batches, make_closure, tiny_model
from torch.nn import functional as F

from flatmin import RMP

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("ball", ["global", "per_tensor"])
@pytest.mark.parametrize("foreach", [True, False])
def test_perturbation_lies_on_the_sphere(ball, foreach):
    model = tiny_model()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = RMP(model.parameters(), lr=0.1, radius=0.1, ball=ball, foreach=foreach)
    opt.perturb()
    deltas = [p.detach() - t for p, t in zip(model.parameters(), theta)]
    if ball == "global":
        assert float(torch.sqrt(sum((d ** 2).sum() for d in deltas))) == pytest.approx(0.1)
    else:
        assert [float(d.norm()) for d in deltas] == pytest.approx([0.1] * len(deltas))
    opt.restore()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))


def test_matches_plain_loop_with_the_same_random_numbers():
    data = batches(6)
    model, ref = tiny_model(), tiny_model()
    opt = RMP(model.parameters(), lr=0.1, momentum=0.9, radius=0.1,
              generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    params = list(ref.parameters())
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    calls = []
    for x, y in data:
        opt.step(make_closure(model, opt, x, y, calls))
        d = [torch.randn(p.shape, generator=gen) for p in params]
        norm = torch.sqrt(sum((di ** 2).sum() for di in d))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(0.1 * di / norm)
        base_step_at_theta(params, theta, torch.autograd.grad(F.cross_entropy(ref(x), y), params), sgd)
    assert len(calls) == len(data)  # one pass per step: ERM's cost
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_restore_bit_exact_and_bad_inputs():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    opt = RMP(model.parameters(), lr=0.0, radius=1.0)
    for x, y in batches(3):
        opt.step(make_closure(model, opt, x, y))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="radius"):
            RMP(model.parameters(), lr=0.1, radius=bad)
    with pytest.raises(ValueError, match="ball"):
        RMP(model.parameters(), lr=0.1, ball="box")

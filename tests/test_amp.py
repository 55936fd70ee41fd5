"""AMP against a plain loop written here from Algorithm 1, plus Theorem 2 by autograd."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.helpers import BASES, base_step_at_theta, batches, make_closure, tiny_model
from torch.nn import functional as F

from flatmin import AMP
from flatmin.errors import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("float64")


def reference_amp(model, data, *, epsilon, inner_lr, inner_iter, ball, base_cls, base_kw):
    """Algorithm 1, written out: Δ←0; N×(Δ←Δ+ζ∇J(θ+Δ); project); θ←base(θ, ∇J(θ+Δ))."""
    params = list(model.parameters())
    base = base_cls(params, **base_kw)

    def grad_at(values, x, y):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        loss = F.cross_entropy(model(x), y)
        return list(torch.autograd.grad(loss, params))

    for x, y in data:
        theta = [p.detach().clone() for p in params]
        delta = [torch.zeros_like(t) for t in theta]
        for _ in range(inner_iter):
            g = grad_at([t + d for t, d in zip(theta, delta)], x, y)
            delta = [d + inner_lr * gi for d, gi in zip(delta, g)]
            if ball == "global":
                norm = math.sqrt(sum(float(d.norm()) ** 2 for d in delta))
                if norm > epsilon:
                    delta = [epsilon * d / norm for d in delta]
            else:
                delta = [epsilon * d / d.norm() if d.norm() > epsilon else d for d in delta]
        base_step_at_theta(params, theta, grad_at([t + d for t, d in zip(theta, delta)], x, y), base)
    return model


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("inner_iter", [1, 2])
@pytest.mark.parametrize("ball", ["global", "per_tensor"])
def test_matches_algorithm_1(ball, inner_iter, base, foreach):
    data = batches(12)
    base_cls, base_kw = BASES[base]
    eps, zeta = 0.05, 0.5  # small enough that both clipped and unclipped steps occur
    ref = reference_amp(tiny_model(), data, epsilon=eps, inner_lr=zeta, inner_iter=inner_iter,
                        ball=ball, base_cls=base_cls, base_kw=base_kw)
    model = tiny_model()
    opt = AMP(model.parameters(), epsilon=eps, inner_lr=zeta, inner_iter=inner_iter, ball=ball,
              base_optimizer=base_cls, foreach=foreach, **base_kw)
    for x, y in data:
        opt.step(make_closure(model, opt, x, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model().parameters()))


def test_foreach_equals_single_tensor():
    data = batches(10)
    models = []
    for foreach in (True, False):
        model = tiny_model()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.02, inner_iter=2, ball="per_tensor",
                  momentum=0.9, foreach=foreach)
        for x, y in data:
            opt.step(make_closure(model, opt, x, y))
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("inner_iter", [1, 2])
def test_restore_is_bit_exact(inner_iter):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    opt = AMP(model.parameters(), lr=0.0, epsilon=0.5, inner_lr=1.0, inner_iter=inner_iter)
    for x, y in batches(5):
        opt.step(make_closure(model, opt, x, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_step_calls_closure_n_plus_1_times_and_returns_first():
    model = tiny_model()
    (x, y), = batches(1)
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
    calls = []
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_iter=3)
    out, loss = opt.step(make_closure(model, opt, x, y, calls))
    assert len(calls) == 4
    assert torch.equal(loss, expected) and not loss.requires_grad and out.shape == (12, 3)
    assert calls[1] > calls[0]  # the ascent really ascends


def test_epsilon_zero_is_the_base_optimizer():
    data = batches(8)
    model, plain = tiny_model(), tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.0, momentum=0.9)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        opt.step(make_closure(model, opt, x, y))
        sgd.step(make_closure(plain, sgd, x, y))
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_identically():
    data = batches(10)

    def run(model, opt, chunk):
        for x, y in chunk:
            opt.step(make_closure(model, opt, x, y))

    model = tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, momentum=0.9)
    run(model, opt, data[:5])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, data[5:])

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = AMP(resumed.parameters(), lr=0.5, epsilon=9.0, momentum=0.9)  # values come from the dict
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["epsilon"] == 0.05 and opt2.param_groups[0]["inner_iter"] == 2
    run(resumed, opt2, data[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_base_optimizer():
    model = tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 3], gamma=0.1)
    lrs = []
    for x, y in batches(4):
        opt.step(make_closure(model, opt, x, y))
        sched.step()
        lrs.append(opt.base_optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.01, 0.001, 0.001])


def test_frozen_parameters_and_groups():
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    groups = [{"params": [model[0].bias], "epsilon": 0.0},
              {"params": list(model[2].parameters()), "inner_lr": 0.3}]
    opt = AMP(groups, lr=0.1, epsilon=0.05)
    assert opt.param_groups[0]["epsilon"] == 0.0 and opt.param_groups[1]["epsilon"] == 0.05
    assert opt.param_groups[1]["inner_lr"] == 0.3 and opt.param_groups[0]["inner_lr"] == 1.0
    for x, y in batches(3):
        opt.step(make_closure(model, opt, x, y))
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in opt._theta
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "epsilon": 0.2})
    assert opt.base_optimizer.param_groups[-1]["epsilon"] == 0.2
    assert opt.base_optimizer.param_groups[-1]["lr"] == 0.1


def test_two_call_form_equals_closure_form():
    data = batches(6)
    a, b = tiny_model(), tiny_model()
    opt_a = AMP(a.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, momentum=0.9)
    opt_b = AMP(b.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, momentum=0.9)
    for x, y in data:
        opt_a.step(make_closure(a, opt_a, x, y))
        for _ in range(2):
            opt_b.zero_grad()
            F.cross_entropy(b(x), y).backward()
            opt_b.perturb()
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.restore_and_step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_grad_scale_is_divided_out():
    a, b = tiny_model(), tiny_model()
    (x, y), = batches(1)
    opt_a = AMP(a.parameters(), lr=0.1, epsilon=10.0, inner_lr=0.5)
    opt_b = AMP(b.parameters(), lr=0.1, epsilon=10.0, inner_lr=0.5)
    F.cross_entropy(a(x), y).backward()
    (1024.0 * F.cross_entropy(b(x), y)).backward()
    opt_a.perturb()
    opt_b.perturb(grad_scale=torch.tensor(1024.0))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_nonfinite_loss_restores_theta_and_skips():
    model = tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    (x, y), = batches(1)
    opt.step(make_closure(model, opt, x, y))
    before = copy.deepcopy(model.state_dict())
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("nan") if calls else 1.0)
        loss.backward()
        calls.append(1)
        return loss

    opt.step(closure)  # skipped on the device: no host read inside the step
    assert opt.skipped_steps == 1 and not opt.perturbed
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*step 2"):
        opt.poll()
    assert opt.poll() == 1  # reported once
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(epsilon=-1.0), "epsilon"), (dict(epsilon=float("nan")), "epsilon"),
     (dict(epsilon=float("inf")), "epsilon"), (dict(inner_lr=-0.1), "inner_lr"),
     (dict(inner_lr=float("nan")), "inner_lr"), (dict(inner_iter=-1), "inner_iter"),
     (dict(inner_iter=1.5), "inner_iter"), (dict(ball="l1"), "ball"), (dict(lr=-1.0), "lr")],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AMP(tiny_model().parameters(), **{"lr": 0.1, **kwargs})


def test_step_without_closure_is_a_clear_error():
    opt = AMP(tiny_model().parameters(), lr=0.1, epsilon=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# --- Theorem 2 ---------------------------------------------------------------------------------


def _flat_grad(model, x, y, create_graph=False):
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in
                      torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph)])


def _amp_direction(model, x, y, epsilon, zeta):
    """The gradient AMP (N=1) hands to the base optimizer, taken from the optimizer itself."""
    m = copy.deepcopy(model)
    opt = AMP(m.parameters(), lr=0.0, epsilon=epsilon, inner_lr=zeta)
    grads = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in m.parameters()]))
        return loss

    opt.step(closure)
    return grads[-1]


def _regularised_direction(model, x, y, omega):
    """∇(J + Ω)(θ) by double backprop, Ω a function of ∇J."""
    g = _flat_grad(model, x, y, create_graph=True)
    total = F.cross_entropy(model(x), y) + omega(g)
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(total, list(model.parameters()))])


def test_theorem2_small_gradient_regime():
    """‖ζ∇J‖ ≤ ε: AMP steps on J + (ζ/2)‖∇J‖² to O(ζ²). The paper writes ζ‖∇J‖², which is the
    first-order *value* J(θ+Δ) − J(θ); its gradient would double the curvature term."""
    model = tiny_model()
    (x, y), = batches(1)
    g = _flat_grad(model, x, y)
    errors = []
    for zeta in (1e-2, 1e-3):
        assert zeta * g.norm() <= 1.0
        amp = _amp_direction(model, x, y, epsilon=1.0, zeta=zeta)
        half = _regularised_direction(model, x, y, lambda gr, z=zeta: 0.5 * z * gr.pow(2).sum())
        paper = _regularised_direction(model, x, y, lambda gr, z=zeta: z * gr.pow(2).sum())
        shift = (amp - g).norm()  # the regulariser's contribution, ~ ζ‖Hg‖
        errors.append(float((amp - half).norm() / shift))
        assert (amp - half).norm() < 0.02 * shift
        assert (amp - paper).norm() == pytest.approx(float(shift), rel=0.05)
        with torch.no_grad():  # the value view: J(θ+ζg) ≈ J + ζ‖g‖²
            j0 = F.cross_entropy(model(x), y)
            m = copy.deepcopy(model)
            offset = 0
            for p in m.parameters():
                p.add_(zeta * g[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            value_gap = F.cross_entropy(m(x), y) - j0
        assert float(value_gap) == pytest.approx(float(zeta * g.pow(2).sum()), rel=0.05)
    assert errors[1] < errors[0] / 5  # the residual shrinks like ζ


def test_theorem2_clipped_regime():
    """‖ζ∇J‖ > ε: AMP steps on J + ε‖∇J‖ to O(ε²)."""
    model = tiny_model()
    (x, y), = batches(1)
    g = _flat_grad(model, x, y)
    errors = []
    for eps in (1e-2, 1e-3):
        zeta = 10.0
        assert zeta * g.norm() > eps
        amp = _amp_direction(model, x, y, epsilon=eps, zeta=zeta)
        reg = _regularised_direction(model, x, y, lambda gr, e=eps: e * gr.norm())
        shift = (amp - g).norm()
        errors.append(float((amp - reg).norm() / shift))
        assert (amp - reg).norm() < 0.02 * shift
    assert errors[1] < errors[0] / 5

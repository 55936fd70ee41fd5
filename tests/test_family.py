"""SAM's family against plain loops written here from each paper / the authors' code (float64)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tests.helpers import BASES, TINY, Loop, batches, closure_for, dot, norm, run, tiny_model
from torch.nn import functional as F

from flatmin import BSAM, ESAM, GSAM, MSAM, SAM, WSAM, FriendlySAM, LookSAM

pytestmark = pytest.mark.usefixtures("float64")


def sam_point(theta, g, rho, scale=1.0):
    n = norm(g)
    return [t + scale * rho * gi / (n + TINY) for t, gi in zip(theta, g)]


# --- references ----------------------------------------------------------------------------------


def ref_gsam(loop, data, rho, alpha):
    """Zhuang et al. 2022 (authors' gradient_decompose)."""
    for x, y in data:
        theta = loop.theta()
        g = loop.grad_at(theta, x, y)
        gp = loop.grad_at(sam_point(theta, g, rho), x, y)
        cos = dot(g, gp) / (norm(gp) * norm(g) + TINY)
        vert = [o - cos * norm(g) * n / (norm(gp) + TINY) for o, n in zip(g, gp)]
        loop.step_from(theta, [n - alpha * v for n, v in zip(gp, vert)])


def ref_fsam(loop, data, rho, sigma, lmbda):
    """Li et al. 2024 (authors' first_step: m starts at g_1, d = g − σ·m_{t−1})."""
    m = None
    for x, y in data:
        theta = loop.theta()
        g = loop.grad_at(theta, x, y)
        if m is None:
            d, m = g, [gi.clone() for gi in g]
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
            m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g)]
        loop.step_from(theta, loop.grad_at(sam_point(theta, d, rho), x, y))


def ref_looksam(loop, data, rho, k, alpha):
    """Liu et al. 2022, Algorithm 1 (whole-model vectors)."""
    gv = None
    for t, (x, y) in enumerate(data):
        theta = loop.theta()
        g = loop.grad_at(theta, x, y)
        if t % k == 0:
            gs = loop.grad_at(sam_point(theta, g, rho), x, y)
            cos = dot(g, gs) / (norm(g) * norm(gs) + TINY)
            gv = [s - norm(gs) * cos * gi / (norm(g) + TINY) for s, gi in zip(gs, g)]
            loop.step_from(theta, gs)
        else:
            loop.step_from(theta, [gi + alpha * norm(g) / (norm(gv) + TINY) * v for gi, v in zip(g, gv)])


def ref_wsam(loop, data, rho, gamma, decouple):
    """Yue et al. 2023 (authors' second_step, coupled and decoupled)."""
    a = gamma / (1 - gamma)
    for x, y in data:
        theta = loop.theta()
        g = loop.grad_at(theta, x, y)
        gs = loop.grad_at(sam_point(theta, g, rho), x, y)
        if not decouple:
            loop.step_from(theta, [a * s + (1 - a) * gi for s, gi in zip(gs, g)])
            continue
        loop.step_from(theta, g)
        with torch.no_grad():
            for p, s, gi in zip(loop.params, gs, g):
                p.sub_(loop.base.param_groups[0]["lr"] * a * (s - gi))


def ref_msam(loop, data, rho):
    """Becker et al. 2024: gradient at θ − ρ·v/‖v‖, v the base's momentum after the last step."""
    for x, y in data:
        theta = loop.theta()
        state = [loop.base.state.get(p, {}) for p in loop.params]
        v = [s.get("momentum_buffer", s.get("exp_avg")) for s in state]
        point = (
            theta
            if any(vi is None for vi in v)
            else [t - rho * vi / (norm(v) + TINY) for t, vi in zip(theta, v)]
        )
        loop.step_from(theta, loop.grad_at(point, x, y))


def ref_esam(loop, data, rho, beta, seed):
    """Du et al. 2022, SWP as the authors' code: tensors sit out the next ascent with prob. 1 − β."""
    rng, on = random.Random(seed), [True] * len(loop.params)
    for x, y in data:
        theta = loop.theta()
        g = loop.grad_at(theta, x, y)
        g_on = [gi for gi, o in zip(g, on) if o]
        point = [t + (rho / beta) * gi / (norm(g_on) + TINY) if o else t for t, gi, o in zip(theta, g, on)]
        loop.step_from(theta, loop.grad_at(point, x, y))
        on = [not rng.random() > beta for _ in loop.params]
        if not any(on):
            on[0] = True


def ref_bsam(loop, data, *, num_data, lr, betas, wd, rho, damping, s_init, gen):
    """Möllenhoff & Khan 2023 (authors' JAX build_bsam_optimizer, m = 1)."""
    w = loop.theta()
    s = [torch.full_like(p, s_init) for p in w]
    gm = [torch.zeros_like(p) for p in w]
    for x, y in data:
        noise = [torch.randn(p.shape, generator=gen) for p in w]
        g = loop.grad_at([p + (1.0 / (num_data * si)).sqrt() * n for p, si, n in zip(w, s, noise)], x, y)
        ge = loop.grad_at([p + rho * gi / si for p, gi, si in zip(w, g, s)], x, y)
        gs = [(si * gi**2).sqrt() for si, gi in zip(s, g)]
        gm = [betas[0] * m + (1 - betas[0]) * (e + wd * p) for m, e, p in zip(gm, ge, w)]
        w = [p - lr * m / si for p, m, si in zip(w, gm, s)]
        s = [betas[1] * si + (1 - betas[1]) * (q + damping + wd) for si, q in zip(s, gs)]
    with torch.no_grad():
        for p, v in zip(loop.params, w):
            p.copy_(v)


# --- each optimizer equals its reference --------------------------------------------------------

CASES = {  # name: (build(params, base_cls, base_kw, foreach), reference(loop, data))
    "gsam": (
        lambda p, b, kw, f: GSAM(p, b, rho=0.2, alpha=0.4, foreach=f, **kw),
        lambda loop, d: ref_gsam(loop, d, 0.2, 0.4),
    ),
    "gsam_adaptive_alpha1": (
        lambda p, b, kw, f: GSAM(p, b, rho=0.2, alpha=1.0, foreach=f, **kw),
        lambda loop, d: ref_gsam(loop, d, 0.2, 1.0),
    ),
    "fsam": (
        lambda p, b, kw, f: FriendlySAM(p, b, rho=0.2, sigma=1.0, lmbda=0.6, foreach=f, **kw),
        lambda loop, d: ref_fsam(loop, d, 0.2, 1.0, 0.6),
    ),
    "looksam": (
        lambda p, b, kw, f: LookSAM(p, b, rho=0.2, k=3, alpha=0.7, foreach=f, **kw),
        lambda loop, d: ref_looksam(loop, d, 0.2, 3, 0.7),
    ),
    "wsam": (
        lambda p, b, kw, f: WSAM(p, b, rho=0.2, gamma=0.9, foreach=f, **kw),
        lambda loop, d: ref_wsam(loop, d, 0.2, 0.9, True),
    ),
    "wsam_coupled": (
        lambda p, b, kw, f: WSAM(p, b, rho=0.2, gamma=0.8, decouple=False, foreach=f, **kw),
        lambda loop, d: ref_wsam(loop, d, 0.2, 0.8, False),
    ),
    "msam": (
        lambda p, b, kw, f: MSAM(p, b, rho=0.3, foreach=f, **kw),
        lambda loop, d: ref_msam(loop, d, 0.3),
    ),
    "esam": (
        lambda p, b, kw, f: ESAM(p, b, rho=0.2, beta=0.6, seed=3, foreach=f, **kw),
        lambda loop, d: ref_esam(loop, d, 0.2, 0.6, 3),
    ),
}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_paper_loop(case, base, foreach):
    build, reference = CASES[case]
    base_cls, base_kw = BASES[base]
    data = batches(7)
    ref = Loop(tiny_model(), base_cls, base_kw)
    reference(ref, data)
    model = tiny_model()
    run(model, build(model.parameters(), base_cls, base_kw, foreach), data)
    for p, q in zip(model.parameters(), ref.params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model().parameters()))


BSAM_KW = dict(num_data=500, lr=0.05, betas=(0.9, 0.99), weight_decay=1e-3, rho=0.05, damping=0.1, s_init=1.0)


@pytest.mark.parametrize("foreach", [True, False])
def test_bsam_matches_the_authors_loop(foreach):
    data = batches(7)
    kw = dict(BSAM_KW)
    ref = Loop(tiny_model())
    ref_bsam(
        ref,
        data,
        num_data=kw["num_data"],
        lr=kw["lr"],
        betas=kw["betas"],
        wd=kw["weight_decay"],
        rho=kw["rho"],
        damping=kw["damping"],
        s_init=kw["s_init"],
        gen=torch.Generator().manual_seed(5),
    )
    model = tiny_model()
    run(
        model,
        BSAM(model.parameters(), **kw, generator=torch.Generator().manual_seed(5), foreach=foreach),
        data,
    )
    for p, q in zip(model.parameters(), ref.params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


ALL = {name: build for name, (build, _) in CASES.items()}
ALL["bsam"] = lambda p, b, kw, f: BSAM(
    p, **{**BSAM_KW, "lr": kw["lr"]}, generator=torch.Generator().manual_seed(5), foreach=f
)
ALL["looksam_k1"] = lambda p, b, kw, f: LookSAM(p, b, rho=0.2, k=1, foreach=f, **kw)


@pytest.mark.parametrize("name", list(ALL))
def test_foreach_equals_single_tensor(name):
    data = batches(6)
    base_cls, base_kw = BASES["sgd_nesterov_wd"]
    models = [run(tiny_model(), None, []) for _ in range(2)]
    for model, foreach in zip(models, (True, False)):
        run(model, ALL[name](model.parameters(), base_cls, base_kw, foreach), data)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(ALL))
def test_restore_is_bit_exact_at_lr_zero(name):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    base_cls, base_kw = BASES["sgd_nesterov_wd"]
    opt = ALL[name](model.parameters(), base_cls, {**base_kw, "lr": 0.0}, True)
    run(model, opt, batches(5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters()) or name.startswith("esam")


@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_resume_continues_the_trajectory(name):
    data = batches(9)
    base_cls, base_kw = BASES["sgd_nesterov_wd"]
    model = tiny_model()
    opt = ALL[name](model.parameters(), base_cls, base_kw, True)
    run(model, opt, data[:4])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, data[4:])
    resumed = tiny_model(seed=7)
    resumed.load_state_dict(saved_model)
    opt2 = ALL[name](resumed.parameters(), base_cls, base_kw, True)
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, data[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# --- exact reductions ---------------------------------------------------------------------------

REDUCTIONS = {  # each must equal SAM(rho=0.2) bit for bit
    "gsam_alpha0": lambda p, b, kw: GSAM(p, b, rho=0.2, alpha=0.0, **kw),
    "fsam_sigma0": lambda p, b, kw: FriendlySAM(p, b, rho=0.2, sigma=0.0, **kw),
    "looksam_k1": lambda p, b, kw: LookSAM(p, b, rho=0.2, k=1, **kw),
    "wsam_gamma_half_coupled": lambda p, b, kw: WSAM(p, b, rho=0.2, gamma=0.5, decouple=False, **kw),
    "esam_beta1": lambda p, b, kw: ESAM(p, b, rho=0.2, beta=1.0, **kw),
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reductions_to_sam(name, base):
    base_cls, base_kw = BASES[base]
    data = batches(6)
    a, b = tiny_model(), tiny_model()
    run(a, REDUCTIONS[name](a.parameters(), base_cls, base_kw), data)
    run(b, SAM(b.parameters(), base_cls, rho=0.2, **base_kw), data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "make",
    [
        lambda p, kw: MSAM(p, rho=0.0, **kw),
        lambda p, kw: WSAM(p, rho=0.3, gamma=0.0, decouple=False, **kw),
        lambda p, kw: WSAM(p, rho=0.3, gamma=0.0, **kw),
    ],
)
def test_reductions_to_the_base_optimizer(make):
    """MSAM with ρ = 0 and WSAM with γ = 0 (either form) are plain SGD."""
    base_kw = BASES["sgd_nesterov_wd"][1]
    data = batches(6)
    a, b = tiny_model(), tiny_model()
    run(a, make(a.parameters(), base_kw), data)
    run(b, torch.optim.SGD(b.parameters(), **base_kw), data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_wsam_decoupled_gamma_half_is_sam_for_plain_sgd():
    """Without momentum or decay, g then −lr·(g_s − g) is the step −lr·g_s (to rounding)."""
    data = batches(5)
    a, b = tiny_model(), tiny_model()
    run(a, WSAM(a.parameters(), rho=0.2, gamma=0.5, lr=0.1), data)
    run(b, SAM(b.parameters(), rho=0.2, lr=0.1), data)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_looksam_reuse_steps_make_one_pass():
    model = tiny_model()
    opt = LookSAM(model.parameters(), rho=0.2, k=3, lr=0.1)
    calls = []
    for x, y in batches(6):
        n = len(calls)

        def closure(x=x, y=y):
            calls.append(1)
            return closure_for(model, opt, x, y)()

        opt.step(closure)
        calls[n:] = [len(calls) - n]
    assert calls == [2, 1, 1, 2, 1, 1]


def test_gsam_rho_follows_the_learning_rate():
    model = tiny_model()
    opt = GSAM(model.parameters(), rho=0.1, rho_min=0.02, lr_min=0.0, lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rhos = []
    for x, y in batches(3):
        rhos.append(opt.radius(opt.param_groups[0]))
        opt.step(closure_for(model, opt, x, y))
        sched.step()
    assert rhos == pytest.approx([0.1, 0.02 + 0.08 * 0.5, 0.02 + 0.08 * 0.25])


def test_two_call_form_equals_closure_form():
    data = batches(6)
    for make in (
        lambda p: GSAM(p, rho=0.2, lr=0.1, momentum=0.9),
        lambda p: LookSAM(p, rho=0.2, k=2, lr=0.1, momentum=0.9),
        lambda p: WSAM(p, rho=0.2, lr=0.1, momentum=0.9),
        lambda p: FriendlySAM(p, rho=0.2, lr=0.1, momentum=0.9),
    ):
        a, b = tiny_model(), tiny_model()
        opt_a, opt_b = make(a.parameters()), make(b.parameters())
        for x, y in data:
            opt_a.step(closure_for(a, opt_a, x, y))
            F.cross_entropy(b(x), y).backward()
            opt_b.first_step(zero_grad=True)
            F.cross_entropy(b(x), y).backward()
            opt_b.second_step(zero_grad=True)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), type(opt_a).__name__


def test_msam_two_call_form():
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = (
        MSAM(a.parameters(), rho=0.3, lr=0.1, momentum=0.9),
        MSAM(b.parameters(), rho=0.3, lr=0.1, momentum=0.9),
    )
    for x, y in batches(5):
        opt_a.step(closure_for(a, opt_a, x, y))
        opt_b.perturb()
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.restore_and_step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_step_is_skipped_and_state_stays_finite():
    for make in (
        lambda p: FriendlySAM(p, rho=0.2, lr=0.1, momentum=0.9, nonfinite="skip"),
        lambda p: LookSAM(p, rho=0.2, k=2, lr=0.1, momentum=0.9, nonfinite="skip"),
        lambda p: WSAM(p, rho=0.2, lr=0.1, momentum=0.9, nonfinite="skip"),
        lambda p: BSAM(p, num_data=100, lr=0.05, nonfinite="skip"),
    ):
        model = tiny_model()
        opt = make(model.parameters())
        (x, y), (x2, y2) = batches(2)
        opt.step(closure_for(model, opt, x, y))
        before = copy.deepcopy(model.state_dict())
        opt.step(closure_for(model, opt, x * float("nan"), y))
        assert opt.skipped_steps == 1
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (type(opt).__name__, k)
        opt.step(closure_for(model, opt, x2, y2))
        assert all(torch.isfinite(p).all() for p in model.parameters()), type(opt).__name__


BAD = [
    (GSAM, dict(rho=-1.0), "rho"),
    (GSAM, dict(alpha=-0.1), "alpha"),
    (GSAM, dict(rho_min=0.5), "rho_min"),
    (FriendlySAM, dict(sigma=-1.0), "sigma"),
    (FriendlySAM, dict(lmbda=1.5), "lmbda"),
    (FriendlySAM, dict(rho=float("nan")), "rho"),
    (LookSAM, dict(k=0), "k"),
    (LookSAM, dict(k=2.5), "k"),
    (LookSAM, dict(alpha=-1.0), "alpha"),
    (WSAM, dict(gamma=1.0), "gamma"),
    (WSAM, dict(gamma=-0.1), "gamma"),
    (ESAM, dict(beta=0.0), "beta"),
    (ESAM, dict(beta=1.5), "beta"),
    (MSAM, dict(rho=-0.3), "rho"),
    (GSAM, dict(lr=-1.0), "learning rate"),
]


@pytest.mark.parametrize("cls, kwargs, name", BAD)
def test_bad_arguments_name_themselves(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(tiny_model().parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_data=0), "num_data"),
        (dict(num_data=10, rho=-1.0), "rho"),
        (dict(num_data=10, betas=(1.0, 0.9)), "betas"),
        (dict(num_data=10, s_init=0.0), "s_init"),
        (dict(num_data=10, adaptive=True), "adaptive"),
        (dict(num_data=10, damping=-1.0), "damping"),
    ],
)
def test_bsam_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BSAM(tiny_model().parameters(), **kwargs)


def test_kind_check_refuses_another_rule():
    a, b = tiny_model(), tiny_model()
    opt = GSAM(a.parameters(), lr=0.1)
    run(a, opt, batches(1))
    with pytest.raises(ValueError, match="GSAM"):
        LookSAM(b.parameters(), lr=0.1).load_state_dict(opt.state_dict())


SCALED = {
    "gsam": lambda p: GSAM(p, rho=0.2, alpha=0.6, lr=0.1, momentum=0.9),
    "looksam": lambda p: LookSAM(p, rho=0.2, k=2, lr=0.1, momentum=0.9),
    "wsam": lambda p: WSAM(p, rho=0.2, lr=0.1, momentum=0.9),
    "wsam_coupled": lambda p: WSAM(p, rho=0.2, gamma=0.7, decouple=False, lr=0.1, momentum=0.9),
    "fsam": lambda p: FriendlySAM(p, rho=0.2, lmbda=0.5, lr=0.1, momentum=0.9),
    "bsam": lambda p: BSAM(p, num_data=100, lr=0.05, generator=torch.Generator().manual_seed(2)),
}


@pytest.mark.parametrize("path", ["driver_scaler", "unscaled_before_step"])
@pytest.mark.parametrize("name", list(SCALED))
def test_a_loss_scale_changes_nothing(name, path):
    """A loss scale of 2^10 (exact in binary) gives the unscaled run's trajectory, whether the final
    gradient is still scaled when the rule combines it (the driver with a GradScaler) or was already
    unscaled (Lightning's precision plugin unscales before ``optimizer.step``)."""
    from flatmin.optim import drive
    from flatmin.optim.driver import grad_scale

    data = batches(5)
    plain, scaled = tiny_model(), tiny_model()
    run(plain, SCALED[name](plain.parameters()), data)
    opt = SCALED[name](scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    s = 2.0**10
    for x, y in data:
        if path == "driver_scaler":

            def grad_pass(p, x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(scaled(x), y)
                scaler.scale(loss).backward()
                return loss

            drive(opt, grad_pass, scaler=scaler)
            assert grad_scale(scaler) is not None
            continue
        opt.begin_step()
        for _ in range(opt.ascent_passes()):
            opt.zero_grad()
            (s * F.cross_entropy(scaled(x), y)).backward()
            opt.perturb(grad_scale=torch.tensor(s))
        opt.zero_grad()
        (s * F.cross_entropy(scaled(x), y)).backward()
        for p in scaled.parameters():
            p.grad.div_(s)
        opt.restore_and_step()
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)  # the 1e-12 norm guards are not scale-free


def test_esam_draws_tensors_and_gives_them_back():
    """With β = 0.5 some tensors sit out the ascent between steps; at least one always ascends;
    `release()` switches them all back on (user-frozen tensors stay frozen)."""
    model = tiny_model()
    model[0].bias.requires_grad_(False)
    opt = ESAM(model.parameters(), rho=0.2, beta=0.01, seed=0, lr=0.1)
    for x, y in batches(4):
        opt.step(closure_for(model, opt, x, y))
        live = [p for p in model.parameters() if p.requires_grad]
        assert len(live) == 1 and len(opt._off) == 2
    opt.release()
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]

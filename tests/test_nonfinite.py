"""A non-finite step is skipped on the device: θ and every optimizer state untouched, counted,
raised only at a poll — for unfused and fused base optimizers, and under a GradScaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatmin import AMP, BSAM, ESAM, GSAM, MSAM, RMP, SAM, WSAM, FriendlySAM, LookSAM
from flatmin.errors import NonFiniteLossError
from flatmin.optim import ERM, build_amp


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


X, Y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3


def closure_for(model, opt, poison=None):
    def closure(ascent=False):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        if poison is not None:
            loss = loss * poison
        loss.backward()
        return loss
    return closure


def everything(model, opt) -> list[torch.Tensor]:
    """θ and every tensor of the base optimizer's state."""
    base = opt.base_optimizer
    state = [v.clone() for p in model.parameters() for v in base.state[p].values()
             if isinstance(v, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()] + state


BASES = {
    "sgd": dict(base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd_fused": dict(base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, fused=True),
    "adam": dict(base_optimizer=torch.optim.Adam, lr=0.01),
    "adamw_fused": dict(base_optimizer=torch.optim.AdamW, lr=0.01, fused=True),
}
RULES = {
    "erm": lambda p, kw: ERM(p, **kw),
    "amp": lambda p, kw: AMP(p, epsilon=0.1, **kw),
    "amp2": lambda p, kw: AMP(p, epsilon=0.1, inner_iter=2, **kw),
    "sam": lambda p, kw: SAM(p, rho=0.05, **kw),
    "onepass": lambda p, kw: build_amp(p, "onepass", epsilon=0.1, **kw),
    "reuse": lambda p, kw: build_amp(p, "reuse", reuse_every=2, epsilon=0.1, **kw),
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_bad_step_leaves_theta_and_state_bit_identical(rule, base, poison):
    model = tiny()
    opt = RULES[rule](model.parameters(), dict(BASES[base]))
    opt.step(closure_for(model, opt))  # state exists
    before = everything(model, opt)
    opt.step(closure_for(model, opt, poison))
    after = everything(model, opt)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt.skipped_steps == 1
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        opt.poll()
    opt.step(closure_for(model, opt))  # training goes on from the same point
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_bad_first_step_leaves_fresh_state():
    model = tiny()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1, momentum=0.9)
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, opt, float("nan")))
    assert all(torch.equal(a, p) for a, p in zip(theta, model.parameters()))
    # the momentum buffer born in the skipped step is zero: the next step is a first step again
    assert all(not bool(opt.base_optimizer.state[p]["momentum_buffer"].any()) for p in model.parameters())


def test_fused_bases_need_no_snapshot():
    model = tiny()
    opt = AMP(model.parameters(), **BASES["sgd_fused"])
    for _ in range(2):
        opt.step(closure_for(model, opt))
    assert opt.guard.buffers() == []
    assert sum(t.numel() for t in opt.held_buffers()) == sum(p.numel() for p in model.parameters())


def test_policies():
    for policy, raises in (("skip", False), ("raise", True)):
        model = tiny()
        opt = AMP(model.parameters(), lr=0.1, nonfinite=policy)
        opt.step(closure_for(model, opt, float("nan")))
        if raises:
            with pytest.raises(NonFiniteLossError):
                opt.poll()
        else:
            assert opt.poll() == 1
    model = tiny()
    opt = AMP(model.parameters(), lr=0.1, check_finite=False)  # "off": the plain base step
    assert opt.nonfinite == "off"
    opt.step(closure_for(model, opt, float("nan")))
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters()) and opt.poll() == 0
    with pytest.raises(ValueError, match="nonfinite"):
        AMP(tiny().parameters(), lr=0.1, nonfinite="ignore")


def test_counters_survive_a_state_dict():
    model = tiny()
    opt = AMP(model.parameters(), lr=0.1, momentum=0.9)
    opt.step(closure_for(model, opt, float("nan")))
    other = AMP(model.parameters(), lr=0.1, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        other.poll()


def test_overflow_under_a_grad_scaler_is_skipped_and_backs_off():
    """fp16-style loss scaling: inf gradients skip the step (θ exact) and halve the scale."""
    model = tiny()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    from flatmin.optim import drive

    def grad_pass(p):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        scaler.scale(loss * (1e38 if p.kind == "final" else 1.0)).backward()  # overflows in the final pass
        return loss

    drive(opt, lambda p: (opt.zero_grad(), scaler.scale(F.cross_entropy(model(X), Y)).backward(),
                          torch.zeros(()))[-1], scaler=scaler)
    before = everything(model, opt)
    drive(opt, grad_pass, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, everything(model, opt)))
    assert float(scaler.get_scale()) == 2.0**15
    assert opt.overflow_steps == 1 and opt.skipped_steps == 1
    assert opt.poll() == 0  # an overflow is not a failure


def scaled_pass(model, opt, scaler, *, big=None, poison=None):
    """A gradient pass under ``scaler``: the loss times ``big`` (finite, but its scaled gradient
    overflows) in the passes of kind ``big[0]``, times ``poison`` (NaN) in every pass."""
    def run(p):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        if big is not None and p.kind == big[0]:
            loss = loss * big[1]
        if poison is not None:
            loss = loss * poison
        scaler.scale(loss).backward()
        return loss
    return run


@pytest.mark.parametrize("rule", ["amp", "amp2", "sam", "erm"])
@pytest.mark.parametrize("where", ["ascent", "final"])
def test_an_overflow_is_skipped_counted_apart_and_never_raised(rule, where):
    """A scale of 2^40 and a loss of ~1e30: the scaled gradient overflows float32 while every loss
    is finite. The step is skipped (θ and state exact), the scale halves, poll() does not raise —
    also when the overflow was in an ascent pass (whose NaN θ+Δ makes the later losses NaN)."""
    from flatmin.optim import drive

    model = tiny()
    opt = RULES[rule](model.parameters(), dict(BASES["sgd"]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    drive(opt, scaled_pass(model, opt, scaler), scaler=scaler)  # 2^40 · O(1): finite
    before = everything(model, opt)
    if where == "ascent" and not opt.ascent_passes():
        where = "final"
    drive(opt, scaled_pass(model, opt, scaler, big=(where, 1e30)), scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, everything(model, opt)))
    assert float(scaler.get_scale()) == 2.0**39
    assert opt.poll() == 0 and opt.skipped_steps == 1 and opt.overflow_steps == 1
    drive(opt, scaled_pass(model, opt, scaler), scaler=scaler)  # and training goes on
    assert opt.overflow_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, everything(model, opt)))
    other = RULES[rule](model.parameters(), dict(BASES["sgd"]))
    other.load_state_dict(opt.state_dict())
    assert other.overflow_steps == 1 and other.poll() == 0


@pytest.mark.parametrize("rule", ["amp", "sam", "erm"])
def test_a_nan_loss_under_a_scaler_still_raises(rule):
    from flatmin.optim import drive

    model = tiny()
    opt = RULES[rule](model.parameters(), dict(BASES["sgd"]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    drive(opt, scaled_pass(model, opt, scaler), scaler=scaler)
    before = everything(model, opt)
    drive(opt, scaled_pass(model, opt, scaler, poison=float("nan")), scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, everything(model, opt)))
    assert opt.overflow_steps == 0
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        opt.poll()


def test_two_call_form_overflow_under_a_scaler():
    """``restore_and_step(scaler=...)`` without losses: an overflowed final gradient is an overflow."""
    model = tiny()
    opt = SAM(model.parameters(), rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = everything(model, opt)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(X), Y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(X), Y) * 1e30).backward()
    opt.restore_and_step(scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, everything(model, opt)))
    assert opt.poll() == 0 and opt.overflow_steps == 1 and float(scaler.get_scale()) == 2.0**39


# --- every rule, every route: a NaN/inf in any pass changes nothing ---------------------------------

FAMILY = {
    "erm": lambda p: ERM(p, **SGD),
    "amp": lambda p: AMP(p, epsilon=0.1, **SGD),
    "amp2_per_tensor": lambda p: AMP(p, epsilon=0.1, inner_iter=2, ball="per_tensor", **SGD),
    "sam": lambda p: SAM(p, rho=0.05, **SGD),
    "asam": lambda p: SAM(p, rho=0.5, adaptive=True, **SGD),
    "sam_splits": lambda p: SAM(p, rho=0.05, splits=2, **SGD),
    "rmp": lambda p: RMP(p, radius=0.1, generator=torch.Generator().manual_seed(1), **SGD),
    "reuse": lambda p: build_amp(p, "reuse", reuse_every=2, epsilon=0.1, **SGD),
    "reuse_refresh": lambda p: build_amp(p, "reuse", reuse_every=2, epsilon=0.1, **SGD),
    "subbatch": lambda p: build_amp(p, "subbatch", ascent_fraction=0.5, epsilon=0.1, **SGD),
    "onepass": lambda p: build_amp(p, "onepass", epsilon=0.1, **SGD),
    "gsam": lambda p: GSAM(p, rho=0.05, alpha=0.4, rho_min=0.01, **SGD),
    "fsam": lambda p: FriendlySAM(p, rho=0.05, lmbda=0.6, **SGD),
    "looksam": lambda p: LookSAM(p, rho=0.05, k=2, **SGD),
    "looksam_exact": lambda p: LookSAM(p, rho=0.05, k=2, **SGD),
    "wsam": lambda p: WSAM(p, rho=0.05, **SGD),
    "wsam_coupled": lambda p: WSAM(p, rho=0.05, decouple=False, **SGD),
    "bsam": lambda p: BSAM(p, num_data=100, lr=0.05, generator=torch.Generator().manual_seed(2)),
    "esam": lambda p: ESAM(p, rho=0.05, beta=0.6, seed=1, **SGD),
    "msam": lambda p: MSAM(p, rho=0.3, **SGD),
}
SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
WARMUP = {"reuse_refresh": 2, "looksam_exact": 2}  # good steps first: the bad one refreshes / is exact


def state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state dict (base state, kept buffers, EMA), the guard's counters and
    a random generator's state aside (noise is drawn before a step's verdict exists: a schedule, as the
    host-side step counters of LookSAM's and ReuseAMP's k-cycles and ESAM's draw)."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if k not in ("guard", "generator"):
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(opt.state_dict())
    return out


def loss_at(model, opt, poison: bool, ascent: bool = False, split: int = 0, splits: int = 1):
    from flatmin.optim.driver import sub_batch

    opt.zero_grad()
    x, y = X.double(), Y
    if splits > 1:
        x, y = x[sub_batch(len(x), split, splits)], y[sub_batch(len(y), split, splits)]
    n = opt.ascent_size(len(x)) if ascent else len(x)
    loss = F.cross_entropy(model(x[:n]), y[:n])
    if poison:
        loss = loss * float("nan")
    loss.backward()
    return loss


def by_closure(model, opt, poison):
    """step(closure): the NaN in the first pass, or in every pass."""
    calls = [0]

    def closure(ascent=False, split=0, splits=1):
        bad = poison == "last" or calls[0] == 0 and poison == "first"
        calls[0] += 1
        return loss_at(model, opt, bad if poison else False, ascent, split, splits)
    opt.step(closure)


def by_perturb(model, opt, poison):
    """begin_step / perturb × N / restore_and_step, no losses handed in."""
    opt.begin_step()
    n = opt.ascent_passes()
    for i in range(n):
        loss_at(model, opt, poison == "first" and i == 0, ascent=True)
        opt.perturb()
    loss_at(model, opt, poison == "last" or (poison == "first" and n == 0))
    opt.restore_and_step()


def by_two_calls(model, opt, poison):
    """The popular SAM API: first_step / second_step."""
    loss_at(model, opt, poison == "first")
    opt.first_step(zero_grad=True)
    loss_at(model, opt, poison == "last")
    opt.second_step(zero_grad=True)


ROUTES = {"closure": by_closure, "perturb": by_perturb, "two_call": by_two_calls}


@pytest.mark.parametrize("poison", ["first", "last"])
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("rule", list(FAMILY))
def test_every_rule_every_route_skips_a_bad_step_bit_for_bit(rule, route, poison):
    model = tiny().double()
    opt = FAMILY[rule](model.parameters())
    if route == "two_call" and not hasattr(opt, "first_step"):
        pytest.skip(f"{type(opt).__name__} has no first_step/second_step")
    if route != "closure" and opt.ascent_splits() > 1:
        pytest.skip("m-sharpness in the two-call form needs next_split (tests/_two_call.py)")
    if (rule, route, poison) == ("looksam", "two_call", "first"):
        pytest.skip("a LookSAM reuse step's first_step only begins the step: that pass's gradient is dropped")
    for _ in range(WARMUP.get(rule, 1)):
        ROUTES[route](model, opt, None)
    theta, state = [p.detach().clone() for p in model.parameters()], state_tensors(opt)
    assert state, "the warm-up step made state"
    ROUTES[route](model, opt, poison)
    assert all(torch.equal(a, p) for a, p in zip(theta, model.parameters()))
    after = state_tensors(opt)
    assert len(after) == len(state) and all(torch.equal(a, b) for a, b in zip(state, after))
    assert opt.skipped_steps == 1
    with pytest.raises(NonFiniteLossError):
        opt.poll()
    ROUTES[route](model, opt, None)  # and training goes on, finite
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

"""A non-finite step is skipped on the device: θ and every optimizer state untouched, counted,
raised only at a poll — for unfused and fused base optimizers, and under a GradScaler."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import fixed_batch, tiny_model
from torch.nn import functional as F

from flatmin import AMP, SAM
from flatmin.errors import NonFiniteLossError
from flatmin.optim import ERM, build_amp

SIZES = (4, 5, 3)
X, Y = fixed_batch(8)


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
    model = tiny_model(sizes=SIZES)
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
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1, momentum=0.9)
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, opt, float("nan")))
    assert all(torch.equal(a, p) for a, p in zip(theta, model.parameters()))
    # no momentum from the skipped step: none on the CPU (the step was not taken), zeros where the
    # device path took it and put it back: either way the next step is a first step again
    assert all(not bool(opt.base_optimizer.state[p].get("momentum_buffer", torch.zeros(1)).any())
               for p in model.parameters())


def test_fused_bases_need_no_snapshot():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), **BASES["sgd_fused"])
    for _ in range(2):
        opt.step(closure_for(model, opt))
    assert opt.guard.buffers() == []
    assert sum(t.numel() for t in opt.held_buffers()) == sum(p.numel() for p in model.parameters())


def test_policies():
    for policy, raises in (("skip", False), ("raise", True)):
        model = tiny_model(sizes=SIZES)
        opt = AMP(model.parameters(), lr=0.1, nonfinite=policy)
        opt.step(closure_for(model, opt, float("nan")))
        if raises:
            with pytest.raises(NonFiniteLossError):
                opt.poll()
        else:
            assert opt.poll() == 1
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1, check_finite=False)  # "off": the plain base step
    assert opt.nonfinite == "off"
    opt.step(closure_for(model, opt, float("nan")))
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters()) and opt.poll() == 0
    with pytest.raises(ValueError, match="nonfinite"):
        AMP(tiny_model(sizes=SIZES).parameters(), lr=0.1, nonfinite="ignore")


def test_counters_survive_a_state_dict():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1, momentum=0.9)
    opt.step(closure_for(model, opt, float("nan")))
    other = AMP(model.parameters(), lr=0.1, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        other.poll()


def test_overflow_under_a_grad_scaler_is_skipped_and_backs_off():
    """fp16-style loss scaling: inf gradients skip the step (θ exact) and halve the scale."""
    model = tiny_model(sizes=SIZES)
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

    model = tiny_model(sizes=SIZES)
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

    model = tiny_model(sizes=SIZES)
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
    model = tiny_model(sizes=SIZES)
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



# Every rule × every route × NaN/inf in any pass: tests/conformance/test_conformance_step.py, generated
# from the rule registry (a hand-kept list of rules here would miss the next rule registered).

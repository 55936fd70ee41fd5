"""The conformance matrix, one process: every registered rule × every route that can drive it, for
each property a flatmin rule promises. Cells come from `rule_db.CASES` (the registry); none is
written by hand, so a new rule is tested here as soon as it is registered.

Properties: the neutral setting is the base optimizer bit for bit; every route equals the driver
bit for bit; a NaN/inf in any pass leaves θ and the optimizer's state bit for bit and raises at
``poll()``, on both of the guard's paths (the CPU's, which reads the step's flag and does not take a
bad step, and the accelerator's, which takes it and selects the old values back on the device), which
give the same trajectory; a GradScaler overflow is skipped and backs the scale off without an error;
a step makes no host sync; a ``state_dict`` round trip mid-training continues the same trajectory; bf16 and
fp16 (+ GradScaler) train.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conformance.rule_db import BASE, CASES, Poison, RuleCase, Step, batch, model, same, snapshot

from flatmin.errors import NonFiniteLossError
from flatmin.optim import nonfinite
from flatmin.optim.syncs import count_syncs

STEPS = 3
CELLS = [(c, r) for c in CASES for r in c.routes()]


def cell_id(x: object) -> str:
    return x.id if isinstance(x, RuleCase) else str(x)


@pytest.fixture(params=["cpu_path", "device_path"])
def guard_path(request, monkeypatch):
    """The step guard's two paths: the CPU's own (the flag read on the host), and the accelerator's (a
    select on the device, what a GPU runs), forced here on the CPU."""
    if request.param == "device_path":
        monkeypatch.setattr(nonfinite, "host_decides", lambda device: False)
    return request.param


def run(case: RuleCase, route: str, steps: int = STEPS, kwargs: dict | None = None, **step_kw):
    """A fresh model trained ``steps`` steps by ``route`` (the global RNG seeded: RMP and bSAM draw)."""
    net = model()
    opt = case.build(net.parameters(), **(kwargs or {}))
    torch.manual_seed(1)
    drv = Step(net, opt, case, **step_kw)
    for t in range(steps):
        drv.run(route, *batch(t))
    return net, opt


@pytest.mark.parametrize("case, route", CELLS, ids=cell_id)
def test_every_route_equals_the_driver(case, route):
    """Closure, two-call and first/second steps are the driver's step, bit for bit."""
    ref, _ = run(case, "drive")
    net, _ = run(case, route)
    for p, q in zip(ref.parameters(), net.parameters()):
        assert torch.equal(p, q), f"{case.id} by {route} left the driver's trajectory"


@pytest.mark.parametrize("case, route", [(c, r) for c, r in CELLS if c.neutral() is not None], ids=cell_id)
def test_the_neutral_setting_is_the_base_optimizer(case, route):
    """Radius 0 (the registry's neutral setting): the same weights as plain SGD on the same batches."""
    net, _ = run(case, route, kwargs=case.neutral())
    ref = model()
    sgd = torch.optim.SGD(ref.parameters(), **BASE)
    for t in range(STEPS):
        x, y = batch(t)
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        sgd.step()
    for p, q in zip(ref.parameters(), net.parameters()):
        if case.splits > 1:  # the mean of sub-batch gradients: equal up to the order of the sum
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
        else:
            assert torch.equal(p, q), f"{case.id} with {case.neutral()} by {route} is not the base optimizer"


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case, route", CELLS, ids=cell_id)
def test_a_non_finite_pass_changes_nothing_and_raises(case, route, value, which, guard_path):
    """Two good steps, then a step whose first or last pass is NaN/inf: θ and every state tensor
    bit for bit, poll() raises, training goes on."""
    net, opt = run(case, route, steps=2)
    opt.poll()
    before = snapshot(net, opt)
    Step(net, opt, case).run(route, *batch(2), Poison(value, which))
    after = snapshot(net, opt)
    diff = same(before, after)
    assert diff == [], f"{case.id} by {route}: a {which}-pass {value} changed {diff}"
    with pytest.raises(NonFiniteLossError):
        opt.poll()
    Step(net, opt, case).run(route, *batch(3))
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert all(bool(torch.isfinite(t).all()) for t in snapshot(net, opt).values() if t.is_floating_point())


@pytest.mark.parametrize("route", ["drive", "two_call"])
@pytest.mark.parametrize("case", CASES, ids=cell_id)
def test_a_scaler_overflow_is_skipped_and_is_not_an_error(case, route, guard_path):
    """Finite losses whose scaled gradients overflow: the step is skipped, the scale backs off, and
    poll() does not raise (an overflow is the scaler's business, not a non-finite loss)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    net32 = model(dtype=torch.float32)
    opt = case.build(net32.parameters())
    torch.manual_seed(1)
    drv = Step(net32, opt, case, scaler=scaler)
    drv.run(route, *batch(0, torch.float32))
    opt.poll()
    before = snapshot(net32, opt)
    drv.run(route, *batch(1, torch.float32), Poison(1e34, "all"))  # loss·1e34 finite, ·2^16 is not
    assert scaler.get_scale() < 2.0 ** 16
    assert same(before, snapshot(net32, opt)) == []
    assert opt.poll() == 0
    drv.run(route, *batch(2, torch.float32))
    assert all(bool(torch.isfinite(p).all()) for p in net32.parameters())


@pytest.mark.parametrize("case", CASES, ids=cell_id)
def test_both_guard_paths_give_the_same_trajectory(case, monkeypatch):
    """Good steps, a step with a NaN in its last pass, good steps again: the CPU's path (a bad step not
    taken) and the accelerator's (taken, then selected back) leave the same weights and state, bit for bit."""
    def trained() -> list[dict]:
        net, opt = run(case, "drive", steps=2)
        drv = Step(net, opt, case)
        drv.run("drive", *batch(2), Poison(float("nan"), "last"))
        after_bad = snapshot(net, opt)
        for t in (3, 4):
            drv.run("drive", *batch(t))
        return [after_bad, snapshot(net, opt)]
    cpu = trained()
    monkeypatch.setattr(nonfinite, "host_decides", lambda device: False)
    for when, a, b in zip(("after the bad step", "two steps later"), cpu, trained()):
        assert same(a, b) == [], f"{case.id}: the guard's two paths differ {when}"


@pytest.mark.parametrize("case, route", CELLS, ids=cell_id)
def test_a_step_makes_no_host_sync(case, route):
    net, opt = run(case, route, steps=1)
    drv = Step(net, opt, case)
    with count_syncs() as log:
        drv.run(route, *batch(1))
        drv.run(route, *batch(2))
    assert len(log) == 0, f"{case.id} by {route}:\n{log.describe()}"


@pytest.mark.parametrize("case", CASES, ids=cell_id)
def test_a_state_dict_round_trip_continues_the_same_trajectory(case):
    """Two steps, save, a fresh model and optimizer load it, two more: the uninterrupted run's weights."""
    ref, _ = run(case, "drive", steps=4)
    net, opt = run(case, "drive", steps=2)
    rng = torch.get_rng_state()
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))
    net2 = model(seed=7)
    opt2 = case.build(net2.parameters())
    net2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    torch.set_rng_state(rng)
    drv = Step(net2, opt2, case)
    for t in (2, 3):
        drv.run("drive", *batch(t))
    for p, q in zip(ref.parameters(), net2.parameters()):
        assert torch.equal(p, q), f"{case.id}: the resumed run left the trajectory"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=cell_id)
def test_mixed_precision_trains(case, precision):
    """bf16 autocast, and fp16 autocast with a GradScaler: steps run, stay finite, and move θ."""
    net = model(dtype=torch.float32)
    start = [p.detach().clone() for p in net.parameters()]
    opt = case.build(net.parameters())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    drv = Step(net, opt, case, scaler=scaler, autocast=dtype)
    torch.manual_seed(1)
    for t in range(4):
        drv.run("drive", *batch(t, torch.float32))
    assert opt.poll() == 0
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(start, net.parameters()))


@pytest.mark.parametrize("case", [c for c in CASES if "peers" in c.routes()], ids=cell_id)
def test_the_peers_loop_costs_no_extra_pass(case):
    """``loss.backward(); opt.step(closure)``: the caller's gradient at θ is the step's first pass when
    the rule's first pass is exactly that, so the closure runs one pass fewer than the driver's (2, not
    3, for SAM); otherwise it is dropped and the closure runs every pass."""
    from flatmin.optim import driver

    net = model()
    opt = case.build(net.parameters())
    opt.begin_step()
    takes = opt.ascent_passes() > 0 and driver._takes_given(opt, case.splits, opt.select_share())
    passes = case.splits * (1 + opt.ascent_passes())
    opt.restore()
    drv = Step(net, opt, case)
    drv.run("peers", *batch(0))
    assert drv.calls == passes - takes, f"{case.id}: {drv.calls} closure calls for {passes} passes"

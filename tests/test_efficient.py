"""Efficient AMP variants against plain loops written here, and their neutral settings against AMP."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.helpers import EPS, SGD_KW, ZETA, base_step_at_theta, batches, closure_for, run, tiny_model
from torch.nn import functional as F

from flatmin import AMP
from flatmin.errors import NonFiniteLossError
from flatmin.optim import OnePassAMP, ReuseAMP, SubBatchAMP, build_amp
from flatmin.optim._kernels import add_

pytestmark = pytest.mark.usefixtures("float64")


def reference(model, data, *, ball, k=1, frac=1.0, onepass=False, base_kw=SGD_KW):
    """Plain loop: Δ = Π_ε(ζ·g), g from a sub-batch every k steps, or the previous update's g."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **base_kw)

    def grad_at(values, x, y):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))

    def project(d):
        if ball == "global":
            norm = math.sqrt(sum(float(t.norm()) ** 2 for t in d))
            return [EPS * t / norm for t in d] if norm > EPS else d
        return [EPS * t / t.norm() if t.norm() > EPS else t for t in d]

    delta, prev = None, None
    for t, (x, y) in enumerate(data):
        theta = [p.detach().clone() for p in params]
        if onepass:
            delta = project([ZETA * g for g in prev]) if prev else [torch.zeros_like(p) for p in params]
        elif t % k == 0:
            m = math.ceil(frac * len(x) - 1e-9)
            delta = project([ZETA * g for g in grad_at(theta, x[:m], y[:m])])
        prev = grad_at([a + d for a, d in zip(theta, delta)], x, y)
        base_step_at_theta(params, theta, prev, base)
    return model


VARIANTS = {  # name: (build_amp kwargs, reference kwargs)
    "reuse3": (dict(variant="reuse", reuse_every=3), dict(k=3)),
    "subbatch_half": (dict(variant="subbatch", ascent_fraction=0.5), dict(frac=0.5)),
    "subbatch_0.3": (dict(variant="subbatch", ascent_fraction=0.3), dict(frac=0.3)),
    "reuse3_half": (dict(variant="reuse", reuse_every=3, ascent_fraction=0.5), dict(k=3, frac=0.5)),
    "onepass": (dict(variant="onepass"), dict(onepass=True)),
}


def make(model, variant, **kw):
    return build_amp(model.parameters(), **{**VARIANTS[variant][0], "epsilon": EPS, "inner_lr": ZETA,
                                            **SGD_KW, **kw})


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("ball", ["global", "per_tensor"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_plain_loop(variant, ball, foreach):
    data = batches(12)
    ref = reference(tiny_model(), data, ball=ball, **VARIANTS[variant][1])
    model = tiny_model()
    run(model, make(model, variant, ball=ball, foreach=foreach), data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("ball", ["global", "per_tensor"])
@pytest.mark.parametrize("inner_iter", [1, 2])
@pytest.mark.parametrize("neutral", [dict(variant="reuse", reuse_every=1),
                                     dict(variant="subbatch", ascent_fraction=1.0),
                                     dict(variant="reuse", reuse_every=1, ascent_fraction=1.0)])
def test_neutral_settings_are_exactly_amp(neutral, inner_iter, ball, foreach):
    data = batches(12)
    kw = dict(epsilon=EPS, inner_lr=ZETA, inner_iter=inner_iter, ball=ball, foreach=foreach, **SGD_KW)
    a, b = tiny_model(), tiny_model()
    run(a, AMP(a.parameters(), **kw), data)
    run(b, build_amp(b.parameters(), **neutral, **kw), data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_add_kernel_twins_are_equal():
    torch.manual_seed(0)
    src = [torch.randn(3, 4), torch.randn(5)]
    dst = [[torch.randn(3, 4), torch.randn(5)] for _ in range(2)]
    dst[1] = [t.clone() for t in dst[0]]
    add_(dst[0], src, foreach=True)
    add_(dst[1], src, foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(*dst))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_restore_is_bit_exact(variant):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    run(model, make(model, variant, lr=0.0, epsilon=0.5), batches(7))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip_continues_identically(variant):
    data = batches(11)
    model = tiny_model()
    opt = make(model, variant)
    run(model, opt, data[:5])  # mid-cycle for k = 3: step 5 reuses, step 6 refreshes
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, data[5:])
    stored = {"onepass": {"fresh", "grad"}, "reuse3": {"steps", "delta"}, "reuse3_half": {"steps", "delta"}}
    assert set(saved_opt["perturbation"]) - {"kind", "guard"} == stored.get(variant, set())
    if variant in stored:  # one buffer per parameter tensor
        assert len(next(v for v in saved_opt["perturbation"].values() if isinstance(v, dict))) == 4

    def resume(state):
        resumed = tiny_model(seed=123)
        resumed.load_state_dict(saved_model)
        opt2 = make(resumed, variant, epsilon=9.0, inner_lr=7.0)  # group values come from the dict
        opt2.load_state_dict(state)
        return run(resumed, opt2, data[5:])

    for p, q in zip(model.parameters(), resume(saved_opt).parameters()):
        assert torch.equal(p, q)
    if not variant.startswith("subbatch"):  # what the variant stores matters
        without = {k: v for k, v in saved_opt.items() if k != "perturbation"}
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), resume(without).parameters()))


@pytest.mark.parametrize("kw, expected", [
    (dict(variant="exact"), [[(False, 12)] * 2] * 6),
    (dict(variant="reuse", reuse_every=3), [[(False, 12)] * 2, [(False, 12)], [(False, 12)]] * 2),
    (dict(variant="reuse", reuse_every=2, inner_iter=2), [[(False, 12)] * 3, [(False, 12)]] * 3),
    (dict(variant="subbatch", ascent_fraction=0.5), [[(True, 6), (False, 12)]] * 6),
    (dict(variant="reuse", reuse_every=3, ascent_fraction=0.25), [[(True, 3), (False, 12)], [(False, 12)],
                                                                   [(False, 12)]] * 2),
    (dict(variant="onepass"), [[(False, 12)]] * 6),
])
def test_gradient_passes_per_step(kw, expected):
    model = tiny_model()
    opt = build_amp(model.parameters(), lr=0.1, epsilon=EPS, **kw)
    seen = []
    for x, y in batches(6):
        calls = []
        opt.step(closure_for(model, opt, x, y, calls))
        seen.append(calls)
    assert seen == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_call_protocol_equals_step(variant):
    data = batches(8)
    a, b = tiny_model(), tiny_model()
    run(a, make(a, variant), data)
    opt = make(b, variant)
    for x, y in data:
        opt.begin_step()
        for _ in range(opt.ascent_passes()):
            n = opt.ascent_size(len(x))
            opt.zero_grad()
            F.cross_entropy(b(x[:n]), y[:n]).backward()
            opt.perturb()
        opt.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt.restore_and_step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kw, ratio", [(dict(variant="exact"), 1.0), (dict(variant="subbatch"), 1.0),
                                       (dict(variant="reuse"), 2.0), (dict(variant="onepass"), 2.0)])
def test_extra_memory_in_parameter_sizes(kw, ratio):
    model = tiny_model()
    opt = build_amp(model.parameters(), lr=0.1, **kw)
    run(model, opt, batches(3))
    held = sum(t.numel() for t in opt.held_buffers())
    assert held == ratio * sum(p.numel() for p in model.parameters())


def test_nonfinite_gradients_are_not_kept():
    """A step a loss scaler skips (inf gradients) must not poison the kept Δ or gradient."""
    (x, y), = batches(1)
    for opt_cls, kw in ((ReuseAMP, dict(reuse_every=2)), (OnePassAMP, {})):
        model = tiny_model()
        opt = opt_cls(model.parameters(), lr=0.0, epsilon=EPS, **kw)
        for _ in range(3):
            opt.begin_step()
            for _ in range(opt.ascent_passes()):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                model[0].weight.grad[0, 0] = float("inf")
                opt.perturb()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            model[0].weight.grad[0, 0] = float("nan")
            opt.restore_and_step(lambda: None)  # a scaler that skipped the update
        kept = opt.held_buffers()
        assert kept and all(bool(torch.isfinite(t).all()) for t in kept)


@pytest.mark.parametrize("variant", ["onepass", "reuse"])
def test_a_skipped_step_changes_nothing_kept(variant):
    """A non-finite step leaves the kept gradient / Δ bit for bit: the run goes on as a twin that
    never saw the bad batch."""
    data = batches(4)
    models = [tiny_model(), tiny_model()]
    opts = [build_amp(m.parameters(), variant, lr=0.1, epsilon=0.5, momentum=0.9,
                      **({"reuse_every": 3} if variant == "reuse" else {})) for m in models]
    for m, o in zip(models, opts):
        run(m, o, data[:1])
    (x, y) = data[1]
    opts[0].step(lambda: F.cross_entropy(models[0](x), y) * float("nan"))
    with pytest.raises(NonFiniteLossError):
        opts[0].poll()
    if variant == "reuse":  # the k-cycle is a host counter: it moves on with the skipped step
        opts[1]._steps += 1
    for m, o in zip(models, opts):
        run(m, o, data[2:])
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def test_ascent_size():
    model = tiny_model()
    opt = SubBatchAMP(model.parameters(), lr=0.1, ascent_fraction=0.3)
    assert [opt.ascent_size(b) for b in (10, 12, 1)] == [3, 4, 1]
    assert AMP(model.parameters(), lr=0.1).ascent_size(12) == 12


@pytest.mark.parametrize("kw, name", [
    (dict(variant="reuse", reuse_every=0), "reuse_every"),
    (dict(variant="reuse", reuse_every=-2), "reuse_every"),
    (dict(variant="reuse", reuse_every=1.5), "reuse_every"),
    (dict(variant="reuse", reuse_every=True), "reuse_every"),
    (dict(variant="subbatch", ascent_fraction=0.0), "ascent_fraction"),
    (dict(variant="subbatch", ascent_fraction=1.5), "ascent_fraction"),
    (dict(variant="subbatch", ascent_fraction=-0.1), "ascent_fraction"),
    (dict(variant="subbatch", ascent_fraction=float("nan")), "ascent_fraction"),
    (dict(variant="subbatch", reuse_every=3), "reuse_every"),
    (dict(variant="onepass", ascent_fraction=0.5), "ascent_fraction"),
    (dict(variant="exact", ascent_fraction=0.5), "ascent_fraction"),
    (dict(variant="onepass", inner_iter=2), "inner_iter"),
])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        build_amp(tiny_model().parameters(), lr=0.1, **kw)


@pytest.mark.parametrize("cls, kw, name", [(ReuseAMP, dict(reuse_every=0), "reuse_every"),
                                           (ReuseAMP, dict(ascent_fraction=2.0), "ascent_fraction"),
                                           (SubBatchAMP, dict(ascent_fraction=0), "ascent_fraction")])
def test_classes_check_their_arguments_too(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(tiny_model().parameters(), lr=0.1, **kw)


def test_build_amp_accepts_a_config_with_neutral_fields():
    classes = {"exact": AMP, "reuse": ReuseAMP, "subbatch": SubBatchAMP, "onepass": OnePassAMP}
    for variant, cls in classes.items():
        opt = build_amp(tiny_model().parameters(), variant=variant, reuse_every=1, ascent_fraction=1.0,
                        lr=0.1, epsilon=0.1, base_optimizer=torch.optim.SGD, momentum=0.9)
        assert type(opt) is cls and opt.ascent_fraction == 1.0
    with pytest.raises(ValueError, match="variant must be one of exact, reuse, subbatch, onepass"):
        build_amp(tiny_model().parameters(), variant="looksam", lr=0.1)

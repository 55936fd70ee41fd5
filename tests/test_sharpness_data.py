"""The two rules that need the data, not only gradients: m-sharpness (`SAM(splits=G)`, one ascent per
sub-batch) and ESAM's sharpness-sensitive data selection (`ESAM(gamma=γ)`), each against a plain loop
of its paper/authors' algorithm (float64), the trainer against the optimizer's own API, and refusals."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tests._two_call import esam_step, msharp_step
from tests.helpers import TINY, Loop, batches, ctx_for, norm, params, tiny_model
from torch.nn import functional as F

from flatmin import ESAM, SAM
from flatmin.optim import drive
from flatmin.optim.driver import sub_batch
from flatmin.train.loop import train_step
from flatmin.train.methods import Batch

pytestmark = pytest.mark.usefixtures("float64")

BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-3)),
    "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)),
}


def ref_msharp(model, steps, rho, splits, adaptive, base_cls, base_kw):
    """Foret et al. §4.1: ε_k from sub-batch k's own gradient, the update from the mean of ∇L_k(θ+ε_k)."""
    loop = Loop(model, base_cls, base_kw)
    for x, y in steps:
        theta, total = loop.theta(), [torch.zeros_like(p) for p in loop.params]
        for k in range(splits):
            part = sub_batch(len(x), k, splits)
            g = loop.grad_at(theta, x[part], y[part])
            t = [th.abs() if adaptive else torch.ones_like(th) for th in theta]
            n = norm([ti * gi for ti, gi in zip(t, g)])
            point = [th + rho * ti * ti * gi / (n + TINY) for th, ti, gi in zip(theta, t, g)]
            total = [a + b / splits for a, b in zip(total, loop.grad_at(point, x[part], y[part]))]
        loop.step_from(theta, total)
    return model


def ref_esam_sds(model, steps, rho, beta, gamma, seed, base_cls, base_kw):
    """Du et al. 2022 as the authors' ``ESAM.step``: SWP draw, then the final pass on the ⌊γB⌋ examples
    whose loss rose most under ε (the top-k, see the class docstring)."""
    loop = Loop(model, base_cls, base_kw)
    rng, on = random.Random(seed), [True] * len(loop.params)
    for x, y in steps:
        theta = loop.theta()
        with torch.no_grad():
            before = F.cross_entropy(model(x), y, reduction="none")
        g = loop.grad_at(theta, x, y)
        g_on = [gi for gi, o in zip(g, on) if o]
        point = [t + (rho / beta) * gi / (norm(g_on) + TINY) if o else t for t, gi, o in zip(theta, g, on)]
        with torch.no_grad():
            for p, v in zip(loop.params, point):
                p.copy_(v)
            after = F.cross_entropy(model(x), y, reduction="none")
        idx = torch.topk(after - before, int(len(x) * gamma)).indices
        loop.step_from(theta, loop.grad_at(point, x[idx], y[idx]))
        on = [not rng.random() > beta for _ in loop.params]
        if not any(on):
            on[0] = True
    return model


def by_trainer(make, steps=None, accumulate=1):
    model = tiny_model()
    opt = make(model.parameters())
    for x, y in steps or batches(6):
        train_step(model, model, opt, Batch(x, y), ctx_for(accumulate))
    return model


MSHARP = [(3, False), (5, False), (2, True)]  # 12 = 3+3+2+2+2 for five sub-batches


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("splits,adaptive", MSHARP)
def test_msharp_matches_the_papers_loop(base, splits, adaptive):
    cls, kw = BASES[base]
    rho = 0.5 if adaptive else 0.1
    got = by_trainer(lambda p: SAM(p, cls, rho=rho, adaptive=adaptive, splits=splits, **kw))
    want = ref_msharp(tiny_model(), batches(6), rho, splits, adaptive, cls, kw)
    for a, b in zip(params(got), params(want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_msharp_differs_from_sam_and_step_closure_is_the_trainer():
    cls, kw = BASES["sgd_momentum_wd"]
    model = tiny_model()
    opt = SAM(model.parameters(), cls, rho=0.1, splits=3, **kw)
    for x, y in batches(6):
        def closure(split=0, splits=1, x=x, y=y):
            opt.zero_grad()
            part = sub_batch(len(x), split, splits)
            loss = F.cross_entropy(model(x[part]), y[part])
            loss.backward()
            return loss
        opt.step(closure)
    trainer = by_trainer(lambda p: SAM(p, cls, rho=0.1, splits=3, **kw))
    plain = by_trainer(lambda p: SAM(p, cls, rho=0.1, **kw))
    for a, b in zip(params(model), params(trainer)):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(params(trainer), params(plain)))


def test_msharp_two_call_form_with_next_split_is_the_trainer():
    """The popular API per sub-batch: first_step, final backward, next_split(); second_step ends it."""
    cls, kw = BASES["adam"]
    model = tiny_model()
    opt = SAM(model.parameters(), cls, rho=0.1, splits=3, **kw)
    for x, y in batches(6):
        msharp_step(model, opt, x, y, 3)
    trainer = by_trainer(lambda p: SAM(p, cls, rho=0.1, splits=3, **kw))
    for a, b in zip(params(model), params(trainer)):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="next_split"):
        opt.next_split()  # no sub-batch under way


def test_msharp_with_one_example_per_split_and_micro_batches():
    """More sub-batches than examples: one example each; micro-batches inside a sub-batch change nothing."""
    cls, kw = BASES["sgd_momentum_wd"]
    small = batches(4, batch=3)
    capped = by_trainer(lambda p: SAM(p, cls, rho=0.1, splits=8, **kw), small)
    want = ref_msharp(tiny_model(), small, 0.1, 3, False, cls, kw)
    for a, b in zip(params(capped), params(want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    acc = by_trainer(lambda p: SAM(p, cls, rho=0.1, splits=2, **kw), accumulate=3)
    one = by_trainer(lambda p: SAM(p, cls, rho=0.1, splits=2, **kw))
    for a, b in zip(params(acc), params(one)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("beta,gamma", [(1.0, 0.5), (0.6, 0.5), (1.0, 0.25)])
def test_esam_selection_matches_the_authors_loop(base, beta, gamma):
    cls, kw = BASES[base]
    got = by_trainer(lambda p: ESAM(p, cls, rho=0.2, beta=beta, gamma=gamma, seed=3, **kw))
    want = ref_esam_sds(tiny_model(), batches(6), 0.2, beta, gamma, 3, cls, kw)
    for a, b in zip(params(got), params(want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_esam_two_call_form_with_select_is_the_trainer():
    cls, kw = BASES["sgd_momentum_wd"]
    model = tiny_model()
    opt = ESAM(model.parameters(), cls, rho=0.2, beta=0.6, gamma=0.5, seed=3, **kw)
    for x, y in batches(6):
        assert len(esam_step(model, opt, x, y)) == 6
    trainer = by_trainer(lambda p: ESAM(p, cls, rho=0.2, beta=0.6, gamma=0.5, seed=3, **kw))
    for a, b in zip(params(model), params(trainer)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_esam_gamma_one_selects_nothing_and_is_swp():
    cls, kw = BASES["adam"]
    a = by_trainer(lambda p: ESAM(p, cls, rho=0.2, beta=0.6, gamma=1.0, seed=3, **kw))
    b = by_trainer(lambda p: ESAM(p, cls, rho=0.2, beta=0.6, seed=3, **kw))
    for x, y in zip(params(a), params(b)):
        assert torch.equal(x, y)


def _closure(model, opt, x, y):
    def closure(**_):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_callers_that_cannot_provide_the_data_are_refused_with_theta_untouched():
    x, y = batches(1)[0]
    model = tiny_model()
    esam = ESAM(model.parameters(), rho=0.2, gamma=0.5, lr=0.1)
    theta = copy.deepcopy(params(model))
    with pytest.raises(ValueError, match=r"gamma=0\.5.*per-example losses"):
        esam.step(_closure(model, esam, x, y))
    sam = SAM(model.parameters(), rho=0.2, splits=2, lr=0.1)
    with pytest.raises(ValueError, match=r"splits=2.*sub-batch"):
        drive(sam, lambda p: _closure(model, sam, x, y)())  # a caller that does not cut its batch
    with pytest.raises(ValueError, match=r"gamma=0\.5"):
        drive(esam, lambda p: None, finish=lambda p: None)  # a framework's order with no probe
    assert all(torch.equal(a, b) for a, b in zip(params(model), theta))
    assert not sam._begun and not esam._begun


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_splits_name_themselves(bad):
    with pytest.raises(ValueError, match="splits"):
        SAM(tiny_model().parameters(), splits=bad, lr=0.1)


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_bad_gamma_names_itself(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ESAM(tiny_model().parameters(), gamma=gamma, lr=0.1)

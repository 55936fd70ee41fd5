"""ASAM, MSAM and WSAM as their authors wrote them (issue 26): each authors' form against a float64 loop
written here from the authors' algorithm, and — when their code is on this machine — against their code
itself, run side by side (``scripts/fetch_authors_code.sh DIR`` then ``FLATMIN_AUTHORS_CODE=DIR``; the
files are read from their repositories at pinned commits, never copied into flatmin).

Every loop: the 5-7-3 float64 MLP, 12 batches, SGD with momentum 0.9 and weight decay (no Nesterov,
as the authors' runs), θ compared after the last step. The measured gaps the docstrings and
docs/family.md quote are asserted here (the default forms differ from the authors' by what they say).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from tests.helpers import closure_steps
from tests.helpers import rule_batches as batches
from tests.helpers import rule_net as net
from torch import nn
from torch.nn import functional as F

from flatmin import MSAM, SAM, WSAM, create_optimizer
from flatmin.train.config import TrainConfig, resolve
from flatmin.train.methods import get_method, sgd_kwargs

LR, MOM, WD, STEPS = 0.1, 0.9, 5e-3, 12
SGD = dict(lr=LR, momentum=MOM, weight_decay=WD)
AUTHORS = os.environ.get("FLATMIN_AUTHORS_CODE")


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def gap(a: nn.Module | list[torch.Tensor], b: nn.Module | list[torch.Tensor]) -> float:
    """max |Δθ| over every tensor."""
    a = params_of(a) if isinstance(a, nn.Module) else a
    b = params_of(b) if isinstance(b, nn.Module) else b
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@torch.enable_grad()
def grad_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list, decay_at=None) -> None:
    """SGD with momentum and weight decay, written out: d = g + wd·θ_d (θ_d: ``decay_at`` or θ),
    v ← μv + d (v₁ = d), θ ← θ − lr·v."""
    decay_at = params if decay_at is None else decay_at
    for i, (p, g, w) in enumerate(zip(params, grads, decay_at)):
        d = g + WD * w
        bufs[i] = d.clone() if bufs[i] is None else MOM * bufs[i] + d
        p.sub_(LR * bufs[i])


def flatmin_run(make, seed: int = 0) -> nn.Module:
    model = net(seed)
    closure_steps(make(model.parameters()), model, batches(STEPS))
    return model


# --- ASAM -----------------------------------------------------------------------------------------


def asam_loop(rho: float, eta: float, weights_only: bool) -> nn.Module:
    """ASAM's ascent with T = |w| + η on the weights (every tensor unless ``weights_only``: then the
    tensors of ≥ 2 dims) and T = I on the rest: e = ρ·T²g/(‖Tg‖ + 1e-12); the gradient at θ + e; θ back;
    the SGD step."""
    model = net()
    params, bufs = list(model.parameters()), [None] * 4
    with torch.no_grad():
        for x, y in batches(STEPS):
            g = grad_at(model, x, y)
            t = [p.abs() + eta if (p.ndim > 1 or not weights_only) else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            theta = [p.clone() for p in params]
            for p, ti, gi in zip(params, t, g):
                p.add_(rho * ti * ti * gi / (norm + 1e-12))
            gs = grad_at(model, x, y)
            for p, th in zip(params, theta):
                p.copy_(th)
            sgd_step(params, gs, bufs)
    return model


def asam(**kw):
    return lambda ps: SAM(ps, torch.optim.SGD, adaptive=True, **SGD, **kw)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("eta,weights_only", [(0.01, True), (0.0, True), (0.01, False), (0.0, False)])
def test_asam_forms_match_the_loop(float64, eta, weights_only, foreach):
    """The authors' form (η = 0.01, weights only), each half alone, and davda54's (η = 0, every tensor)."""
    ours = flatmin_run(asam(rho=0.5, eta=eta, weights_only=weights_only, foreach=foreach))
    assert gap(ours, asam_loop(0.5, eta, weights_only)) < 1e-12


def test_asam_default_is_davda54s_form_bit_for_bit(float64):
    """η = 0 on every tensor is the class default, bit for bit; and the authors' form is not it."""
    default = flatmin_run(asam(rho=0.5))
    explicit = flatmin_run(asam(rho=0.5, eta=0.0, weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), explicit.parameters()))
    assert gap(default, flatmin_run(asam(rho=0.5, eta=0.01, weights_only=True))) > 1e-6


def test_asam_weights_only_leaves_biases_unscaled(float64):
    """With η = 0 davda54's form gives a zero bias no perturbation at all (T = |0|); the authors' T = I
    moves it."""
    model = net()
    with torch.no_grad():
        model[0].bias.zero_()
    for weights_only, moved in ((False, False), (True, True)):
        m = net()
        m.load_state_dict(model.state_dict())
        opt = SAM(m.parameters(), torch.optim.SGD, adaptive=True, rho=0.5, weights_only=weights_only, **SGD)
        x, y = batches(1)[0]
        F.cross_entropy(m(x), y).backward()
        opt.first_step(zero_grad=True)
        assert bool(m[0].bias.abs().sum() > 0) is moved
        opt.restore()


def test_asam_authors_form_everywhere():
    """The registry carries η and weights_only to create_optimizer, the trainer's config and flags."""
    model = net()
    opt = create_optimizer(model, "asam", lr=0.1, eta=0.01, weights_only=True)
    assert {g["eta"] for g in opt.param_groups} == {0.01}
    assert all(g["weights_only"] for g in opt.param_groups)
    cfg = TrainConfig(method="asam", rho=0.5, lr=0.1, weight_decay=0.0, asam_eta=0.01, asam_weights_only=True)
    built = get_method("asam").build_optimizer(model.parameters(), cfg)
    assert built.param_groups[0]["eta"] == 0.01 and built.param_groups[0]["weights_only"] is True
    with pytest.raises(ValueError, match="eta"):
        SAM(model.parameters(), adaptive=True, eta=-1.0, lr=0.1)


# --- MSAM -----------------------------------------------------------------------------------------


def msam_loop(rho: float, perturbed_decay: bool) -> nn.Module:
    """The authors' MSAM (SGD) written out, weights stored at the perturbed point between steps: the
    gradient at p = θ − ρ·v/‖v‖; d = g + wd·p (``perturbed_decay``; else wd·θ); θ = p + ρ·v/‖v‖;
    v ← μv + d; θ ← θ − lr·v; the next p from the new v (no perturbation while v = 0)."""
    model = net()
    params = list(model.parameters())
    v = [torch.zeros_like(p) for p in params]
    inv = 0.0
    with torch.no_grad():
        for x, y in batches(STEPS):
            g = grad_at(model, x, y)  # model holds p
            stored = [p.clone() for p in params]
            for p, vi in zip(params, v):
                p.add_(rho * inv * vi)  # θ
            for i, (p, gi, si) in enumerate(zip(params, g, stored)):
                v[i] = MOM * v[i] + gi + WD * (si if perturbed_decay else p)
                p.sub_(LR * v[i])
            inv = 1.0 / (float(torch.sqrt(sum((vi ** 2).sum() for vi in v))) + 1e-12)
            for p, vi in zip(params, v):
                p.sub_(rho * inv * vi)
        for p, vi in zip(params, v):
            p.add_(rho * inv * vi)  # back to θ (the authors' move_back_from_momentumAscent)
    return model


def msam(**kw):
    return lambda ps: MSAM(ps, torch.optim.SGD, **SGD, **kw)


def test_msam_perturbed_decay_matches_the_authors_loop(float64):
    ours = flatmin_run(msam(rho=0.3, decay_at="perturbed"))
    assert gap(ours, msam_loop(0.3, perturbed_decay=True)) < 1e-12
    theta = flatmin_run(msam(rho=0.3))  # the default: decay at θ
    assert gap(theta, msam_loop(0.3, perturbed_decay=False)) < 1e-12


def test_msam_decay_placement_is_the_only_gap(float64):
    """Decay at θ leaves the authors' trajectory by wd·ρ per step: 1.56e-3 after 12 steps here; without
    weight decay the two placements are one."""
    drift = gap(flatmin_run(msam(rho=0.3)), msam_loop(0.3, perturbed_decay=True))
    assert 1.5e-3 < drift < 1.6e-3, drift
    none = dict(SGD, weight_decay=0.0)
    a = flatmin_run(lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, **none))
    b = flatmin_run(lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, decay_at="perturbed", **none))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_msam_perturbed_decay_foreach_and_single_tensor_agree(float64):
    a = flatmin_run(lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, decay_at="perturbed", foreach=True, **SGD))
    b = flatmin_run(lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, decay_at="perturbed", foreach=False, **SGD))
    assert gap(a, b) < 1e-13


def test_msam_refuses_perturbed_decay_with_adamw():
    model = net()
    with pytest.raises(ValueError, match="decay_at"):
        MSAM(model.parameters(), torch.optim.AdamW, decay_at="perturbed", lr=1e-3, weight_decay=1e-2)
    MSAM(model.parameters(), torch.optim.Adam, decay_at="perturbed", lr=1e-3, weight_decay=1e-2)
    with pytest.raises(ValueError, match="decay_at"):
        MSAM(model.parameters(), decay_at="elsewhere", lr=0.1)


def test_msam_trainer_runs_without_nesterov_by_default():
    """The authors' SGD has no Nesterov: the trainer's msam default, in the resolved config (which
    metrics.json records), overridable; every other method keeps the paper's Nesterov."""
    defaults = dict(epochs=1, batch_size=10, lr=0.1, weight_decay=1e-4)
    msam_cfg = resolve(TrainConfig(method="msam"), defaults, "mlp")
    assert msam_cfg.nesterov is False and msam_cfg.to_dict()["nesterov"] is False
    assert sgd_kwargs(msam_cfg)["nesterov"] is False
    assert resolve(TrainConfig(method="sam"), defaults, "mlp").nesterov is True
    assert resolve(TrainConfig(method="msam", nesterov=True), defaults, "mlp").nesterov is True
    assert create_optimizer(net(), "msam", lr=0.1).param_groups[0]["nesterov"] is False
    assert create_optimizer(net(), "sam", lr=0.1).param_groups[0]["nesterov"] is True
    from flatmin.cli.options import OPTIONS
    assert "false for msam" in OPTIONS["--nesterov"][2]


# --- WSAM -----------------------------------------------------------------------------------------


def clip_(tensors: list[torch.Tensor], max_norm: float | None) -> None:
    if max_norm is not None:
        norm = torch.sqrt(sum((t ** 2).sum() for t in tensors))
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for t in tensors:
            t.mul_(coef)


def wsam_loop(rho: float, gamma: float, decouple: bool, max_norm: float | None) -> tuple[nn.Module, int]:
    """The authors' WSAM written out: e = ρ·g/(‖g‖ + 1e-12) from the raw g; g clipped to ``max_norm``;
    g_s at θ + e, θ back, g_s clipped (each by its own norm); coupled: SGD on α·g_s + (1−α)·g;
    decoupled: SGD on g, then θ ← θ − lr·α·(g_s − g). Returns the model and how many clips bit."""
    alpha = gamma / (1 - gamma)
    model = net()
    params, bufs, clipped = list(model.parameters()), [None] * 4, 0
    with torch.no_grad():
        for x, y in batches(STEPS):
            g = grad_at(model, x, y)
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            theta = [p.clone() for p in params]
            for p, gi in zip(params, g):
                p.add_(rho * gi / (norm + 1e-12))
            gs = grad_at(model, x, y)
            for p, th in zip(params, theta):
                p.copy_(th)
            for t in (g, gs):
                before = [x.clone() for x in t]
                clip_(t, max_norm)
                clipped += any(not torch.equal(a, b) for a, b in zip(before, t))
            if decouple:
                sgd_step(params, g, bufs)
                for p, gi, si in zip(params, g, gs):
                    p.sub_(LR * alpha * (si - gi))
            else:
                sgd_step(params, [alpha * si + (1 - alpha) * gi for gi, si in zip(g, gs)], bufs)
    return model, clipped


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_wsam_matches_the_authors_loop(float64, decouple, max_norm, foreach):
    ours = flatmin_run(lambda ps: WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.88, decouple=decouple,
                                       max_norm=max_norm, foreach=foreach, **SGD))
    ref, clipped = wsam_loop(0.05, 0.88, decouple, max_norm)
    assert gap(ours, ref) < 1e-12
    if max_norm is not None:  # the clip bit on some passes, not on all: both branches were run
        assert 0 < clipped < 2 * STEPS, clipped


def test_wsam_defaults_are_the_authors_released_ones():
    """γ = 0.9, no clipping (their class since 23 May 2023); the first commit's 0.88 and 1.0 are keywords."""
    opt = WSAM(net().parameters(), lr=0.1)
    assert opt.param_groups[0]["gamma"] == 0.9 and opt.max_norm is None
    assert WSAM(net().parameters(), lr=0.1, gamma=0.88, max_norm=1.0).max_norm == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        WSAM(net().parameters(), lr=0.1, max_norm=0.0)
    cfg = TrainConfig(method="wsam", wsam_max_norm=1.0, rho=0.05, lr=0.1, weight_decay=0.0)
    built = get_method("wsam").build_optimizer(net().parameters(), cfg)
    assert built.max_norm == 1.0


@pytest.mark.parametrize("rule", ["wsam_max_norm", "msam_perturbed"])
def test_authors_forms_under_a_loss_scale(float64, rule):
    """WSAM's clip and MSAM's wd·ε act on unscaled gradients: a 2^10 loss scale through the driver
    changes nothing."""
    from flatmin.optim.driver import drive

    make = {"wsam_max_norm": lambda ps: WSAM(ps, torch.optim.SGD, rho=0.05, max_norm=0.3, **SGD),
            "msam_perturbed": msam(rho=0.3, decay_at="perturbed")}[rule]

    def run(scale):
        model = net()
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        for x, y in batches(4):
            def grad_pass(p, x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                (scaler.scale(loss) if scaler else loss).backward()
                return loss.detach()
            drive(opt, grad_pass, scaler=scaler)
        return model
    assert gap(run(None), run(2.0 ** 10)) < 1e-12


# --- the authors' own code, run side by side (when fetched) ----------------------------------------

needs_authors = pytest.mark.skipif(AUTHORS is None, reason="FLATMIN_AUTHORS_CODE not set "
                                   "(scripts/fetch_authors_code.sh DIR fetches the authors' files)")


def load(name: str, monkeypatch=None) -> types.ModuleType:
    path = Path(AUTHORS) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"authors_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_call(model, data, first, second) -> None:
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        first()
        F.cross_entropy(model(x), y).backward()
        second()


@needs_authors
def test_against_the_authors_asam(float64):
    """SamsungLabs/ASAM's ASAM (η = 0.01, 'weight' tensors scaled; every weight of this MLP is ≥ 2-D):
    flatmin's authors' form equals it to their 1e-16 guard against flatmin's 1e-12."""
    theirs = net()
    base = torch.optim.SGD(theirs.parameters(), **SGD)
    opt = load("asam").ASAM(base, theirs, rho=0.5, eta=0.01)
    two_call(theirs, batches(STEPS), opt.ascent_step, opt.descent_step)
    assert gap(flatmin_run(asam(rho=0.5, eta=0.01, weights_only=True)), theirs) < 1e-12
    assert gap(flatmin_run(asam(rho=0.5)), theirs) > 1e-4  # the default (davda54's) is another form


def stored_weights_loop(model: nn.Module, opt) -> None:
    """The authors' main.py for MSAM: weights moved up to θ+ε, one pass and ``step()`` per batch, moved
    back to θ at the end."""
    opt.move_up_to_momentumAscent()
    for x, y in batches(STEPS):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.move_back_from_momentumAscent()


@needs_authors
def test_against_the_authors_msam(float64):
    """MarlonBecker/MSAM's SGD MSAM (weights stored at the perturbed point, moved back at the end)."""
    theirs = net()
    stored_weights_loop(theirs, load("msam").MSAM(theirs.parameters(), rho=0.3, **SGD))
    assert gap(flatmin_run(msam(rho=0.3, decay_at="perturbed")), theirs) < 1e-12
    assert 1.5e-3 < gap(flatmin_run(msam(rho=0.3)), theirs) < 1.6e-3
    nesterov = flatmin_run(lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, decay_at="perturbed", nesterov=True,
                                           **SGD))
    assert gap(nesterov, theirs) > 1e-3  # what the trainer ran before it followed the authors


@needs_authors
def test_against_the_authors_adamw_msam(float64):
    """Their AdamW MSAM: equal without weight decay; with it they decay after the Adam step (torch's
    AdamW before it), a second-order gap."""
    for wd, bound in ((0.0, 1e-12), (1e-2, 1e-5)):
        theirs = net()
        adamw_msam = load("adamW_msam").AdamW_MSAM
        stored_weights_loop(theirs, adamw_msam(theirs.parameters(), lr=1e-2, weight_decay=wd, rho=0.3))
        ours = flatmin_run(lambda ps, wd=wd: MSAM(ps, torch.optim.AdamW, rho=0.3, lr=1e-2, weight_decay=wd))
        assert gap(ours, theirs) < bound, (wd, gap(ours, theirs))


@needs_authors
@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_against_the_authors_wsam(float64, monkeypatch, decouple, max_norm):
    """atorch's WeightedSAM, two-call form (their module's atorch imports stubbed: unused here)."""
    utils = types.ModuleType("atorch.optimizers.utils")
    utils.disable_running_stats = utils.enable_running_stats = lambda model: None
    for name, module in (("atorch", types.ModuleType("atorch")),
                         ("atorch.optimizers", types.ModuleType("atorch.optimizers")),
                         ("atorch.optimizers.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)
    theirs = net()
    base = torch.optim.SGD(theirs.parameters(), **SGD)
    opt = load("wsam").WeightedSAM(theirs, base, rho=0.05, gamma=0.88, decouple=decouple, max_norm=max_norm)
    two_call(theirs, batches(STEPS), lambda: opt.first_step(zero_grad=True),
             lambda: opt.second_step(zero_grad=True))
    ours = flatmin_run(lambda ps: WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.88, decouple=decouple,
                                       max_norm=max_norm, **SGD))
    assert gap(ours, theirs) < 1e-12


# --- the family benchmark's own grid for MSAM ------------------------------------------------------


def test_a_method_gets_its_own_tuning_grid():
    """``--tune msam:rho=...`` (MSAM's ρ up to the authors' 3) replaces the plain ρ grid for msam only."""
    from flatmin.errors import FlatminError
    from flatmin.experiments.tuning import candidates, parse_sweep

    sweep = parse_sweep(["rho=0.05,0.1", "msam:rho=0.3,1,3"])
    assert sweep == {"rho": [0.05, 0.1], "msam:rho": [0.3, 1.0, 3.0]}
    assert [c["rho"] for c in candidates("msam", sweep)] == [0.3, 1.0, 3.0]
    assert [c["rho"] for c in candidates("sam", sweep)] == [0.05, 0.1]
    assert candidates("erm", sweep) == [{}]
    assert parse_sweep(["wsam:max_norm=0.5,1"]) == {"wsam:wsam_max_norm": [0.5, 1.0]}
    with pytest.raises(FlatminError, match="unknown method"):
        parse_sweep(["nosuch:rho=1"])

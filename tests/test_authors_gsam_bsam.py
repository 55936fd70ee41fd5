"""GSAM and bSAM as their authors wrote them: flatmin against float64 loops written here, in our own
words, from the authors' code (read, not copied or run: big_vision's JAX ``gsam_gradient``, Apache-2.0;
team-approx-bayes/bayesian-sam's JAX ``optim.py``/``train.py``/``test.py``, GPL-3.0; no JAX here), over
12 steps, to ~1e-12; the author's PyTorch GSAM (MIT) itself where a checkout is named by
FLATMIN_AUTHORS_GSAM; and the trainer's recipes (GSAM's ρ schedule, bSAM's lr, warm-up, cosine, prior
precision and MC predictive at evaluation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.helpers import BASES, TINY, Loop, batches, closure_for, dot, norm, run, tiny_model
from torch.nn import functional as F

from flatmin import BSAM, GSAM
from flatmin.data import load_dataset
from flatmin.optim.rules.gsam import rho_at
from flatmin.train import TrainConfig
from flatmin.train.config import resolve
from flatmin.train.distributed import SingleProcess
from flatmin.train.loop import StepContext, evaluate, train
from flatmin.train.methods import get_method
from flatmin.train.metrics import MetricAccumulator

STEPS = 12
LR_MAX, LR_MIN = 0.1, 0.001  # big_vision's config: lr_min = linear_end (0.01) × lr
LRS = [LR_MAX - (LR_MAX - LR_MIN) * t / (STEPS - 1) for t in range(STEPS)]  # a linear decay, per step
pytestmark = pytest.mark.usefixtures("float64")  # module-scoped; the trainer's tests go back to float32


@pytest.fixture
def float32():
    """The trainer's tests: float32 weights, as a run has."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


# --- GSAM: the JAX gsam_gradient -----------------------------------------------------------------


def ref_gsam_jax(loop, data, *, rho_max, rho_min, alpha, adaptive_perturbation, minimize_fp):
    """big_vision trainers/proj/gsam/gsam.py, from its description: ρ_t from the lr; ε = ρ_t·g/(‖g‖+eps),
    times |w| when adaptive; the decomposition on unit vectors, no eps (its dual_vector)."""
    for (x, y), lr in zip(data, LRS):
        for group in loop.base.param_groups:
            group["lr"] = lr
        theta = loop.theta()
        g = loop.grad_at(theta, x, y)
        g_len = norm(g)
        rho_t = rho_max if LR_MAX == LR_MIN else (
            rho_min + (rho_max - rho_min) * (lr - LR_MIN) / (LR_MAX - LR_MIN))
        scale = [t.abs() if adaptive_perturbation else 1.0 for t in theta]
        point = [t + s * rho_t * gi / (g_len + TINY) for t, s, gi in zip(theta, scale, g)]
        gp = loop.grad_at(point, x, y)
        if minimize_fp:  # g's part orthogonal to g_p, subtracted from g_p
            unit = [v / norm(gp) for v in gp]
            along = dot(unit, g)
            d = [p - alpha * (c - along * u) for p, c, u in zip(gp, g, unit)]
        else:  # g_p's part orthogonal to g, added to g
            unit = [v / g_len for v in g]
            along = dot(unit, gp)
            d = [c + alpha * (p - along * u) for c, p, u in zip(g, gp, unit)]
        loop.step_from(theta, d)


def run_scheduled(model, opt, data):
    """The same per-step learning rates, set on the groups as any scheduler would."""
    for (x, y), lr in zip(data, LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step(closure_for(model, opt, x, y))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("scheduled", [True, False], ids=["rho_t", "constant_rho"])
@pytest.mark.parametrize("adaptive_perturbation", [False, True], ids=["sam_ascent", "adaptive_perturbation"])
@pytest.mark.parametrize("minimize_fp", [True, False], ids=["min_fp", "min_f"])
def test_gsam_matches_the_official_jax_gradient(foreach, scheduled, adaptive_perturbation, minimize_fp):
    base_cls, base_kw = BASES["sgd_nesterov_wd"]
    data = batches(STEPS)
    rho, rho_min, alpha = 0.3, 0.05, 0.6
    ref = Loop(tiny_model(), base_cls, base_kw)
    ref_gsam_jax(ref, data, rho_max=rho, rho_min=rho_min if scheduled else rho, alpha=alpha,
                 adaptive_perturbation=adaptive_perturbation, minimize_fp=minimize_fp)
    model = tiny_model()
    opt = GSAM(model.parameters(), base_cls, rho=rho, alpha=alpha, rho_min=rho_min if scheduled else None,
               lr_min=LR_MIN, adaptive_perturbation=adaptive_perturbation, minimize_fp=minimize_fp,
               foreach=foreach, **base_kw)
    run_scheduled(model, opt, data)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(tiny_model().parameters(), ref.theta()))
    gap = max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), ref.theta()))
    assert moved > 1e-2  # the 12 steps moved θ: the comparison is not of two untouched models
    assert gap < 1e-12, gap  # ≤ 6e-13 measured: the JAX decomposition has no 1e-12 guard, flatmin does


def test_gsam_rho_at_is_the_authors_formula_and_constant_without_a_range():
    assert rho_at(0.05, rho=0.3, rho_min=0.1, lr_max=0.1, lr_min=0.0) == pytest.approx(0.2)
    assert rho_at(0.1, rho=0.3, rho_min=0.1, lr_max=0.1, lr_min=0.1) == 0.3  # lr_max == lr_min: ρ (JAX)
    assert rho_at(0.05, rho=0.3, rho_min=None, lr_max=0.1) == 0.3


def test_gsam_one_adaptive_form_at_a_time():
    with pytest.raises(ValueError, match="exclude each other"):
        GSAM(tiny_model().parameters(), adaptive=True, adaptive_perturbation=True, lr=0.1)


def test_gsam_min_f_with_alpha_zero_is_the_clean_gradient_step():
    """minimize_fp=False, α = 0: d = g, the base optimizer's own step from θ (to rounding of 1·g)."""
    data = batches(5)
    a, b = tiny_model(), tiny_model()
    base = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    run(a, GSAM(a.parameters(), rho=0.2, alpha=0.0, minimize_fp=False, lr=0.1, momentum=0.9), data)
    for x, y in data:
        base.zero_grad()
        F.cross_entropy(b(x), y).backward()
        base.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


# --- GSAM in the trainer ---------------------------------------------------------------------------


@pytest.mark.usefixtures("float32")
@pytest.mark.parametrize("schedule, end", [("step", 0.1 * 0.1**2), ("cosine", 0.0), ("constant", 0.1)])
def test_the_trainer_gsam_rho_follows_its_lr_schedule(schedule, end):
    cfg = TrainConfig(method="gsam", dataset="spiral", epochs=8, lr=0.1, lr_schedule=schedule, rho=0.2,
                      gsam_rho_min=0.02)
    ds = load_dataset("spiral", val_fraction=0.1, seed=0)
    cfg = resolve(cfg, ds.defaults, ds.default_model)
    assert cfg.lr_end() == pytest.approx(end)
    opt = get_method("gsam").build_optimizer(tiny_model().parameters(), cfg)
    for epoch in range(cfg.epochs):
        lr = cfg.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        want = 0.2 if schedule == "constant" else 0.02 + 0.18 * (lr - end) / (0.1 - end)
        assert opt.radius(opt.param_groups[0]) == pytest.approx(want, abs=1e-15)
    assert cfg.lr_at(0) == 0.1 and opt.radius(opt.param_groups[0]) >= 0.02 - 1e-15


@pytest.mark.usefixtures("float32")
def test_train_gsam_with_the_schedule_records_it(tmp_path):
    cfg = TrainConfig(method="gsam", dataset="spiral", epochs=2, gsam_rho_min=0.01,
                      gsam_adaptive_perturbation=True, gsam_minimize_fp=False)
    result = train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert result["config"] == saved
    assert (saved["gsam_rho_min"], saved["gsam_adaptive_perturbation"], saved["gsam_minimize_fp"]) == (
        0.01, True, False)
    assert math.isfinite(result["test"]["nll"])


# --- bSAM: the authors' optim.py step, train.py schedule, test.py predictive ------------------------

BSAM_KW = dict(num_data=500, lr=0.05, betas=(0.9, 0.99), rho=0.01, damping=0.1, s_init=1.0)


def ref_bsam(loop, data, *, num_data, lr, betas, prior_precision, data_factor, rho, damping, s_init, gen):
    """build_bsam_optimizer with m = 1, called from train.py: N ← N·dafactor, then δ = priorprec/N; noise
    N(0, 1/(N·s)); the ascent ρ·g/s from the mean; gm, then θ with the old s, then s."""
    n = num_data * data_factor
    decay = prior_precision / n
    w = loop.theta()
    s = [torch.full_like(p, s_init) for p in w]
    gm = [torch.zeros_like(p) for p in w]
    for x, y in data:
        noise = [torch.randn(p.shape, generator=gen) for p in w]
        g = loop.grad_at([p + torch.sqrt(1.0 / (n * si)) * e for p, si, e in zip(w, s, noise)], x, y)
        g_eps = loop.grad_at([p + rho * gi / si for p, gi, si in zip(w, g, s)], x, y)
        gs = [torch.sqrt(si * gi**2) for si, gi in zip(s, g)]
        gm = [betas[0] * m + (1 - betas[0]) * (ge + decay * p) for m, ge, p in zip(gm, g_eps, w)]
        w = [p - lr * m / si for p, m, si in zip(w, gm, s)]
        s = [betas[1] * si + (1 - betas[1]) * (q + damping + decay) for si, q in zip(s, gs)]
    return w, s


@pytest.mark.parametrize("foreach", [True, False])
def test_bsam_with_prior_precision_and_data_factor_matches_the_authors(foreach):
    data = batches(STEPS)
    ref = Loop(tiny_model())
    w, s = ref_bsam(ref, data, **BSAM_KW, prior_precision=40.0, data_factor=4.0,
                    gen=torch.Generator().manual_seed(5))
    model = tiny_model()
    opt = BSAM(model.parameters(), **BSAM_KW, prior_precision=40.0, data_factor=4.0,
               generator=torch.Generator().manual_seed(5), foreach=foreach)
    run(model, opt, data)
    assert opt.param_groups[0]["weight_decay"] == 40.0 / (500 * 4.0)
    gap = max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), w))
    s_now = [opt.base_optimizer.state[p]["s"] for p in model.parameters()]
    s_gap = max(float((a - b).abs().max()) for a, b in zip(s_now, s))
    assert gap < 1e-12 and s_gap < 1e-12, (gap, s_gap)


def test_bsam_prior_precision_and_weight_decay_exclude_each_other():
    with pytest.raises(ValueError, match="give one"):
        BSAM(tiny_model().parameters(), num_data=10, prior_precision=1.0, weight_decay=1e-4)
    assert BSAM(tiny_model().parameters(), num_data=10).param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("epochs, warmup", [(181, 5), (10, 5), (12, 3)])
def test_the_warm_up_then_cosine_is_the_authors_per_epoch_factor(epochs, warmup):
    """train.py: epochs 0..E (E + 1 of them, `--epochs 180` is 181); warm-up linspace(0, 1, W + 1)[e + 1],
    then 0.5·(1 + cos(π·(e − W)/(E + 1 − W)))."""
    authors_e = epochs - 1
    cfg = TrainConfig(epochs=epochs, lr=0.5, lr_schedule="cosine", warmup_epochs=warmup)
    for epoch in range(authors_e + 1):
        if epoch < warmup:
            factor = float(torch.linspace(0.0, 1.0, warmup + 1, dtype=torch.float64)[epoch + 1])
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (authors_e + 1 - warmup)))
        assert cfg.lr_at(epoch) == pytest.approx(0.5 * factor, rel=1e-15, abs=1e-16)


def ref_predictive(model, w, s, x, *, n, samples, gen):
    """test.py --testmc: per batch, S draws θ_i = m + √(1/(N·dafactor·s))·ε, the softmax averaged; its
    NLL is −log of that average (their logsumexp with b = 1/S)."""
    params = list(model.parameters())
    probs = []
    with torch.no_grad():
        for _ in range(samples):
            noise = [torch.randn(p.shape, generator=gen) for p in params]
            for p, m, si, e in zip(params, w, s, noise):
                p.copy_(m + torch.sqrt(1.0 / (n * si)) * e)
            probs.append(torch.softmax(model(x), dim=1))
        for p, m in zip(params, w):
            p.copy_(m)
    return torch.stack(probs).mean(0)


def test_bsam_predict_is_the_authors_mc_predictive():
    model = tiny_model()
    opt = BSAM(model.parameters(), **BSAM_KW, prior_precision=40.0, data_factor=4.0,
               generator=torch.Generator().manual_seed(5))
    run(model, opt, batches(6))
    theta = [p.detach().clone() for p in model.parameters()]
    s = [opt.base_optimizer.state[p]["s"].clone() for p in model.parameters()]
    x, y = batches(1, seed=9, batch=40)[0]
    got = opt.predict(model, x, torch.Generator().manual_seed(3), samples=16)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)  # θ back bit for bit
    want = ref_predictive(model, theta, s, x, n=500 * 4.0, samples=16, gen=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.exp(), want, rtol=0, atol=1e-14)
    acc = MetricAccumulator()
    acc.update(got, y)
    nll = float(-torch.log(want[torch.arange(len(y)), y]).mean())
    assert acc.compute()["nll"] == pytest.approx(nll, rel=1e-12)
    assert torch.equal(opt.predict(model, x, samples=0), model(x))  # 0 samples: at the mean


# --- bSAM in the trainer ---------------------------------------------------------------------------


@pytest.mark.usefixtures("float32")
def test_the_trainer_runs_bsam_with_its_authors_recipe_unless_overridden():
    ds = load_dataset("spiral", val_fraction=0.1, seed=0)
    cfg = resolve(TrainConfig(method="bsam", dataset="spiral"), ds.defaults, ds.default_model)
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup_epochs, cfg.rho) == (0.5, "cosine", 5, 0.01)
    assert (cfg.bsam_prior_precision, cfg.bsam_data_factor, cfg.bsam_test_samples) == (40.0, 1.0, 32)
    opt = get_method("bsam").build_optimizer(tiny_model().parameters(), cfg)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.5, (0.9, 0.999), 40.0 / 540)
    own = resolve(TrainConfig(method="bsam", dataset="spiral", lr=0.1, lr_schedule="step", warmup_epochs=0,
                              bsam_prior_precision=5.0), ds.defaults, ds.default_model)
    assert (own.lr, own.lr_schedule, own.warmup_epochs, own.bsam_prior_precision) == (0.1, "step", 0, 5.0)
    sam = resolve(TrainConfig(method="sam", dataset="spiral"), ds.defaults, ds.default_model)
    assert sam.warmup_epochs == 0 and sam.bsam_prior_precision is None and sam.lr == ds.defaults["lr"]


@pytest.mark.usefixtures("float32")
def test_the_trainer_evaluates_bsam_through_its_predictive():
    ds = load_dataset("spiral", val_fraction=0.1, seed=0)
    cfg = resolve(TrainConfig(method="bsam", dataset="spiral", bsam_test_samples=4), ds.defaults,
                  ds.default_model)
    model = tiny_model(sizes=(2, 16, ds.num_classes)).float()
    method = get_method("bsam")
    opt = method.build_optimizer(model.parameters(), cfg)
    run(model, opt, [(ds.train.x[:64], ds.train.y[:64])] * 3)
    ctx = StepContext(cfg, method, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), 1.0,
                      SingleProcess(), method.predictor(model, opt, cfg))
    first, again = evaluate(model, ds.test, ds, ctx), evaluate(model, ds.test, ds, ctx)
    assert first == again  # the draws are seeded afresh for each evaluation
    gen = torch.Generator().manual_seed(cfg.seed)
    acc = MetricAccumulator()
    for start in range(0, len(ds.test), cfg.eval_batch_size):
        x = ds.transform(ds.test.x[start:start + cfg.eval_batch_size], False)
        acc.update(opt.predict(model, x, gen), ds.test.y[start:start + cfg.eval_batch_size])
    assert first == acc.compute()
    plain = StepContext(cfg, method, ctx.scaler, ctx.device, 1.0, SingleProcess())
    at_mean = evaluate(model, ds.test, ds, plain)
    assert at_mean["nll"] != first["nll"]


@pytest.mark.usefixtures("float32")
def test_train_bsam_records_its_recipe(tmp_path):
    cfg = TrainConfig(method="bsam", dataset="spiral", epochs=2, bsam_test_samples=2)
    result = train(cfg, tmp_path / "r", progress=False)
    c = result["config"]
    assert (c["lr"], c["lr_schedule"], c["warmup_epochs"], c["rho"]) == (0.5, "cosine", 5, 0.01)
    assert (c["bsam_prior_precision"], c["bsam_data_factor"], c["bsam_test_samples"]) == (40.0, 1.0, 2)
    assert math.isfinite(result["test"]["nll"])


# --- GSAM: the author's PyTorch code itself, where a checkout is at hand ---------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho_min", [0.3, 0.05], ids=["constant_rho", "rho_t"])
def test_gsam_equals_the_authors_pytorch_code_run_as_released(adaptive, rho_min, monkeypatch):
    """juntang-zhuang/GSAM (MIT), imported from a checkout named by FLATMIN_AUTHORS_GSAM (not vendored;
    skipped without it): its GSAM with its ProportionScheduler, stepped through set_closure/step."""
    import os
    import sys
    root = os.environ.get("FLATMIN_AUTHORS_GSAM")
    if not root or not os.path.isfile(os.path.join(root, "gsam", "gsam.py")):
        pytest.skip("FLATMIN_AUTHORS_GSAM does not name a checkout of juntang-zhuang/GSAM")
    monkeypatch.syspath_prepend(root)
    sys.modules.pop("gsam", None)
    from gsam import GSAM as AuthorsGSAM
    from gsam import ProportionScheduler

    data = batches(STEPS)
    base_cls, base_kw = BASES["sgd_nesterov_wd"]
    theirs = tiny_model()
    base = base_cls(theirs.parameters(), **base_kw)

    class LastLr:  # what their ProportionScheduler reads from a torch scheduler
        _last_lr = [LR_MAX]
    lrs = LastLr()
    rho_t = ProportionScheduler(lrs, max_lr=LR_MAX, min_lr=LR_MIN, max_value=0.3, min_value=rho_min)
    opt = AuthorsGSAM(theirs.parameters(), base, theirs, gsam_alpha=0.6, rho_scheduler=rho_t,
                      adaptive=adaptive)
    for (x, y), lr in zip(data, LRS):
        for group in base.param_groups:
            group["lr"] = lr
        lrs._last_lr = [lr]
        opt.update_rho_t()
        opt.set_closure(F.cross_entropy, x, y)
        opt.step()
    ours = tiny_model()
    mine = GSAM(ours.parameters(), base_cls, rho=0.3, alpha=0.6, adaptive=adaptive,
                rho_min=None if rho_min == 0.3 else rho_min, lr_min=LR_MIN, **{**base_kw, "lr": LR_MAX})
    run_scheduled(ours, mine, data)
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(theirs.parameters(), ours.parameters()))
    assert gap < 1e-15, gap  # 1.1e-16 measured: θ restored by copy here, by subtracting ε there
    sys.modules.pop("gsam", None)

"""The step driver: the trainer's update is the optimizer's own step and the papers' plain loops;
K micro-batches per pass give the one-batch step; misuse of the two-call protocol is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import EPS, SGD_KW, ZETA, batches, ctx_for, params, tiny_model
from tests.test_amp import reference_amp
from tests.test_efficient import reference
from tests.test_sam import reference_sam
from torch import nn
from torch.nn import functional as F

from flatmin import AMP, RMP, SAM
from flatmin.optim import ERM, build_amp
from flatmin.train import TrainConfig, train
from flatmin.train.loop import train_step
from flatmin.train.methods import Batch

pytestmark = pytest.mark.usefixtures("float64")


def rules() -> dict:
    """Every rule the trainer can build, on any parameters (RMP with a seeded generator)."""
    amp = dict(epsilon=EPS, inner_lr=ZETA, **SGD_KW)
    return {
        "erm": lambda p: ERM(p, torch.optim.SGD, **SGD_KW),
        "amp_global_n1": lambda p: AMP(p, ball="global", **amp),
        "amp_per_tensor_n1": lambda p: AMP(p, ball="per_tensor", **amp),
        "amp_global_n2": lambda p: AMP(p, ball="global", inner_iter=2, **amp),
        "amp_per_tensor_n2": lambda p: AMP(p, ball="per_tensor", inner_iter=2, **amp),
        "sam": lambda p: SAM(p, rho=0.05, **SGD_KW),
        "asam": lambda p: SAM(p, rho=0.5, adaptive=True, **SGD_KW),
        "rmp": lambda p: RMP(p, radius=0.1, generator=torch.Generator().manual_seed(7), **SGD_KW),
        "amp_reuse": lambda p: build_amp(p, "reuse", reuse_every=3, **amp),
        "amp_subbatch": lambda p: build_amp(p, "subbatch", ascent_fraction=0.5, **amp),
        "amp_onepass": lambda p: build_amp(p, "onepass", **amp),
    }


def by_trainer(rule: str, accumulate: int = 1, steps=None) -> nn.Module:
    model = tiny_model()
    opt = rules()[rule](model.parameters())
    ctx = ctx_for(accumulate)
    for x, y in steps or batches():
        train_step(model, model, opt, Batch(x, y), ctx)
    return model


def by_closure(rule: str) -> nn.Module:
    model = tiny_model()
    opt = rules()[rule](model.parameters())
    for x, y in batches():
        def closure(ascent=False, x=x, y=y):
            opt.zero_grad()
            n = opt.ascent_size(len(x)) if ascent else len(x)
            loss = F.cross_entropy(model(x[:n]), y[:n])
            loss.backward()
            return loss
        opt.step(closure)
    return model


@pytest.mark.parametrize("rule", list(rules()))
def test_trainer_update_is_the_optimizers_own_step(rule):
    """Bit for bit: the trainer and step(closure) run the same driver."""
    for a, b in zip(params(by_trainer(rule)), params(by_closure(rule))):
        assert torch.equal(a, b)


REFERENCES = {
    "erm": lambda m: _sgd_reference(m),
    "amp_global_n1": lambda m: reference_amp(m, batches(), epsilon=EPS, inner_lr=ZETA, inner_iter=1,
                                             ball="global", base_cls=torch.optim.SGD, base_kw=SGD_KW),
    "amp_per_tensor_n2": lambda m: reference_amp(m, batches(), epsilon=EPS, inner_lr=ZETA, inner_iter=2,
                                                 ball="per_tensor", base_cls=torch.optim.SGD, base_kw=SGD_KW),
    "sam": lambda m: reference_sam(m, batches(), rho=0.05, adaptive=False, base_kw=SGD_KW),
    "asam": lambda m: reference_sam(m, batches(), rho=0.5, adaptive=True, base_kw=SGD_KW),
    "amp_reuse": lambda m: reference(m, batches(), ball="global", k=3),
    "amp_subbatch": lambda m: reference(m, batches(), ball="global", frac=0.5),
    "amp_onepass": lambda m: reference(m, batches(), ball="global", onepass=True),
}


def _sgd_reference(model: nn.Module) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), **SGD_KW)
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("rule", list(REFERENCES))
def test_trainer_update_is_the_papers_loop(rule):
    """The trainer against Algorithm 1 / SAM / the variants written out plainly (float64)."""
    for a, b in zip(params(by_trainer(rule)), params(REFERENCES[rule](tiny_model()))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", list(rules()))
@pytest.mark.parametrize("k", [2, 4, 5])
def test_micro_batches_give_the_whole_batch_step(rule, k):
    """K micro-batches per pass (uneven for k = 5: 12 = 3+3+2+2+2) equal one pass on the batch."""
    for a, b in zip(params(by_trainer(rule, accumulate=k)), params(by_trainer(rule))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


SPIRAL = dict(dataset="spiral", epochs=3, batch_size=20, lr=0.1, dataset_options={"n_samples": 200})
ACCUMULATE = {
    "erm": {}, "amp_global_n1": dict(method="amp", ball="global"),
    "amp_per_tensor_n2": dict(method="amp", ball="per_tensor", inner_iter=2),
    "sam": dict(method="sam"), "amp_reuse": dict(method="amp", amp_variant="reuse", reuse_every=3),
    "amp_subbatch": dict(method="amp", amp_variant="subbatch", ascent_fraction=0.5),
    "amp_onepass": dict(method="amp", amp_variant="onepass"),
}


@pytest.mark.parametrize("name", list(ACCUMULATE))
def test_trainer_accumulate_4_reproduces_accumulate_1(name):
    torch.set_default_dtype(torch.float32)  # the trainer's own precision
    try:
        cfg = TrainConfig(**{**SPIRAL, **ACCUMULATE[name]})
        one = train(cfg, progress=False)
        four = train(cfg.replace(accumulate=4), progress=False)
    finally:
        torch.set_default_dtype(torch.float64)
    for split in ("train", "val", "test"):
        assert one[split]["error"] == four[split]["error"]
        assert abs(one[split]["nll"] - four[split]["nll"]) < 1e-4
        assert abs(one[split]["ece"] - four[split]["ece"]) < 1e-4


def test_only_the_first_pass_moves_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    ref = copy.deepcopy(model)
    opt = AMP(model.parameters(), lr=0.0, epsilon=0.5, inner_iter=3)
    (x, y), = batches(1)
    train_step(model, model, opt, Batch(x, y), ctx_for())
    ref(x)  # one forward in train mode: what the first pass alone does to the statistics
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


def test_a_closure_that_cannot_take_the_rules_keywords_is_refused_before_any_pass():
    """create_optimizer(model, "amp-subbatch") with a plain `def closure():` (the README's loop): one
    clear message naming the keyword and how to write the closure, and θ untouched."""
    import flatmin

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    for name, kw in [("amp-subbatch", {}), ("sam", {"splits": 2})]:
        opt = flatmin.create_optimizer(model, name, lr=0.1, **kw)

        def closure():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        with pytest.raises(ValueError, match="this closure does not take") as err:
            opt.step(closure)
        assert "def closure(" in str(err.value)
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_the_readmes_no_closure_loop_copied_as_written_is_step_closure_for_20_steps():
    """The README's two-call form with no zero_grad() before the first backward (restore_and_step
    consumes the gradients, so none leaks into the next step's ascent): 20 steps ≡ step(closure)."""
    data = batches(20)
    ours, ref = tiny_model(), tiny_model()
    opt = AMP(ours.parameters(), lr=0.1, epsilon=EPS, inner_lr=ZETA, momentum=0.9, nesterov=True)
    for x, y in data:  # the README's lines, verbatim but for the names
        F.cross_entropy(ours(x), y).backward();  opt.perturb()  # noqa: E702
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward();  opt.restore_and_step()  # noqa: E702
    ref_opt = AMP(ref.parameters(), lr=0.1, epsilon=EPS, inner_lr=ZETA, momentum=0.9, nesterov=True)
    for x, y in data:
        def closure(x=x, y=y):
            ref_opt.zero_grad()
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        ref_opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))

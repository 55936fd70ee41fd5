"""Zero host–device syncs in every step of every rule, on every path (counted on CPU by dispatch)."""

from __future__ import annotations

import pytest
import torch
from tests._two_call import esam_step
from tests.helpers import fixed_batch, tiny_model
from torch import nn
from torch.nn import functional as F

from flatmin import AMP, BSAM, ESAM, GSAM, MSAM, RMP, SAM, WSAM, FriendlySAM, LookSAM
from flatmin.optim import ERM, build_amp
from flatmin.optim.driver import sub_batch
from flatmin.optim.syncs import count_syncs
from flatmin.train import TrainConfig
from flatmin.train.distributed import SingleProcess
from flatmin.train.loop import StepContext, train_step
from flatmin.train.methods import Batch, get_method

K = 3  # consecutive steps counted (after one warm-up step that creates the state)
SIZES = (4, 6, 3)  # a tiny_model; with BatchNorm1d(6) after the first layer where it matters
X, Y = fixed_batch(12)
BASES = {"sgd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
         "sgd_fused": dict(lr=0.1, momentum=0.9, fused=True),
         # torch's unfused Adam reads its step counter with .item(): a CPU-resident scalar even when
         # training on a GPU (no device sync there), but indistinguishable from one on CPU — so fused
         "adam_fused": dict(base_optimizer=torch.optim.Adam, lr=0.01, fused=True)}
RULES = {
    "erm": lambda p, kw: ERM(p, **kw),
    "amp": lambda p, kw: AMP(p, epsilon=0.1, **kw),
    "amp_n2_per_tensor": lambda p, kw: AMP(p, epsilon=0.1, inner_iter=2, ball="per_tensor", **kw),
    "sam": lambda p, kw: SAM(p, rho=0.05, **kw),
    "asam": lambda p, kw: SAM(p, rho=0.5, adaptive=True, **kw),
    "rmp": lambda p, kw: RMP(p, radius=0.1, **kw),
    "amp_reuse": lambda p, kw: build_amp(p, "reuse", reuse_every=2, epsilon=0.1, **kw),
    "amp_subbatch": lambda p, kw: build_amp(p, "subbatch", ascent_fraction=0.5, epsilon=0.1, **kw),
    "amp_onepass": lambda p, kw: build_amp(p, "onepass", epsilon=0.1, **kw),
    "gsam": lambda p, kw: GSAM(p, rho=0.05, alpha=0.4, rho_min=0.01, **kw),
    "fsam": lambda p, kw: FriendlySAM(p, rho=0.05, **kw),
    "looksam": lambda p, kw: LookSAM(p, rho=0.05, k=2, **kw),
    "wsam": lambda p, kw: WSAM(p, rho=0.05, **kw),
    "wsam_coupled": lambda p, kw: WSAM(p, rho=0.05, decouple=False, **kw),
    "bsam": lambda p, kw: BSAM(p, num_data=100, lr=0.05),  # its own update: no base optimizer
    "esam": lambda p, kw: ESAM(p, rho=0.05, beta=0.5, **kw),
    "esam_sds": lambda p, kw: ESAM(p, rho=0.05, beta=0.5, gamma=0.5, **kw),
    "sam_splits": lambda p, kw: SAM(p, rho=0.05, splits=3, **kw),
    "msam": lambda p, kw: MSAM(p, rho=0.3, **kw),
}


def assert_no_sync(step, k: int = K) -> None:
    step()  # warm-up: state is created
    with count_syncs() as log:
        for _ in range(k):
            step()
    assert len(log) == 0, f"{len(log)} host sync(s) in {k} steps:\n{log.describe()}"


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("rule", [r for r in RULES if r != "esam_sds"])  # selection: no closure (refused)
def test_step_closure(rule, base):
    model = tiny_model(sizes=SIZES)
    opt = RULES[rule](model.parameters(), dict(BASES[base]))

    def closure(ascent=False, split=0, splits=1):
        opt.zero_grad()
        n = opt.ascent_size(len(X)) if ascent else len(X)
        part = sub_batch(n, split, splits)
        loss = F.cross_entropy(model(X[part]), Y[part])
        loss.backward()
        return loss

    assert_no_sync(lambda: opt.step(closure))


@pytest.mark.parametrize("rule", list(RULES))
def test_two_call_form(rule):
    model = tiny_model(sizes=SIZES)
    opt = RULES[rule](model.parameters(), dict(BASES["sgd"]))

    def step():
        opt.begin_step()
        for _ in range(opt.ascent_passes()):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.perturb()
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        opt.restore_and_step(losses=[loss])

    assert_no_sync(step)


def test_esam_two_call_form_with_selection():
    model = tiny_model(sizes=SIZES)
    opt = RULES["esam_sds"](model.parameters(), dict(BASES["sgd"]))

    assert_no_sync(lambda: esam_step(model, opt, X, Y))


def test_sam_first_second_step():
    model = tiny_model(sizes=SIZES)
    opt = SAM(model.parameters(), rho=0.05, lr=0.1)

    def step():
        F.cross_entropy(model(X), Y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(X), Y).backward()
        opt.second_step(zero_grad=True)

    assert_no_sync(step)


TRAINER = {  # name: (rule, TrainConfig changes)
    "fp32": ("amp", {}), "accumulate": ("amp", dict(accumulate=3)), "bf16": ("sam", dict(precision="bf16")),
    "fp16_scaler": ("amp", dict(precision="fp16")), "clip": ("amp_n2_per_tensor", dict(grad_clip=1.0)),
    "subbatch_accumulate": ("amp_subbatch", dict(accumulate=2)), "erm_fp16": ("erm", dict(precision="fp16")),
    "rmp": ("rmp", {}), "onepass": ("amp_onepass", {}), "reuse": ("amp_reuse", {}),
    "gsam_fp16": ("gsam", dict(precision="fp16")), "fsam_fp16": ("fsam", dict(precision="fp16")),
    "looksam_accumulate": ("looksam", dict(accumulate=2)), "wsam_fp16": ("wsam", dict(precision="fp16")),
    "bsam_fp16": ("bsam", dict(precision="fp16")), "esam": ("esam", {}),
    "msam_clip": ("msam", dict(grad_clip=1.0)), "sam_splits_accumulate": ("sam_splits", dict(accumulate=2)),
    "esam_sds_fp16": ("esam_sds", dict(precision="fp16")),
}


@pytest.mark.parametrize("case", list(TRAINER))
def test_trainer_step(case):
    rule, changes = TRAINER[case]
    model = tiny_model(sizes=SIZES, norm=nn.BatchNorm1d(6))
    opt = RULES[rule](model.parameters(), dict(BASES["sgd"]))
    cfg = TrainConfig(**changes)
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.precision == "fp16")
    ctx = StepContext(cfg, get_method("erm"), scaler, torch.device("cpu"), 1.0, SingleProcess())
    assert_no_sync(lambda: train_step(model, model, opt, Batch(X, Y), ctx))


@pytest.mark.parametrize("method", ["mixup", "label_smoothing", "flooding", "adv_training"])
def test_trainer_methods(method):
    model = tiny_model(sizes=SIZES)
    opt = RULES["amp"](model.parameters(), dict(BASES["sgd"]))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = StepContext(TrainConfig(method=method), get_method(method), scaler, torch.device("cpu"), 1.0,
                      SingleProcess())
    assert_no_sync(lambda: train_step(model, model, opt, Batch(X, Y), ctx))


def test_the_counter_sees_a_sync_and_names_the_line():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        if loss > 100:  # a host read: exactly what must not hide in a step
            pass
        return loss

    with count_syncs() as log:
        opt.step(closure)
    assert len(log) == 2 and "_local_scalar_dense" in log.describe() and "if loss > 100" in log.describe()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_step(precision):
    """Inside PerturbedModule.optimizer_step (Lightning's closure included), after the first step."""
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    import warnings

    from flatmin.integrations.lightning import PerturbedModule, PerturbedStep

    seen: list[str] = []

    class Net(PerturbedModule, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model(sizes=SIZES, norm=nn.BatchNorm1d(6))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x).float(), y)

        def configure_optimizers(self):
            return PerturbedStep(AMP(self.parameters(), lr=0.1, epsilon=0.1, momentum=0.9))

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            if batch_idx == 0:
                return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            with count_syncs() as log:
                super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            seen.extend(f"{op} at {where}" for op, where in log.events)

    data = torch.utils.data.TensorDataset(X.repeat(4, 1), Y.repeat(4))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=12))
    assert seen == [], seen[:5]

"""Lightning integration: AMP/SAM with automatic optimisation at 32-true, bf16-mixed and 16-mixed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning", reason="the lightning extra is not installed")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from tests._two_call import esam_step, msharp_step  # noqa: E402

from flatmin.integrations.lightning import PerturbedModule, PerturbedStep  # noqa: E402
from flatmin.optim import AMP, BSAM, ESAM, GSAM, RMP, SAM, WSAM, frozen_running_stats  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
STEPS = 12


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable-ish two-class problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 4, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def make_optimizer(method: str, params) -> AMP | SAM | RMP:
    """The optimizers under test, with radii large enough to matter on this toy."""
    if method == "amp":
        return AMP(params, lr=0.1, epsilon=0.5, inner_lr=1.0, momentum=0.9)
    if method == "amp-n2":
        return AMP(params, lr=0.1, epsilon=0.5, inner_lr=0.5, inner_iter=2, momentum=0.9)
    if method == "rmp":  # perturbs before any gradient: Lightning's own θ-gradient is not reusable
        return RMP(params, torch.optim.SGD, radius=0.5, lr=0.1, momentum=0.9)
    if method in FAMILY:
        return FAMILY[method](params)
    return SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)


FAMILY = {  # SAM's family: rules that rewrite the update (GSAM, WSAM) or bring their own (bSAM)
    "gsam": lambda p: GSAM(p, torch.optim.SGD, rho=0.1, alpha=0.4, lr=0.1, momentum=0.9),
    "wsam": lambda p: WSAM(p, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "bsam": lambda p: BSAM(p, num_data=192, lr=0.5, rho=0.01),
}


class Tiny(PerturbedModule, L.LightningModule):
    """4-16-2 MLP (with BatchNorm unless told); counts the passes of each kind."""

    def __init__(self, method: str, bn: bool = True) -> None:
        super().__init__()
        self.method = method
        norm = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.net = nn.Sequential(nn.Linear(4, 16), norm, nn.ReLU(), nn.Linear(16, 2))
        self.passes: dict[str, int] = {"ascent": 0, "final": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.passes[self.perturbation_pass] += 1
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def configure_optimizers(self):
        return PerturbedStep(make_optimizer(self.method, self.parameters()))


def loader(batch_size: int = 16) -> torch.utils.data.DataLoader:
    x, y = data()
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def fit(module: L.LightningModule, precision: str, steps: int = STEPS,
        scaler: torch.amp.GradScaler | None = None, accumulate: int = 1, batch_size: int = 16) -> L.Trainer:
    """A bare CPU trainer: no logger, checkpoints, progress bar or validation.

    Lightning turns ``precision="16-mixed"`` on CPU into bf16-mixed (with a warning); the plugin,
    given explicitly, runs real float16 autocast with a GradScaler on CPU.
    """
    plugins = None
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler or torch.amp.GradScaler("cpu"))]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps,
                        precision=None if plugins else precision, plugins=plugins, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no workers in the DataLoader" and friends
        trainer.fit(module, loader(batch_size))
    return trainer


def full_loss(model: nn.Module) -> float:
    """Training-set loss of the model in eval mode."""
    x, y = data()
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", ["amp", "sam", *FAMILY])
def test_trains_at_every_precision(method, precision):
    torch.manual_seed(0)
    module = Tiny(method)
    before = full_loss(module)
    trainer = fit(module, precision)
    if precision == "16-mixed":  # really float16 with a loss scale, not Lightning's bf16 fallback
        assert trainer.precision == "16-mixed" and trainer.precision_plugin.scaler is not None
        assert trainer.precision_plugin.scaler.get_scale() == 2.0**16  # no overflow, no back-off
    opt = trainer.optimizers[0]
    assert isinstance(opt, PerturbedStep) and not opt.perturbed.perturbed  # θ is back after every step
    assert trainer.global_step == STEPS
    assert module.passes == {"ascent": STEPS, "final": STEPS}  # two gradient passes per step
    after = full_loss(module)
    assert after < before - 0.05, (before, after)
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("method", ["amp", "sam"])
def test_32_true_is_the_plain_loop_bit_for_bit(method):
    torch.manual_seed(0)
    module = Tiny(method)
    reference = Tiny(method)
    reference.load_state_dict(module.state_dict())
    fit(module, "32-true")

    opt = make_optimizer(method, reference.parameters())
    reference.train()
    for step, (x, y) in enumerate(loader()):
        if step == STEPS:
            break

        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.perturb()
        opt.zero_grad()
        with frozen_running_stats(reference):  # the trainer's protocol: BN statistics move at θ only
            F.cross_entropy(reference(x), y).backward()
        opt.restore_and_step()
    for (name, a), b in zip(module.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm statistics: no drift


def test_16_mixed_overflowing_step_is_skipped_with_theta_intact():
    torch.manual_seed(0)
    module = Tiny("amp")
    before = {k: v.detach().clone() for k, v in module.named_parameters()}  # BN statistics move at θ anyway
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows float16 grads
    trainer = fit(module, "16-mixed", steps=1, scaler=scaler)
    for k, v in before.items():
        assert torch.equal(module.state_dict()[k], v), k
    assert scaler.get_scale() < 2.0**127  # the scaler saw the overflow and backed off
    assert not trainer.optimizers[0].perturbed.perturbed


def test_wrapper_shares_groups_and_state_with_the_base_optimizer():
    model = nn.Linear(3, 2)
    opt = PerturbedStep(make_optimizer("sam", model.parameters()))
    assert opt.param_groups is opt.perturbed.param_groups
    opt.param_groups[0]["lr"] = 0.01  # what a scheduler does
    assert opt.perturbed.base_optimizer.param_groups[0]["lr"] == 0.01
    assert opt.state_dict()["param_groups"][0]["rho"] == 0.1
    with pytest.raises(ValueError, match="flatmin AMP/SAM/RMP"):
        PerturbedStep(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("method", ["amp", "amp-n2", "sam", "rmp"])
def test_accumulating_two_batches_is_the_double_batch(method):
    """accumulate_grad_batches=2 with batch 8: every pass (ascent and final) covers both halves."""
    torch.manual_seed(0)
    whole = Tiny(method, bn=False)
    halves = Tiny(method, bn=False)
    halves.load_state_dict(whole.state_dict())
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    torch.manual_seed(1)  # RMP's draws
    fit(whole, "32-true")
    torch.manual_seed(1)
    fit(halves, "32-true", accumulate=2, batch_size=8)
    # training_step per step: Lightning's own pass over the first half (at θ), then both halves in every
    # pass that cannot reuse it (the second ascent of N = 2; the final pass; RMP's first pass)
    ascents = {"amp": 2, "amp-n2": 4, "sam": 2, "rmp": 1}[method]
    assert halves.passes == {"ascent": STEPS * ascents, "final": STEPS * 2}
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(halves.state_dict()[k], v, rtol=1e-5, atol=1e-6)
        assert not torch.equal(v, start[k]), k  # trained


class Forgetful(Tiny):
    """Overrides on_train_batch_start without calling super()."""

    def on_train_batch_start(self, batch, batch_idx):
        return None


def test_accumulation_needs_the_kept_batches():
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="must call super"):
        fit(Forgetful("sam", bn=False), "32-true", steps=1, accumulate=2, batch_size=8)


def test_accumulating_under_16_mixed_scales_the_rerun_batches_too():
    """float16 with a GradScaler: the re-run half is scaled like Lightning's own (a missing or double
    scale would be off by 2^16); equal to the double batch up to float16 rounding."""
    torch.manual_seed(0)
    whole = Tiny("amp", bn=False)
    halves = Tiny("amp", bn=False)
    halves.load_state_dict(whole.state_dict())
    fit(whole, "16-mixed")
    trainer = fit(halves, "16-mixed", accumulate=2, batch_size=8)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16  # no overflow, no back-off
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(halves.state_dict()[k], v, rtol=0, atol=5e-3)


class Split(Tiny):
    """Trains on the part of the batch the current pass uses (m-sharpness, ESAM's selection)."""

    def __init__(self, make, bn: bool = True) -> None:
        super().__init__("sam", bn)
        self.make = make

    def training_step(self, batch, batch_idx):
        self.passes[self.perturbation_pass] += 1
        x, y = self.perturbed_batch(batch)
        return F.cross_entropy(self(x).float(), y)

    def per_example_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x).float(), y, reduction="none")

    def configure_optimizers(self):
        return PerturbedStep(self.make(self.parameters()))


def _msharp(p):
    return SAM(p, torch.optim.SGD, rho=0.1, splits=3, lr=0.1, momentum=0.9)


def _esam(p):
    return ESAM(p, torch.optim.SGD, rho=0.1, beta=1.0, gamma=0.5, lr=0.1, momentum=0.9)


def test_msharp_at_32_true_is_the_two_call_loop_bit_for_bit():
    """Three sub-batches of 16 = 6+5+5, each its own ascent from θ; BN statistics move at θ only."""
    torch.manual_seed(0)
    module = Split(_msharp)
    reference = Split(_msharp)
    reference.load_state_dict(module.state_dict())
    fit(module, "32-true")
    assert module.passes == {"ascent": 3 * STEPS, "final": 3 * STEPS}
    opt = _msharp(reference.parameters())
    reference.train()
    for step, (x, y) in enumerate(loader()):
        if step == STEPS:
            break
        opt.zero_grad()
        msharp_step(reference, opt, x, y, 3, freeze=frozen_running_stats)
    for (name, a), b in zip(module.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_esam_selection_at_32_true_is_the_two_call_loop():
    torch.manual_seed(0)
    module = Split(_esam, bn=False)
    reference = Split(_esam, bn=False)
    reference.load_state_dict(module.state_dict())
    fit(module, "32-true")
    opt = _esam(reference.parameters())
    for step, (x, y) in enumerate(loader()):
        if step == STEPS:
            break
        esam_step(reference, opt, x, y)
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("make", [_msharp, _esam], ids=["msharp", "esam_sds"])
def test_data_rules_train_at_every_precision(make, precision):
    torch.manual_seed(0)
    module = Split(make)
    before = full_loss(module)
    trainer = fit(module, precision)
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() == 2.0**16  # no overflow, no back-off
    assert not trainer.optimizers[0].perturbed.perturbed and trainer.global_step == STEPS
    assert full_loss(module) < before - 0.05


def test_esam_selection_without_per_example_loss_is_one_message():
    class NoLoss(Split):
        per_example_loss = None

    with pytest.raises(ValueError, match="per_example_loss"):
        fit(NoLoss(_esam), "32-true", steps=1)

"""Flat-LoRA: against a float64 loop written from the paper, σ = 0 ≡ plain LoRA, and a LoRA fine-tune of a
tiny transformer built from a config (no download) under SAM and Flat-LoRA in the Hugging Face Trainer."""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatmin.optim import FlatLoRA, create_optimizer
from flatmin.optim.rules.flat_lora import ramp_factor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LR, MOMENTUM, DECAY, RANK, ALPHA = 0.1, 0.9, 1e-3, 2, 4.0


class ToyLoRA(nn.Module):
    """A LoRA Linear layer with peft's attribute names (what Flat-LoRA reads), so the rule is checked
    without peft; ``transposed`` stores W as (in, out) like GPT-2's Conv1D under ``fan_in_fan_out``."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, n_in: int, n_out: int, transposed: bool = False) -> None:
        super().__init__()
        self.base_layer = nn.Linear(n_in, n_out)
        if transposed:
            self.base_layer.weight = nn.Parameter(self.base_layer.weight.detach().T.clone())
        self.fan_in_fan_out = transposed
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, RANK, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(RANK, n_out, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.3)  # peft starts B at 0: W' = W would hide A, B
        self.scaling = {"default": ALPHA / RANK}
        self.base_layer.requires_grad_(False)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight.T if self.fan_in_fan_out else self.base_layer.weight
        lora = self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]
        return F.linear(x, w, self.base_layer.bias) + lora


def toy_model(transposed: bool = False) -> nn.Module:
    """Two LoRA layers and a fully trained head (peft's ``modules_to_save``), in float64."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=ToyLoRA(4, 6, transposed), act=nn.Tanh(),
                                     fc2=ToyLoRA(6, 5), head=nn.Linear(5, 3))).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def paper_std(w: torch.Tensor, delta: torch.Tensor, transposed: bool, sigma_t: float) -> torch.Tensor:
    """σ_t/√n·‖W'_i‖ per output row i of W' = W + delta (delta = s·B·A, out × in; n the input dimension),
    shaped like W as stored (in × out when ``transposed``)."""
    rows = (w.detach().T if transposed else w.detach()) + delta.detach()
    std = sigma_t / math.sqrt(rows.shape[1]) * rows.norm(dim=1, keepdim=True)
    return std.T if transposed else std


def paper_step(model: nn.Module, opt: torch.optim.Optimizer, noisy: list, g: torch.Generator, t: int,
               draw: bool = True) -> None:
    """W += N(0, std²) for each (W, std), one backward on batch t, every W put back, then the SGD step."""
    saved = [w.detach().clone() for w, _ in noisy]
    if draw:
        with torch.no_grad():
            for w, std in noisy:
                w.add_(torch.randn(w.shape, generator=g, dtype=w.dtype) * std)
    opt.zero_grad()
    x, y = batch(t)
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for (w, _), s in zip(noisy, saved):
            w.copy_(s)
    opt.step()


def reference(model: nn.Module, sigma: float, ramp: int, steps: int, seed: int = 7) -> list[torch.Tensor]:
    """The paper's step, written out: per LoRA layer W' = W + s·B·A, ε_ij ~ N(0, σ_t²/n·‖W'_i‖²) (n the input
    dimension) added to W; the head, trained in full, takes W' = W; one backward at W + ε; W put back; SGD on
    the trainable tensors. The noise comes from the same generator, drawn in the optimizer's order."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(trainable(model), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for t in range(steps):
        sigma_t = sigma * (0.5 * (1 - math.cos(math.pi * t / ramp)) if ramp and t < ramp else 1.0)
        noisy = []
        for layer in (model.fc1, model.fc2):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            w = layer.base_layer.weight
            noisy.append((w, paper_std(w, layer.scaling["default"] * (b @ a), layer.fan_in_fan_out, sigma_t)))
        head = model.head.weight
        noisy.append((head, paper_std(head, torch.zeros_like(head), False, sigma_t)))
        paper_step(model, opt, noisy, g, t, draw=sigma_t > 0)
    return [p.detach().clone() for p in model.parameters()]


def closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Forward and backward on (x, y), returning the loss."""
    def run() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return run


def flatmin_run(model: nn.Module, steps: int, **kw) -> list[torch.Tensor]:
    opt = FlatLoRA(trainable(model), torch.optim.SGD, model=model, lr=LR, momentum=MOMENTUM,
                   weight_decay=DECAY, **kw)
    for t in range(steps):
        opt.step(closure(model, *batch(t)))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "fan_in_fan_out"])
@pytest.mark.parametrize("ramp", [0, 3])
def test_matches_the_papers_loop(transposed, ramp):
    ours = flatmin_run(toy_model(transposed), 5, sigma=0.3, ramp=ramp,
                       generator=torch.Generator().manual_seed(7))
    theirs = reference(toy_model(transposed), 0.3, ramp, 5)
    plain = reference(toy_model(transposed), 0.0, 0, 5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(ours, plain))  # the noise did something


def test_base_weights_carry_the_noise_and_come_back_bit_for_bit():
    model = toy_model()
    opt = FlatLoRA(trainable(model), model=model, sigma=0.5, lr=LR)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    factors = [model.fc1.lora_A["default"].weight, model.fc1.lora_B["default"].weight]
    before = [f.detach().clone() for f in factors]
    opt.begin_step()
    assert not torch.equal(model.fc1.base_layer.weight, frozen["fc1.base_layer.weight"])  # W + ε
    assert torch.equal(model.fc1.base_layer.bias, frozen["fc1.base_layer.bias"])  # 1-d: never perturbed
    assert all(torch.equal(f, b) for f, b in zip(factors, before))  # A and B are not perturbed
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.restore_and_step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not torch.equal(factors[0], before[0])


def test_sigma_zero_is_plain_lora_bit_for_bit():
    ours = flatmin_run(toy_model(), 4, sigma=0.0)
    model = toy_model()
    opt = torch.optim.SGD(trainable(model), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for t in range(4):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, model.parameters(), strict=True))


def test_without_the_model_every_trainable_matrix_is_perturbed():
    """The plain form: no LoRA layer known, each trainable ≥ 2-d tensor takes its own filter-wise noise."""
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = FlatLoRA(net.parameters(), sigma=0.5, lr=LR, generator=torch.Generator().manual_seed(0))
    w0 = [p.detach().clone() for p in net.parameters()]
    opt.begin_step()
    changed = [not torch.equal(p, w) for p, w in zip(net.parameters(), w0)]
    assert changed == [True, False, True, False]
    opt.restore()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), w0))


def test_the_lora_form_makes_no_host_sync():
    from flatmin.optim.syncs import count_syncs

    model = toy_model(transposed=True)
    opt = FlatLoRA(trainable(model), model=model, sigma=0.3, ramp=2, lr=LR, momentum=MOMENTUM)
    x, y = batch(0)
    opt.step(closure(model, x, y))  # warm-up: state is created
    with count_syncs() as log:
        for _ in range(3):
            opt.step(closure(model, x, y))
    assert len(log) == 0, log.describe()


def test_a_non_finite_step_changes_nothing_and_raises():
    from flatmin.errors import NonFiniteLossError

    model = toy_model()
    opt = FlatLoRA(trainable(model), model=model, sigma=0.3, lr=LR, momentum=MOMENTUM)
    opt.step(closure(model, *batch(0)))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(1)
    opt.step(closure(model, x * float("nan"), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(NonFiniteLossError):
        opt.poll()


def test_ramp_factor():
    assert [ramp_factor(t, 0) for t in range(3)] == [1.0, 1.0, 1.0]
    assert ramp_factor(0, 4) == 0.0 and ramp_factor(2, 4) == pytest.approx(0.5) and ramp_factor(9, 4) == 1.0


def test_state_dict_continues_the_ramp_and_the_noise():
    model = toy_model()
    opt = FlatLoRA(trainable(model), model=model, sigma=0.2, ramp=5, lr=LR,
                   generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.step(closure(model, *batch(0)))
    state = opt.state_dict()
    assert state["perturbation"]["steps"] == 2
    again = FlatLoRA(trainable(model), model=model, sigma=0.2, ramp=5, lr=LR, generator=torch.Generator())
    again.load_state_dict(state)
    assert again._steps == 2 and torch.equal(again.generator.get_state(), opt.generator.get_state())


# -- peft ------------------------------------------------------------------------------------------


def peft_mlp(fan_in_fan_out: bool = False) -> nn.Module:
    """A float64 MLP whose two layers get peft LoRA adapters (B random, so that W' ≠ W)."""
    peft = pytest.importorskip("peft", reason="the peft extra is not installed")
    torch.manual_seed(0)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D
        layers = OrderedDict(fc1=Conv1D(6, 4), act=nn.Tanh(), fc2=Conv1D(3, 6))
    else:
        layers = OrderedDict(fc1=nn.Linear(4, 6), act=nn.Tanh(), fc2=nn.Linear(6, 3))
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["fc1", "fc2"], init_lora_weights=False,
                             fan_in_fan_out=fan_in_fan_out)
    return peft.get_peft_model(nn.Sequential(layers), config).double()


def peft_reference(model: nn.Module, sigma: float, steps: int, transposed: bool) -> list[torch.Tensor]:
    """`reference` on peft's layers: the same formula, read from peft's own attributes."""
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(trainable(model), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for t in range(steps):
        noisy = []
        for layer in layers:
            w = layer.get_base_layer().weight
            ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            noisy.append((w, paper_std(w, layer.scaling["default"] * ba, transposed, sigma)))
        paper_step(model, opt, noisy, g, t)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "fan_in_fan_out"])
def test_peft_layers_match_the_papers_loop(transposed):
    model = peft_mlp(transposed)
    opt = create_optimizer(model, "flat-lora", base="sgd", lr=LR, momentum=MOMENTUM, weight_decay=DECAY,
                           nesterov=False, no_decay_bias_and_norm=False, sigma=0.3,
                           generator=torch.Generator().manual_seed(7))
    held = {p for g in opt.param_groups for p in g["params"]}
    assert held == {p for n, p in model.named_parameters() if "lora_" in n}  # the adapters only
    for t in range(4):
        opt.step(closure(model, *batch(t)))
    ours = [p.detach().clone() for p in model.parameters()]
    theirs = peft_reference(peft_mlp(transposed), 0.3, 4, transposed)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["sam", "amp"])
def test_sam_and_amp_optimise_the_adapters_only(method):
    model = peft_mlp()
    opt = create_optimizer(model, method, lr=LR)
    assert {p for g in opt.param_groups for p in g["params"]} == \
        {p for n, p in model.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(2):
        opt.step(closure(model, *batch(t)))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n


def test_other_lora_layers_are_refused():
    peft = pytest.importorskip("peft", reason="the peft extra is not installed")
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(emb=nn.Embedding(10, 4), fc=nn.Linear(4, 2)))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["emb", "fc"]))
    with pytest.raises(ValueError, match="Embedding"):
        create_optimizer(model, "flat_lora", lr=LR)
    create_optimizer(model, "sam", lr=LR)  # SAM on the adapters does not care


# -- the Hugging Face Trainer with a peft model -----------------------------------------------------

VOCAB, LENGTH, N = 50, 8, 32


def tiny_gpt2_lora() -> nn.Module:
    """A 2-layer GPT-2 of width 32 from a config (no download), LoRA on c_attn (Conv1D: fan_in_fan_out)."""
    peft = pytest.importorskip("peft", reason="the peft extra is not installed")
    transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                           fan_in_fan_out=True, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # transformers' FutureWarning on a name peft still reads
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, lora)


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (N, LENGTH), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fine_tune(tmp_path, model: nn.Module, opt: torch.optim.Optimizer, perturbed: bool = True) -> float:
    """4 steps of the Hugging Face Trainer (PerturbedTrainer, or the plain one) on random tokens, on CPU."""
    from transformers import Trainer, TrainingArguments

    from flatmin.integrations.transformers import PerturbedTrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = (PerturbedTrainer if perturbed else Trainer)(model=model, args=args, train_dataset=Tokens(),
                                                                optimizers=(opt, None))
        return trainer.train().training_loss


@pytest.mark.parametrize("method", ["sam", "flat_lora"])
def test_lora_fine_tune_in_the_trainer(tmp_path, method):
    model = tiny_gpt2_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = create_optimizer(model, method, lr=0.05, **({"rho": 0.05} if method == "sam" else {"sigma": 0.1}))
    if method == "flat_lora":
        assert len(opt.targets(opt.param_groups[0])) == 2  # both layers' c_attn base weights
    loss = fine_tune(tmp_path, model, opt)
    assert math.isfinite(loss) and loss > 0
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), n  # the adapters trained
        else:
            assert torch.equal(p, before[n]), n  # every base weight back bit for bit, nothing else moved


@pytest.mark.parametrize("method", ["sam", "flat_lora"])
def test_zero_radius_is_plain_lora_in_the_trainer(tmp_path, method):
    """ρ = 0 / σ = 0: the plain Trainer's LoRA fine-tune with the same SGD and groups."""
    model = tiny_gpt2_lora()
    fine_tune(tmp_path, model, create_optimizer(model, "erm", lr=0.05), perturbed=False)
    plain = [p.detach().clone() for p in model.parameters()]
    model = tiny_gpt2_lora()
    fine_tune(tmp_path, model, create_optimizer(model, method, lr=0.05, **{"rho" if method == "sam" else
                                                                            "sigma": 0.0}))
    for a, b in zip(model.parameters(), plain, strict=True):
        assert torch.equal(a, b)


def test_trainer_binds_the_model_for_an_optimizer_it_builds(tmp_path):
    model = tiny_gpt2_lora()
    from transformers import TrainingArguments

    from flatmin.integrations.transformers import PerturbedTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no")
    trainer = PerturbedTrainer(model=model, args=args, train_dataset=Tokens(),
                               optimizer_cls_and_kwargs=(FlatLoRA, {"sigma": 0.1, "lr": 0.05}))
    trainer.create_optimizer()
    opt = trainer.perturbed_optimizer
    weights = {id(t.weight) for g in opt.param_groups for t in opt.targets(g)}
    c_attn = {id(m.get_base_layer().weight) for n, m in model.named_modules() if n.endswith("c_attn")
              and hasattr(m, "get_base_layer")}
    assert weights == c_attn

"""Hugging Face Trainer integration: a tiny randomly initialised BERT classifier (no download)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from flatmin.integrations.transformers import PerturbedTrainer  # noqa: E402
from flatmin.optim import AMP, RMP, SAM, OnePassAMP, ReuseAMP, SubBatchAMP  # noqa: E402
from flatmin.optim.syncs import count_syncs  # noqa: E402

N, LENGTH, VOCAB = 64, 8, 40


class Tokens(torch.utils.data.Dataset):
    """Random token sequences whose tokens come from the lower or upper half of the vocabulary: the label."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 2, (N,), generator=g)
        half = VOCAB // 2
        self.ids = torch.randint(1, half, (N, LENGTH), generator=g) + self.labels[:, None] * (half - 1)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """One layer, width 16, no dropout (so two runs see the same function)."""
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def arguments(out, **kw) -> TrainingArguments:
    """A quiet CPU run: no reports, no progress bar, no checkpoints unless asked."""
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=4, learning_rate=0.1,
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def train(trainer: Trainer, **kw) -> Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kw)
    return trainer


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], **tol) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tol)


def full_loss(model: torch.nn.Module) -> float:
    ds = Tokens()
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ds.ids, labels=ds.labels).loss)


def plain_run(args: TrainingArguments, make=None, scaled_for_ga: bool | None = False
              ) -> tuple[list[torch.Tensor], list[dict]]:
    """The plain Trainer with SGD-momentum: final parameters and log (loss, pre-clip gradient norm).
    Its ``loss_is_scaled_for_ga`` is told the truth (False: BERT's classification loss is a plain
    mean; None: the Trainer's own rule, right for a loss divided by ``num_items_in_batch``)."""
    model = (make or tiny_bert)()
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None))
    trainer.loss_is_scaled_for_ga = scaled_for_ga
    train(trainer)
    return params(model), [h for h in trainer.state.log_history if "loss" in h]


class ItemCountingBert(torch.nn.Module):
    """The tiny BERT with a loss that really is divided by ``num_items_in_batch`` (a sum over the
    window's items, as Hugging Face's causal-LM losses): the Trainer's rule is right for it."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.bert(input_ids=input_ids).logits
        if num_items_in_batch is None:
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("method", ["amp", "sam"])
def test_zero_radius_is_the_plain_trainer(tmp_path, method):
    """ε = 0 (ρ = 0): the perturbed run equals the plain Trainer with the base optimizer — with
    gradient accumulation (the Trainer's weighting of micro-batches), the linear LR schedule,
    clipping (max_grad_norm on the final gradient) and the logged loss and norm too."""
    args = arguments(tmp_path, max_steps=5, lr_scheduler_type="linear", max_grad_norm=0.5,
                     per_device_train_batch_size=4, gradient_accumulation_steps=2)
    theirs, their_log = plain_run(args)
    model = tiny_bert()
    if method == "amp":
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.0, inner_lr=1.0, momentum=0.9)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    trainer = train(PerturbedTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None)))
    assert_close(params(model), theirs, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the linear schedule drove the flatmin groups
    ours = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in ours] == pytest.approx([h["loss"] for h in their_log], rel=1e-5)
    assert [h["grad_norm"] for h in ours] == pytest.approx([h["grad_norm"] for h in their_log], rel=1e-4)
    assert any(h["grad_norm"] > 0.5 for h in ours)  # so the clip really acted


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_amp_trains(tmp_path, precision):
    model = tiny_bert()
    before = full_loss(model)
    opt = AMP(model.parameters(), lr=0.01, epsilon=0.02, inner_lr=1.0, base_optimizer=torch.optim.AdamW)
    trainer = PerturbedTrainer(model=model, args=arguments(tmp_path, max_steps=16, bf16=precision == "bf16"),
                               train_dataset=Tokens(), optimizers=(opt, None))
    train(trainer)
    assert trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16" else "no")
    after = full_loss(model)
    assert after < before - 0.2, (before, after)
    assert not opt.perturbed and trainer.state.global_step == 16
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 16 and all(h["grad_norm"] > 0 and h["skipped_steps"] == 0 for h in logged)


@pytest.mark.parametrize("make", [
    lambda p: RMP(p, torch.optim.SGD, radius=0.05, lr=0.2),
    lambda p: SubBatchAMP(p, lr=0.2, epsilon=0.5, inner_lr=1.0, ascent_fraction=0.5),
    lambda p: ReuseAMP(p, lr=0.2, epsilon=0.5, inner_lr=1.0, reuse_every=3),
    lambda p: OnePassAMP(p, lr=0.2, epsilon=0.5, inner_lr=1.0),
], ids=["rmp", "subbatch-amp", "reuse-amp", "onepass-amp"])
def test_other_rules_run(tmp_path, make):
    model = tiny_bert()
    before = full_loss(model)
    opt = make(model.parameters())
    train(PerturbedTrainer(model=model, args=arguments(tmp_path, max_steps=12, gradient_accumulation_steps=2),
                           train_dataset=Tokens(), optimizers=(opt, None)))
    assert full_loss(model) < before and not opt.perturbed


def test_accumulation_equals_the_double_batch(tmp_path):
    """gradient_accumulation_steps=2 with batch 8 is one step on batch 16, in every pass of AMP (N = 2).

    No clipping, so a wrongly weighted micro-batch shows. BERT's classification loss is a plain mean
    although its forward accepts ``num_items_in_batch``: the probe finds that out (the Trainer's own
    rule would add the two halves' means, twice the gradient — as the plain Trainer does)."""
    runs, norms, losses = [], [], []
    for batch, k in ((16, 1), (8, 2)):
        model = tiny_bert()
        opt = AMP(model.parameters(), lr=0.2, epsilon=0.5, inner_lr=1.0, momentum=0.9, inner_iter=2)
        args = arguments(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=k,
                         max_steps=4, max_grad_norm=0.0)
        trainer = PerturbedTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
        train(trainer)
        runs.append(params(model))
        norms.append([h["grad_norm"] for h in trainer.state.log_history if "loss" in h])
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(runs[0], params(tiny_bert())))  # it moved


@pytest.mark.parametrize("make, scaled", [(tiny_bert, False), (ItemCountingBert, None)],
                         ids=["plain-mean", "divided-by-item-count"])
def test_logged_loss_under_accumulation_is_the_plain_trainers(tmp_path, make, scaled):
    """gradient_accumulation_steps=2: the logged loss is the window's mean loss (≈ ln 2 for two
    balanced classes at initialisation, not 2·ln 2) and equals the plain Trainer's, told how its
    model's loss is reduced; ε = 0, so the parameters are equal too. The perturbed trainer is told
    nothing: for BERT (forward takes ``**kwargs``, loss a plain mean) its probe finds the weighting."""
    args = arguments(tmp_path, max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    theirs, their_log = plain_run(args, make, scaled_for_ga=scaled)
    model = make()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.0, inner_lr=1.0, momentum=0.9)
    trainer = train(PerturbedTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None)))
    ours = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert ours == pytest.approx([h["loss"] for h in their_log], rel=1e-5)
    assert ours[0] == pytest.approx(0.693, abs=0.05)
    assert_close(params(model), theirs, rtol=1e-5, atol=1e-6)
    assert trainer._loss_counts_items is (scaled is None)


def test_resume_continues_the_same_trajectory(tmp_path):
    def run(out, **kw) -> tuple[BertForSequenceClassification, PerturbedTrainer]:
        model = tiny_bert()
        opt = AMP(model.parameters(), lr=0.2, epsilon=0.5, inner_lr=1.0, momentum=0.9)
        args = arguments(out, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
        trainer = PerturbedTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
        return model, train(trainer, **kw)

    whole, _ = run(tmp_path / "a")
    resumed, trainer = run(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_close(params(resumed), params(whole), rtol=0, atol=0)
    state = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert state["perturbation"]["kind"] == "AMP/SGD" and state["state"]  # momentum buffers saved


def test_refuses_a_plain_optimizer(tmp_path):
    model = tiny_bert()
    trainer = PerturbedTrainer(model=model, args=arguments(tmp_path), train_dataset=Tokens(),
                               optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="needs a flatmin PerturbedOptimizer"):
        train(trainer)


def test_optimizer_from_the_trainers_parameter_groups(tmp_path):
    model = tiny_bert()
    trainer = PerturbedTrainer(model=model, args=arguments(tmp_path, weight_decay=0.01, max_steps=2),
                               train_dataset=Tokens(),
                               optimizer_cls_and_kwargs=(SAM, {"base_optimizer": torch.optim.SGD, "rho": 0.05,
                                                               "lr": 0.1}))
    train(trainer)
    groups = trainer.perturbed_optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and all(g["rho"] == 0.05 for g in groups)


def scaled_run(tmp_path, scaler: torch.amp.GradScaler | None) -> tuple[torch.nn.Module, AMP, Trainer]:
    """AMP with a loss scaler put where Accelerate puts fp16's (on CPU Accelerate makes none); the
    ascent stays inside the ball, so a loss scale left in it would show."""
    model = tiny_bert()
    opt = AMP(model.parameters(), lr=0.01, epsilon=1.0, inner_lr=0.1, base_optimizer=torch.optim.AdamW)
    trainer = PerturbedTrainer(model=model, args=arguments(tmp_path, max_steps=3, lr_scheduler_type="linear"),
                               train_dataset=Tokens(), optimizers=(opt, None))
    trainer.accelerator.scaler = scaler
    return model, opt, train(trainer)


def test_loss_scale_is_divided_out(tmp_path):
    """fp16's path: every pass's loss is scaled, the ascent and the update unscale (2^16 is exact)."""
    plain, _, _ = scaled_run(tmp_path, None)
    scaled, opt, trainer = scaled_run(tmp_path, torch.amp.GradScaler("cpu"))
    assert_close(params(scaled), params(plain), rtol=1e-6, atol=1e-7)
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 and opt.skipped_steps == 0


def test_overflowing_step_is_skipped_and_holds_the_schedule(tmp_path):
    start = params(tiny_bert())
    model, opt, trainer = scaled_run(tmp_path, torch.amp.GradScaler("cpu", init_scale=float("inf")))
    assert_close(params(model), start, rtol=0, atol=0)  # θ untouched, not θ+Δ
    assert opt.skipped_steps == 3 and not opt.perturbed
    assert opt.param_groups[0]["lr"] == 0.01  # the linear schedule did not advance over skipped steps


def test_the_perturbed_step_makes_no_host_sync(tmp_path, monkeypatch):
    """Accumulation, a loss scale, clipping and the guarded update: no sync inside the step
    (the Trainer syncs at its own points). The base is SGD: torch's non-fused Adam reads its step count."""
    logs = []
    step = PerturbedTrainer.perturbed_step

    def counted(self):
        with count_syncs() as log:
            step(self)
        logs.append(log)

    monkeypatch.setattr(PerturbedTrainer, "perturbed_step", counted)
    model = tiny_bert()
    opt = AMP(model.parameters(), lr=0.05, epsilon=0.1, inner_lr=1.0, inner_iter=2, momentum=0.9)
    args = arguments(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    trainer = PerturbedTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    train(trainer)
    assert len(logs) == 2 and all(len(log) == 0 for log in logs), "\n".join(log.describe() for log in logs)

"""The conformance matrix's framework routes: every registered rule through the trainer (at every
precision), Lightning and the Hugging Face Trainer, generated from `rule_db.CASES`.

The trainer cells are all in the default run (a run costs ~30 ms). Lightning and the Hugging Face
Trainer start a framework per cell (~0.5–2 s): the default run takes the first setting of each
rule, the `slow` mark (run by .ci/run) takes the rest.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from tests.conformance.rule_db import BASE, CASES, RuleCase, Step, batch, model
from torch.nn import functional as F

from flatmin.train import TrainConfig, train

SPIRAL = dict(dataset="spiral", epochs=1, batch_size=20, lr=0.1, dataset_options={"n_samples": 120})


def cell_id(x: object) -> str:
    return x.id if isinstance(x, RuleCase) else str(x)


def sampled(cases: list[RuleCase]) -> list:
    """The first setting of each rule in the default run; the others marked slow."""
    seen, out = set(), []
    for c in cases:
        marks = [pytest.mark.slow] if c.info.name in seen else []
        seen.add(c.info.name)
        out.append(pytest.param(c, marks=marks, id=c.id))
    return out


def trainer_fields(case: RuleCase, values: dict | None = None) -> dict | None:
    """The case as trainer config fields, None when a keyword has no trainer option (WSAM's decouple).
    A field whose trainer default is not the class default (ESAM's β, γ) gets the class default unless
    the case sets it, so the trainer runs the case's setting, not the trainer's preset."""
    out = {h.field: h.default for h in case.info.trainer_hypers
           if None not in (h.trainer_default, h.default) and h.trainer_default != h.default}
    for name, value in (values or case.kwargs).items():
        if name == "lr" and case.info.own_update:
            continue  # the trainer derives bSAM's step size from the protocol's lr
        h = next((h for h in case.info.hypers if h.name == name), None)
        if h is not None and h.field is None and value == h.default:
            continue  # a class keyword at its default (GSAM's rho_min=None): what the trainer does anyway
        if h is None or h.field is None:
            return None
        out[h.field] = value
    return out


TRAINER = [c for c in CASES if trainer_fields(c) is not None]


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
@pytest.mark.parametrize("case", TRAINER, ids=cell_id)
def test_the_trainer_runs_every_rule_at_every_precision(case, precision):
    fields = trainer_fields(case)
    cfg = TrainConfig(method=case.info.name, precision=precision, **SPIRAL, **fields)
    result = train(cfg, progress=False)
    assert result["epochs_completed"] == 1
    for split in ("train", "test"):
        assert torch.isfinite(torch.tensor(result[split]["nll"])), (case.id, precision, result[split])
    for field, value in fields.items():
        assert result["config"][field] == value  # the registry's field reached the run's record


@pytest.mark.parametrize("case", [c for c in TRAINER if c.neutral() is not None and c.splits == 1],
                         ids=cell_id)
def test_the_trainers_neutral_setting_is_erm(case):
    """The registry's neutral setting through the trainer: ERM's numbers exactly (ERM on the rule's own
    SGD where its authors' differs: MSAM's has no Nesterov)."""
    erm = train(TrainConfig(method="erm", **SPIRAL, **case.info.sgd_defaults), progress=False)
    fields = trainer_fields(case, case.neutral())
    if fields is None:
        pytest.skip(f"{case.id}: the neutral setting has no trainer option")
    ours = train(TrainConfig(method=case.info.name, **SPIRAL, **fields), progress=False)
    for split in ("train", "test"):
        assert ours[split] == erm[split], (case.id, split)


# -- Lightning ---------------------------------------------------------------------------------------


def _lightning_fit(case: RuleCase, steps: int):
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from flatmin.integrations.lightning import PerturbedModule, PerturbedStep

    class Module(PerturbedModule, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model(dtype=torch.float32)

        def training_step(self, b, batch_idx):
            x, y = self.perturbed_batch(b)
            return F.cross_entropy(self.net(x), y)

        def on_train_batch_start(self, b, batch_idx):
            if batch_idx == 0:
                torch.manual_seed(1)  # the driver's seed, after Lightning's own draws (its loader's seed)
            return super().on_train_batch_start(b, batch_idx)

        def per_example_loss(self, b):
            x, y = b
            return F.cross_entropy(self.net(x), y, reduction="none")

        def configure_optimizers(self):
            return PerturbedStep(case.build(self.net.parameters()))

    data = torch.utils.data.DataLoader([batch(t, torch.float32) for t in range(steps)], batch_size=None)
    module = Module()
    torch.manual_seed(1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return module.net, trainer


@pytest.mark.parametrize("case", sampled(CASES), ids=cell_id)
def test_lightning_is_the_driver_bit_for_bit(case):
    """32-true Lightning (automatic optimisation) ≡ the driver's step on the same batches."""
    if case.build(model().parameters()).batch_fraction(True) < 1:
        with pytest.raises(ValueError, match="sub-batch ascent"):  # refused in one line, before a step
            _lightning_fit(case, 3)
        return
    net, trainer = _lightning_fit(case, 3)
    ref = model(dtype=torch.float32)
    opt = case.build(ref.parameters())
    torch.manual_seed(1)
    drv = Step(ref, opt, case)
    for t in range(3):
        drv.run("drive", *batch(t, torch.float32))
    for p, q in zip(ref.parameters(), net.parameters()):
        assert torch.equal(p, q), f"{case.id}: Lightning left the driver's trajectory"


# -- Hugging Face Trainer --------------------------------------------------------------------------


class Pairs(torch.utils.data.Dataset):
    """The matrix's batches as a dataset of examples (x, label)."""

    def __init__(self, steps: int) -> None:
        xs, ys = zip(*(batch(t, torch.float32) for t in range(steps)))
        self.x, self.y = torch.cat(xs), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class Classifier(torch.nn.Module):
    """The matrix's MLP with the Trainer's calling convention (a loss when labels are given)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model(dtype=torch.float32)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


@pytest.mark.parametrize("case", sampled([c for c in CASES if c.splits == 1 and not c.selects]), ids=cell_id)
def test_the_hugging_face_trainer_trains_every_rule(case, tmp_path):
    """PerturbedTrainer drives the rule (3 steps, no skip, θ moved, nothing left perturbed), and with
    the rule's neutral setting it is the base optimizer's trajectory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from transformers import Trainer, TrainingArguments

    from flatmin.integrations.transformers import PerturbedTrainer

    def args() -> TrainingArguments:
        return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=12, max_steps=3,
                                 learning_rate=BASE["lr"], report_to=[], save_strategy="no", use_cpu=True,
                                 seed=0, disable_tqdm=True, dataloader_num_workers=0,
                                 lr_scheduler_type="constant", max_grad_norm=0.0)

    def fit(kwargs: dict) -> Classifier:
        net = Classifier()
        opt = case.build(net.parameters(), **kwargs)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PerturbedTrainer(model=net, args=args(), train_dataset=Pairs(3), optimizers=(opt, None)).train()
        assert opt.poll() == 0 and not opt.perturbed
        return net

    start = Classifier()
    net = fit({})
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), net.parameters()))
    if case.neutral() is None:
        return
    ref = Classifier()
    sgd = torch.optim.SGD(ref.parameters(), **BASE)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=ref, args=args(), train_dataset=Pairs(3), optimizers=(sgd, None)).train()
    for a, b in zip(ref.parameters(), fit(case.info.neutral).parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

"""The trainer: every method learns, runs are deterministic, resume after kill -9 is exact."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from flatmin.errors import ConfigError, FlatminError, NonFiniteLossError, UnknownNameError
from flatmin.optim import AMP
from flatmin.train import METHODS, TrainConfig, load_run, train
from flatmin.train.loop import StepContext, train_step
from flatmin.train.methods import Batch, get_method

SPIRAL = dict(dataset="spiral", epochs=4, batch_size=20, lr=0.1,
              dataset_options={"n_samples": 200})
FLATMIN = [sys.executable, "-m", "flatmin"]


@pytest.fixture(scope="module")
def initial_nll():
    """The untrained model's train NLL: the same seed with lr = 0."""
    untrained = TrainConfig(method="erm", **{**SPIRAL, "lr": 0.0, "epochs": 1})
    return train(untrained, progress=False)["train"]["nll"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lowers_the_loss(method, initial_nll):
    result = train(TrainConfig(method=method, **SPIRAL), progress=False)
    assert result["train"]["nll"] < initial_nll - 0.03, (result["train"], initial_nll)
    assert set(result["test"]) >= {"error", "nll", "ece"}
    assert result["config"]["method"] == method and result["epochs_completed"] == 4


def test_mnist1d_default_model_trains_a_little():
    cfg = TrainConfig(dataset="mnist1d", method="erm", epochs=5, batch_size=100, lr=0.1, milestones=())
    result = train(cfg, progress=False)
    assert result["config"]["model"] == "cnn1d"
    assert result["test"]["error"] < 80.0  # 10 classes: chance is 90%


def test_same_seed_same_numbers_and_other_seed_differs():
    a = train(TrainConfig(method="amp", seed=3, **SPIRAL), progress=False)
    b = train(TrainConfig(method="amp", seed=3, **SPIRAL), progress=False)
    c = train(TrainConfig(method="amp", seed=4, **SPIRAL), progress=False)
    for split in ("train", "val", "test"):
        assert a[split] == b[split]
    assert a["test"]["nll"] != c["test"]["nll"]


def test_eval_every_skips_evaluations_but_changes_no_number(tmp_path):
    every = train(TrainConfig(method="sam", seed=2, **SPIRAL), out=tmp_path / "a", progress=False)
    sparse = train(TrainConfig(method="sam", seed=2, eval_every=3, **SPIRAL), out=tmp_path / "b",
                   progress=False)
    for split in ("train", "val", "test"):
        assert sparse[split] == every[split]
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_error" in r] == [3, 4]  # every 3rd and the last
    assert sparse["best_val_epoch"]["epoch"] in (3, 4)


def test_outputs_and_provenance(tmp_path):
    result = train(TrainConfig(method="sam", **SPIRAL), tmp_path, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == result["test"]
    for key in ("config", "versions", "git_commit", "time_s", "device", "val", "train"):
        assert key in saved
    assert saved["versions"]["torch"] == torch.__version__
    # the thread count and the kernels change a CPU run's numbers: they are recorded with it
    assert saved["versions"]["threads"] == torch.get_num_threads()
    assert saved["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["versions"]["blas"] and saved["versions"]["blas"] in torch.__config__.show()
    assert saved["best_val_epoch"]["chosen_on"] == "val"
    assert len(saved["reliability"]["test"]["count"]) == 15
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    run = load_run(tmp_path)
    assert run.config.method == "sam" and run.epoch == 4 and not run.model.training


def test_existing_run_is_never_overwritten(tmp_path):
    train(TrainConfig(method="erm", **SPIRAL), tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FlatminError, match="--resume"):
        train(TrainConfig(method="erm", **SPIRAL), tmp_path, progress=False)
    with pytest.raises(FlatminError, match="configuration differs"):
        train(TrainConfig(method="amp", **SPIRAL), tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    method = get_method("erm")
    calls = {"n": 0}
    original = type(method).loss

    def poisoned(self, logits, batch, cfg):
        calls["n"] += 1
        loss = original(self, logits, batch, cfg)
        return loss * float("nan") if calls["n"] > 12 else loss  # 9 steps/epoch: dies in epoch 2

    monkeypatch.setattr(type(method), "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 2"):
        train(TrainConfig(method="erm", **SPIRAL), tmp_path, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def _cli(*args, check=True, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FLATMIN, *args], capture_output=True, text=True, env=env, check=check, **kw)


@pytest.mark.slow  # processes killed and restarted: .ci/run runs it
def test_resume_after_kill_9_is_exact(tmp_path):
    args = ["train", "--dataset", "spiral", "--method", "amp", "--epochs", "25", "--batch-size", "10",
            "--quiet", "--threads", "1"]
    _cli(*args, "--out", str(tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen([*FLATMIN, *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and len((out / "log.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.02)
    time.sleep(0.1)  # somewhere inside a later epoch (or a checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    _cli(*args, "--out", str(out), "--resume")
    resumed = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert resumed[split] == whole[split]
    logged = [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 26))


@pytest.mark.parametrize(
    "args, message",
    [(["--method", "nope"], "unknown method 'nope'; valid methods: adv_training, amp"),
     (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
     (["--model", "resnet1000"], "unknown model 'resnet1000'"),
     (["--lr", "-1"], "--lr: expected a finite number > 0"),
     (["--precision", "fp8"], "precision must be one of")],
)
def test_cli_bad_input_is_one_clear_message(args, message):
    proc = _cli("train", "--dataset", "spiral", "--epochs", "1", "--quiet", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        get_method("adam")
    assert "amp" in str(err.value) and "sam" in str(err.value)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("method", ["amp", "sam"])
def test_batchnorm_stats_move_only_in_the_unperturbed_pass(method):
    torch.manual_seed(0)
    model, twin = _BNNet(), _BNNet()
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(method=method, lr=0.0, epsilon=1.0, inner_lr=10.0, rho=1.0, ball="global",
                      epochs=1, batch_size=16, weight_decay=0.0)
    opt = get_method(method).build_optimizer(model.parameters(), cfg)
    ctx = StepContext(cfg, get_method(method), torch.amp.GradScaler("cpu", enabled=False),
                      torch.device("cpu"), 1.0, _single())
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    model.train(), twin.train()
    train_step(model, model, opt, Batch(x, y), ctx)
    twin(x)  # exactly one batch-statistics update at θ
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(twin.bn, name)), name


def _single():
    from flatmin.train.distributed import SingleProcess

    return SingleProcess()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision):
    result = train(TrainConfig(method="amp", precision=precision, **SPIRAL), progress=False)
    assert math.isfinite(result["test"]["nll"]) and result["train"]["nll"] < math.log(2)


def test_fp16_overflowing_step_is_skipped_with_theta_intact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    cfg = TrainConfig(method="amp", lr=0.1, epsilon=0.5, inner_lr=1.0, ball="global", epochs=1,
                      batch_size=8, weight_decay=0.0, precision="fp16")
    opt = get_method("amp").build_optimizer(model.parameters(), cfg)
    assert isinstance(opt, AMP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows
    ctx = StepContext(cfg, get_method("amp"), scaler, torch.device("cpu"), 1.0, _single())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, model, opt, Batch(torch.randn(8, 3), torch.randint(0, 2, (8,))), ctx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert scaler.get_scale() < 2.0**127  # the scaler saw the overflow and backed off
    assert not opt.perturbed


def test_logged_grad_norm_is_taken_at_theta_even_with_subbatch_ascent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    cfg = TrainConfig(method="amp", lr=0.1, epsilon=0.5, inner_lr=1.0, ball="global", epochs=1,
                      batch_size=8, weight_decay=0.0, amp_variant="subbatch", ascent_fraction=0.5)
    opt = get_method("amp").build_optimizer(model.parameters(), cfg)
    ctx = StepContext(cfg, get_method("amp"), torch.amp.GradScaler("cpu", enabled=False),
                      torch.device("cpu"), 1.0, _single())
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    loss = nn.functional.cross_entropy(model(x[:4]), y[:4])  # the ascent sub-batch, at θ
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in
                                                   torch.autograd.grad(loss, list(model.parameters()))]))
    _, _, gnorm = train_step(model, model, opt, Batch(x, y), ctx)
    torch.testing.assert_close(gnorm, expected)


def test_step_logs_show_theorem_2s_quantities(tmp_path):
    """--tensorboard: each step's loss, ‖∇J‖, lr, ‖Δ‖ ≤ ε and J(θ+Δ) − J(θ) in log.jsonl and TensorBoard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flatmin.train.logging import read_log

    cfg = TrainConfig(method="amp", tensorboard=True, epsilon=0.05, ball="global", **{**SPIRAL, "epochs": 2})
    train(cfg, tmp_path, progress=False)
    steps, epochs = read_log(tmp_path)
    assert [e["epoch"] for e in epochs] == [1, 2] and len(steps) == 2 * 9  # 180 training examples / 20
    assert [s["step"] for s in steps] == list(range(18))
    assert all(0 < s["delta_norm"] <= 0.05 + 1e-6 and math.isfinite(s["loss_gap"]) for s in steps)
    assert sum(s["loss_gap"] > 0 for s in steps) > len(steps) // 2  # the ascent mostly raises the loss
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("step/delta_norm")) == 18 and len(events.Scalars("epoch/test_error")) == 2


def test_resume_of_a_checkpoint_with_another_architecture_is_one_message(tmp_path):
    from flatmin.train import checkpoint as ckpt

    cfg = TrainConfig(method="amp", **SPIRAL)
    train(cfg, tmp_path, progress=False)
    saved = ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT)
    saved["model"] = {k + ".x": v for k, v in saved["model"].items()}  # weights of some other model
    saved["epoch"] = 1
    ckpt.save_checkpoint(tmp_path / ckpt.CHECKPOINT, saved)
    with pytest.raises(FlatminError, match="checkpoint does not fit"):
        train(cfg, tmp_path, resume=True, progress=False)


SPIRAL22 = {**SPIRAL, "batch_size": 22, "epochs": 3}


def test_msharp_and_esam_selection_train_and_are_recorded(tmp_path):
    """m-sharpness and ESAM's data selection (tests/test_sharpness_data.py has their math). 180
    training examples in batches of 22: the last batch (4) has fewer examples than splits (8)."""
    msharp = train(TrainConfig(method="sam", sam_splits=8, **SPIRAL22), out=tmp_path / "m", progress=False)
    sam = train(TrainConfig(method="sam", **SPIRAL22), progress=False)
    sds = train(TrainConfig(method="esam", esam_gamma=0.5, **SPIRAL22), progress=False)
    swp = train(TrainConfig(method="esam", esam_gamma=1.0, **SPIRAL22), progress=False)
    assert msharp["config"]["sam_splits"] == 8 and sds["config"]["esam_gamma"] == 0.5
    assert msharp["test"]["nll"] != sam["test"]["nll"] and sds["test"]["nll"] != swp["test"]["nll"]
    untrained = train(TrainConfig(method="erm", **{**SPIRAL22, "lr": 0.0, "epochs": 1}), progress=False)
    for r in (msharp, sds):
        assert r["train"]["nll"] < untrained["train"]["nll"] - 0.03
    with pytest.raises(ConfigError, match="sam_splits"):
        train(TrainConfig(method="sam", sam_splits=0, **SPIRAL22), progress=False)


def test_lr_schedules_and_the_default_is_the_papers_step():
    from flatmin.train.loop import lr_at

    cfg = TrainConfig(dataset="spiral", lr=0.1, epochs=8)
    from flatmin.experiments.runner import resolved

    step = resolved(cfg)
    assert step.lr_schedule == "step"  # no dataset changes the paper's schedule
    assert [round(lr_at(step, e), 6) for e in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    moved = step.replace(milestones=(0.25,), lr_gamma=0.5)
    assert [lr_at(moved, e) for e in (0, 1, 2, 7)] == [0.1, 0.1, 0.05, 0.05]
    assert {lr_at(step.replace(lr_schedule="constant"), e) for e in range(8)} == {0.1}
    cos = [lr_at(step.replace(lr_schedule="cosine"), e) for e in range(8)]
    assert cos[0] == 0.1 and all(a > b > 0 for a, b in zip(cos, cos[1:]))
    with pytest.raises(ConfigError, match="lr_schedule must be one of step, cosine, constant"):
        resolved(cfg.replace(lr_schedule="linear"))


def test_a_new_field_at_its_default_keeps_every_existing_run_key():
    """Keys pinned from before lr_schedule existed: a stored run is still found, not retrained."""
    from flatmin.experiments.runner import config_key

    configs = ({"dataset": "spiral"}, {"dataset": "spiral", "method": "amp", "seed": 3},
               {"dataset": "mnist1d", "method": "sam"},
               {"dataset": "digits", "method": "amp", "accumulate": 2})
    assert [config_key(TrainConfig(**kw)) for kw in configs] == [
        "4853407e1fb55587", "ba117d46cd7a272d", "607386eff64d67e4", "5e3449c7e9c020a5"]
    assert config_key(TrainConfig(dataset="spiral", lr_schedule="cosine")) != "4853407e1fb55587"


def test_train_without_out_writes_a_printed_default_run_folder(tmp_path, monkeypatch, capsys):
    from flatmin.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["train", "--dataset", "spiral", "--epochs", "1", "--quiet", "--lr-schedule", "constant"]
    assert main(args) == 0 and main(args) == 0
    captured = capsys.readouterr()
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and runs[0].name.startswith("erm_spiral_s0_")  # never the same folder twice
    assert f"run folder: runs/{runs[0].name}" in captured.err
    for run in runs:
        assert {"log.jsonl", "metrics.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
        assert json.loads((run / "metrics.json").read_text())["config"]["lr_schedule"] == "constant"
    assert f'"out": "runs/{runs[1].name}"' in captured.out


def test_a_checkpoint_carries_a_digest_checked_at_load_and_version_1_still_loads(tmp_path):
    from flatmin.train.checkpoint import load_checkpoint, save_checkpoint

    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"epoch": 1, "lr": 0.1}]}
    save_checkpoint(tmp_path / "a.pt", payload)
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert loaded["version"] == 2 and "digest" not in loaded
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    raw["model"]["w"][0, 0] = 1.0  # what a flipped byte does: the content no longer matches its digest
    torch.save(raw, tmp_path / "b.pt")
    with pytest.raises(FlatminError, match=r"b.pt is damaged.*not used"):
        load_checkpoint(tmp_path / "b.pt")
    old = {k: v for k, v in raw.items() if k != "digest"} | {"version": 1}
    torch.save(old, tmp_path / "v1.pt")  # written before the digest existed: read, unverified
    assert load_checkpoint(tmp_path / "v1.pt")["version"] == 1


@pytest.mark.parametrize("epoch, start, epochs, since, saves", [
    (0, 0, 60, 0.1, True),    # a run's first epoch: a kill after it loses nothing
    (5, 0, 60, 0.1, False),   # a short epoch, 0.1 s after the last save: no fsync'd file
    (5, 0, 60, 31.0, True),   # CHECKPOINT_SECONDS passed
    (59, 0, 60, 0.1, True),   # the last epoch: the analyses read this checkpoint
    (10, 10, 60, 0.1, True),  # a resumed run's first epoch
])
def test_checkpoints_are_written_first_last_and_every_30_seconds(epoch, start, epochs, since, saves):
    from flatmin.train.loop import CHECKPOINT_SECONDS, _saves
    assert CHECKPOINT_SECONDS == 30.0
    assert _saves(epoch, start, epochs, since) is saves


def test_a_run_records_test_metrics_after_temperature_scaling_fitted_on_val(tmp_path):
    """metrics.json's ``test_ts``: T fitted on the run's own validation logits (recomputed here from the
    saved model: the same T, the same scaled test NLL and ECE), test error unchanged."""
    from flatmin.train.metrics import classification_metrics, fit_temperature

    result = train(TrainConfig(method="erm", dataset="spiral", epochs=3, seed=0), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    ts = saved["test_ts"]
    assert ts["error"] == saved["test"]["error"] and ts["temperature"] > 0 and result["test_ts"] == ts
    run = load_run(tmp_path)
    ds = run.dataset
    with torch.no_grad():
        val = run.model(ds.transform(ds.val.x, False)).double()
        test = run.model(ds.transform(ds.test.x, False)).double()
    t = fit_temperature(val, ds.val.y)
    assert t == pytest.approx(ts["temperature"], rel=1e-9)
    scaled = classification_metrics(test / t, ds.test.y)
    assert scaled["nll"] == pytest.approx(ts["nll"], rel=1e-9)
    assert scaled["ece"] == pytest.approx(ts["ece"], rel=1e-9)
    assert abs(t - 1) > 1e-3  # a real fit, not the identity

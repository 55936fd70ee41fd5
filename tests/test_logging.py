"""flatmin.train.logging: log.jsonl as the source of truth, TensorBoard events read back with
TensorBoard's own EventAccumulator, resume truncation, and the --tensorboard flag."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from flatmin.errors import FlatminError
from flatmin.train.logging import RunLogger, read_epochs, read_log

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(step: int) -> dict:
    """What the trainer logs for a perturbation method: device tensors and a plain float."""
    return {"loss": torch.tensor(1.0 / (step + 1)), "grad_norm": torch.tensor(float(step)),
            "lr": 0.1, "delta_norm": torch.tensor([0.5]), "loss_gap": torch.tensor(0.01 * step)}


def run_epochs(log: RunLogger, epochs: range, steps_per_epoch: int = 4, offset: float = 0.0) -> None:
    for e in epochs:
        for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch):
            log.log_step(s, {k: v + offset for k, v in scalars(s).items()})
        log.log_epoch(e + 1, {"train_loss": torch.tensor(0.5 + offset), "val_error": 10.0 * (e + 1),
                              "note": "text is kept in the log, skipped by TensorBoard"})


def events(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def test_steps_and_epochs_round_trip_through_log_jsonl(tmp_path):
    with RunLogger(tmp_path) as log:
        run_epochs(log, range(2))
    steps, epochs = read_log(tmp_path)
    assert [s["step"] for s in steps] == list(range(8))
    assert steps[3] == {"step": 3, "loss": 0.25, "grad_norm": 3.0, "lr": 0.1, "delta_norm": 0.5,
                        "loss_gap": pytest.approx(0.03)}
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[1]["val_error"] == 20.0
    assert epochs[0]["train_loss"] == 0.5 and read_epochs(tmp_path / "log.jsonl") == epochs
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert '"epoch": 1' in lines[4] and '"step": 4' in lines[5]  # epoch record after its steps
    assert not (tmp_path / "tensorboard").exists()


def test_step_every_and_flush_every(tmp_path):
    log = RunLogger(tmp_path, step_every=3, flush_every=2)
    for s in range(7):
        log.log_step(s, {"loss": torch.tensor(float(s))})
    assert [r["step"] for r in read_log(tmp_path)[0]] == [0, 3]  # 6 still pending
    log.close()
    assert [r["step"] for r in read_log(tmp_path)[0]] == [0, 3, 6]
    with pytest.raises(ValueError, match="'loss' has 2 elements"):
        log.log_step(9, {"loss": torch.ones(2)})


def test_tensorboard_events_match_the_log(tmp_path):
    with RunLogger(tmp_path, tensorboard=True) as log:
        run_epochs(log, range(2))
    acc = events(tmp_path / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/grad_norm", "step/lr", "step/delta_norm", "step/loss_gap",
            "epoch/train_loss", "epoch/val_error"} <= tags and "epoch/note" not in tags
    steps, _ = read_log(tmp_path)
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps])
    assert [(e.step, e.value) for e in acc.Scalars("epoch/val_error")] == [(1, 10.0), (2, 20.0)]


def test_resume_keeps_the_finished_epochs_only(tmp_path):
    log = RunLogger(tmp_path, tensorboard=True)
    run_epochs(log, range(2))
    for s in range(8, 10):  # a killed third epoch: steps written, no epoch record
        log.log_step(s, scalars(s))
    log.close()
    with RunLogger(tmp_path, tensorboard=True, resume_epoch=1) as log:
        run_epochs(log, range(1, 3), offset=100.0)
    steps, epochs = read_log(tmp_path)
    assert [s["step"] for s in steps] == list(range(12))
    assert steps[3]["loss"] == 0.25 and steps[4]["loss"] == pytest.approx(100.2)  # epoch 2 re-run
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    loss = events(tmp_path / "tensorboard").Scalars("step/loss")
    assert [e.step for e in loss] == list(range(12))  # the purged steps are not shown twice
    assert loss[4].value == pytest.approx(100.2)
    with RunLogger(tmp_path, resume_epoch=0):
        pass
    assert read_log(tmp_path) == ([], [])


def test_no_output_folder_logs_nothing_and_missing_tensorboard_is_named(tmp_path, monkeypatch):
    with RunLogger(None, tensorboard=True) as log:
        run_epochs(log, range(1))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(FlatminError, match=r"pip install 'flatmin\[tensorboard\]'"):
        RunLogger(tmp_path, tensorboard=True)


def test_tensorboard_flag_reaches_the_config_but_not_the_run_key():
    from flatmin.cli.options import add_config_arguments, config_overrides
    from flatmin.train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_overrides(parser.parse_args(["--tensorboard"])) == {"tensorboard": True}
    assert "tensorboard" not in config_overrides(parser.parse_args([]))
    assert TrainConfig(**config_overrides(parser.parse_args(["--tensorboard"]))).tensorboard is True
    opts = config_overrides(parser.parse_args(["--image-size", "16", "--label-column", "y"]))
    assert opts == {"dataset_options": {"image_size": 16, "label_column": "y"}}

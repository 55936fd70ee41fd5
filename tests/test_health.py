"""Run health: the detector on synthetic loss curves, a real run forced to blow up (log.jsonl and
metrics.json), a non-finite stop, the store's column (and an old store without it), and a tiny
compare whose table, per-run line and verdicts name the collapsed run."""

from __future__ import annotations

import csv
import json
import math
import sqlite3

import pytest

from flatmin.cli import main
from flatmin.errors import NonFiniteLossError
from flatmin.experiments import health as shown
from flatmin.results.store import Store
from flatmin.train import TrainConfig, health, loop, train
from flatmin.train.logging import read_epochs, read_events

LN10 = math.log(10)
# Real curves (MNIST-1D, cnn1d, 60 epochs, lr 0.1, step decay): the noisiest ordinary epochs seen.
AMP_S2 = [1.2, 0.8, 0.5, 0.3, 0.2, 0.176, 0.431, 0.25, 0.15, 0.1, 0.05, 0.02, 0.0134]  # 2.45× at ep 7
ERM_S4 = [2.2, 1.5, 1.0, 0.525, 1.058, 0.6, 0.3, 0.1, 0.05, 0.0115]  # 2.01× early
# Issue 27's AMP seed 23 as reported: 0.17 → 1.86 (56% train error) around epoch 25, then the decay.
SEED23 = [2.2, 1.5, 1.0, 0.6, 0.4, 0.3, 0.2, 0.17, 1.86, 1.2, 0.9, 0.6, 0.3, 0.15, 0.1, 0.08]


def curve(losses, errors=None):
    """Epoch records as the loop writes them."""
    return [{"epoch": i + 1, "train_loss": loss, **({"train_error": errors[i]} if errors else {})}
            for i, loss in enumerate(losses)]


def kinds(block):
    return [(e["event"], e["epoch"]) for e in block["events"]]


@pytest.mark.parametrize("losses, status, events", [
    pytest.param(AMP_S2, "ok", [], id="noisy-amp-2.45x"),
    pytest.param(ERM_S4, "ok", [], id="noisy-erm-early-2x"),
    pytest.param([1.0, 0.5, 0.25, 0.12, 0.06, 0.03], "ok", [], id="smooth"),
    pytest.param([0.5, 0.05, 0.01, 0.004, 0.02, 0.004], "ok", [], id="5x-under-the-floor"),
    pytest.param(SEED23, "collapsed", [("spike", 9), ("recovered", 14)], id="seed23-recovered"),
    pytest.param([2.0, 1.0, 0.5, 0.2, 1.5, 1.4, 1.3, 1.2], "collapsed", [("spike", 5), ("late_collapse", 8)],
                 id="late-collapse"),
    pytest.param([2.0, 1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.4], "collapsed", [("late_collapse", 8)],
                 id="ends-2.5x-its-best"),
    pytest.param([2.2, 1.6, 1.2, 0.94, 1.7, 2.4, 2.31, 2.30], "collapsed",
                 [("spike", 6), ("late_collapse", 8), ("at_chance", 8)], id="back-to-chance-2.55x"),
    pytest.param([2.30, 2.23, 2.34, 2.31, 2.30] * 2 + [2.31, 2.30], "collapsed", [("never_learned", 12)],
                 id="never-learned"),
    pytest.param([2.30, 2.23, 2.34, 2.31, 2.30], "ok", [], id="too-short-to-judge"),  # a 5-epoch smoke run
    pytest.param([2.30, 1.9, 1.5, 1.3, 1.2], "ok", [], id="slow-but-learning"),  # under 0.9 ln K at the end
    pytest.param([1.0, 0.5, float("nan")], "collapsed", [("spike", 3), ("late_collapse", 3)], id="nan-epoch"),
])
def test_the_detector_on_loss_curves(losses, status, events):
    block = health.assess(curve(losses), len(losses), chance=LN10)
    assert block["status"] == status and kinds(block) == events
    json.dumps(block, allow_nan=False)  # strict JSON: a NaN epoch is written as null


def test_a_spike_is_one_event_per_episode_with_its_values():
    t = health.Tracker(len(SEED23), chance=LN10)
    errors = [50.0] * len(SEED23)
    errors[8] = 56.0
    out = [t.update(r) for r in curve(SEED23, errors)]
    spike = out[8][0]
    assert spike == {"event": "spike", "epoch": 9, "train_loss": 1.86, "running_min": 0.17,
                     "ratio": pytest.approx(1.86 / 0.17), "train_error": 56.0}
    assert [len(o) for o in out].count(1) == 2  # the spike, then its recovery: nothing per epoch between
    assert health.summary(t.report()) == (
        "loss spike at epoch 9: 1.86 = 10.9× its running minimum 0.17, train error 56.0%; "
        "back under the pre-spike minimum at epoch 14 (0.15)")
    assert t.report()["max_rise"] == pytest.approx(1.86 / 0.17)


@pytest.mark.parametrize("fields, epoch, status, event", [
    ({"nonfinite_skips": 2}, 3, "unstable", "nonfinite_skips"),
    ({"overflow_skips": 5}, 3, "unstable", "overflow_skips"),  # 5 of 10 steps
    ({"overflow_skips": 1}, 3, "ok", None),  # one in ten: a GradScaler growing its scale
    ({"overflow_skips": 8}, 1, "ok", None),  # the first epoch: the scaler finds its scale
])
def test_skipped_steps(fields, epoch, status, event):
    records = curve([1.0, 0.8, 0.6])
    records[epoch - 1].update(fields)
    block = health.assess(records, 3, steps_per_epoch=10)
    assert block["status"] == status
    assert [e["event"] for e in block["events"]] == ([event] if event else [])
    assert block["counts"]["nonfinite_skips"] == fields.get("nonfinite_skips", 0)


def test_the_tracker_reads_the_optimizers_counters_per_epoch():
    class Opt:
        skipped_steps, overflow_steps = 0, 0

    t, opt = health.Tracker(3), Opt()
    t.start(opt)
    opt.skipped_steps, opt.overflow_steps = 3, 1
    assert t.skips(opt) == {"nonfinite_skips": 2, "overflow_skips": 1}
    assert t.skips(opt) == {}  # nothing new since
    opt.skipped_steps = 4
    assert t.stopped(2, opt) == [{"event": "nonfinite_skips", "epoch": 2, "steps": 1, "stopped": True}]


SPIRAL = dict(dataset="spiral", batch_size=20, lr=0.1, dataset_options={"n_samples": 200})


def blow_up_at(monkeypatch, epoch: int, factor: float, when=lambda cfg: True) -> None:
    """From ``epoch`` (0-based) on, the learning rate × ``factor``: a real run forced to collapse."""
    original = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda cfg, e: original(cfg, e) * (factor if e >= epoch and when(cfg)
                                                                           else 1.0))


def test_a_run_forced_to_blow_up_records_it_in_its_log_and_metrics(tmp_path, monkeypatch):
    blow_up_at(monkeypatch, 4, 1000.0)
    cfg = TrainConfig(method="erm", epochs=6, lr_schedule="constant", **SPIRAL)
    result = train(cfg, tmp_path, progress=False)
    events = read_events(tmp_path)
    assert [e["event"] for e in events][:1] == ["spike"] and events[0]["epoch"] == 5
    assert events[0]["ratio"] > 4 and events[0]["running_min"] == min(e["train_loss"] for e in
                                                                      read_epochs(tmp_path)[:4])
    assert len(read_epochs(tmp_path)) == 6  # the events are not epochs
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["health"] == result["health"]
    assert saved["health"]["status"] == "collapsed" and saved["health"]["events"] == events
    assert saved["health"]["counts"]["spike"] == 1


def test_an_ordinary_run_is_ok_and_a_resumed_run_keeps_its_events(tmp_path, monkeypatch):
    assert train(TrainConfig(method="erm", epochs=3, **SPIRAL), tmp_path / "ok",
                 progress=False)["health"]["status"] == "ok"
    cfg = TrainConfig(method="erm", epochs=5, lr_schedule="constant", **SPIRAL)
    blow_up_at(monkeypatch, 2, 1000.0)
    whole = train(cfg, tmp_path / "whole", progress=False)["health"]
    assert whole["status"] == "collapsed" and whole["events"][0]["epoch"] == 3

    original = loop.lr_at

    def killed(c, e):  # the process dies as epoch 4 starts, after the spike of epoch 3 was logged
        if e == 3:
            raise KeyboardInterrupt
        return original(c, e)

    monkeypatch.setattr(loop, "lr_at", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", progress=False)
    monkeypatch.setattr(loop, "lr_at", original)
    resumed = train(cfg, tmp_path / "r", resume=True, progress=False)["health"]
    assert resumed["events"] == whole["events"]  # the epochs before the kill are replayed, not lost
    assert read_events(tmp_path / "r") == read_events(tmp_path / "whole")  # and logged once


def test_a_nonfinite_stop_is_the_last_event_of_the_log(tmp_path, monkeypatch):
    blow_up_at(monkeypatch, 1, math.inf)  # epoch 2's first step sends θ to inf: every later loss is NaN
    with pytest.raises(NonFiniteLossError, match="epoch 2"):
        train(TrainConfig(method="erm", epochs=4, **SPIRAL), tmp_path, progress=False)
    # 9 steps an epoch: the first updates with lr = inf, the 8 after it are NaN and skipped
    assert read_events(tmp_path) == [{"event": "nonfinite_skips", "epoch": 2, "steps": 8, "stopped": True}]
    assert len(read_epochs(tmp_path)) == 1


def _result(status: str | None, seed: int = 0) -> dict:
    cfg = TrainConfig(method="erm", dataset="spiral", seed=seed).to_dict()
    r = {"config": cfg, "test": {"error": 1.0, "nll": 0.1, "ece": 0.01}, "time_s": 1.0,
         "versions": {"threads": 1}}
    if status:
        r["health"] = {"status": status, "events": []}
    return r


def test_the_store_keeps_the_status_and_an_old_store_still_opens(tmp_path):
    store = Store(tmp_path / "new.db")
    store.insert("a", "erm", _result("collapsed"), None)
    store.insert("b", "erm", _result(None, 1), None)  # a run from before run health
    got = [(r["health"], shown.status(r)) for r in store.rows()]
    assert got == [("collapsed", "collapsed"), (None, None)]
    store.close()

    old = tmp_path / "old.db"  # the schema before the column, with one run in it
    db = sqlite3.connect(old)
    db.executescript("""CREATE TABLE runs (key TEXT PRIMARY KEY, method TEXT, dataset TEXT, model TEXT,
        augment TEXT, seed INTEGER, label TEXT, config TEXT NOT NULL, metrics TEXT NOT NULL, git_commit TEXT,
        versions TEXT, device TEXT, time_s REAL, run_dir TEXT, finished_at REAL);
        CREATE TABLE claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);""")
    r = _result(None)
    db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               ("k", "erm", "spiral", "mlp", "standard", 0, "erm", json.dumps(r["config"]),
                json.dumps({"test": r["test"]}), None, None, "cpu (x86_64, 2 threads)", 1.0, None, 0.0))
    db.commit()
    db.close()
    reader = Store(old, read_only=True)
    (row,) = reader.rows()
    assert "health" not in row and shown.status(row) is None and shown.threads(row) == 2
    reader.close()
    writer = Store(old)  # a writer adds the column, keeps the row
    writer.insert("k2", "erm", _result("ok", 1), None)
    assert {r["key"]: r["health"] for r in writer.rows()} == {"k": None, "k2": "ok"}
    writer.close()


@pytest.mark.parametrize("statuses, cell, note", [
    (["ok", "ok"], "0/2 collapsed", ""),
    (["collapsed", "ok"], "1/2 collapsed", "1 of 2 amp runs collapsed: seed 0"),
    (["collapsed", "unstable", None], "1/3 collapsed, 1 unstable, 1 not recorded",
     "1 of 3 amp runs collapsed: seed 0"),
])
def test_the_health_cell_and_verdict_note(statuses, cell, note):
    runs = [_result(s, seed) for seed, s in enumerate(statuses)]
    assert shown.cell(runs) == cell and shown.collapsed_note("amp", runs) == note
    assert shown.verdict_note("amp", "erm", {"amp": note, "erm": ""}) == (f" ({note})" if note else "")


def test_a_tiny_compare_shows_the_column_the_run_and_the_verdict(tmp_path, monkeypatch, capsys):
    # workers=1 trains in this process, so the patched schedule reaches amp's seed 1 alone
    blow_up_at(monkeypatch, 2, 1000.0, when=lambda cfg: cfg.method == "amp" and cfg.seed == 1)
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "spiral", "--epochs", "4", "--workers", "1", "--no-figures",
                 "--methods", "erm,amp", "--seeds", "2", "--cost-epochs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    tagged = [line.split()[:3] for line in text.splitlines() if line.endswith("[collapsed]")]
    assert tagged == [["amp", "seed", "1:"]]  # said as the run lands, on its line alone
    head = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert "| threads | health |" in head
    assert "| 1 | 0/2 collapsed |" in text and "| 1 | 1/2 collapsed |" in text
    assert "run health: 1 of 4 runs collapsed, 0 unstable" in text
    assert "  amp seed 1: collapsed: loss spike at epoch 3:" in text
    assert "-> no detectable difference" in text and "(1 of 2 amp runs collapsed: seed 1)" in text
    assert "torch threads per run: 1;" in text
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert rows[("amp", "1")]["health"] == "collapsed" and rows[("erm", "0")]["threads"] == "1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["health"]["amp"]["collapsed"] == 1 and summary["health"]["erm"]["ok"] == 2

    assert main(["report", str(out / "results.db")]) == 0  # the same from the store
    report = capsys.readouterr().out
    assert "(n=2, 1 collapsed)" in report and "## Run health" in report
    assert "AMP on spiral/mlp seed 1: collapsed: loss spike at epoch 3" in report
    assert "(1 of 2 AMP runs collapsed: seed 1)" in report

"""The results store and grid runner: claims, exactly-once under kills and concurrent processes."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatmin.experiments.grid import expand
from flatmin.experiments.runner import config_key, execute, make_task
from flatmin.results.store import Store
from flatmin.train import TrainConfig

FAST = dict(dataset="spiral", epochs=2, dataset_options={"n_samples": 200})


def test_claim_blocks_a_live_owner_but_not_an_expired_or_dead_one(tmp_path):
    a, b = Store(tmp_path / "r.db"), Store(tmp_path / "r.db")
    b.owner = "otherhost:1"
    assert a.claim("k1")
    assert not b.claim("k1")  # held by a live owner
    a.db.execute("UPDATE claims SET expires=0 WHERE key='k1'")
    assert b.claim("k1")  # lease ran out
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    b.db.execute("UPDATE claims SET owner=?, expires=1e12 WHERE key='k1'",
                 (f"{a.owner.rpartition(':')[0]}:{dead.pid}",))
    assert a.claim("k1")  # owner process on this host is gone


def test_a_finished_run_is_stored_once_and_never_claimed_again(tmp_path):
    store = Store(tmp_path / "r.db")
    task = make_task(TrainConfig(method="erm", **FAST), "erm", tmp_path)
    assert execute([task, task], store, workers=1, log=lambda s: None) == []
    assert [r["key"] for r in store.rows()] == [task.key]
    assert not store.claim(task.key)
    row = store.rows()[0]
    assert row["config"]["epochs"] == 2 and row["metrics"]["test"]["error"] >= 0
    assert row["versions"]["torch"] and row["device"].startswith("cpu") and row["time_s"] > 0
    assert execute([task], store, workers=1, log=lambda s: None) == []  # skipped, not retrained
    assert len((task.run_dir / "log.jsonl").read_text().splitlines()) == 2


def test_key_is_the_resolved_config_without_fields_the_method_ignores():
    from flatmin.errors import FlatminError

    assert config_key(TrainConfig(**FAST)) == config_key(TrainConfig(**FAST, lr=0.1, data_dir="/x"))
    assert config_key(TrainConfig(**FAST)) != config_key(TrainConfig(**FAST, seed=1))
    assert config_key(TrainConfig(**FAST)) == config_key(TrainConfig(**FAST, epsilon=0.3, rho=1.0))
    import flatmin.train.config as config

    old = dict(config.CPU_PRESETS["spiral"])
    try:  # a new ε preset does not orphan finished ERM runs
        before = config_key(TrainConfig(**FAST))
        config.CPU_PRESETS["spiral"]["epsilon"] = 0.123
        assert config_key(TrainConfig(**FAST)) == before
        assert config_key(TrainConfig(**FAST, method="amp")) != config_key(TrainConfig(**FAST, method="amp",
                                                                                       epsilon=old["epsilon"]))
    finally:
        config.CPU_PRESETS["spiral"].update(old)
    amp = dict(FAST, method="amp")
    assert config_key(TrainConfig(**amp)) == config_key(TrainConfig(**amp, reuse_every=5))
    assert config_key(TrainConfig(**amp, amp_variant="reuse")) != config_key(
        TrainConfig(**amp, amp_variant="reuse", reuse_every=5))
    with pytest.raises(FlatminError, match="amp_variant must be one of exact"):  # before anything trains
        make_task(TrainConfig(**amp, amp_variant="bogus"), "amp", "/nonexistent")


def test_expand_crosses_method_fields_only_for_their_method():
    runs = expand({"method": ["erm", "amp"], "epsilon": [0.1, 0.5], "rho": [0.05], "epochs": 3})
    assert sorted((r["method"], r.get("epsilon")) for r in runs) == [("amp", 0.1), ("amp", 0.5),
                                                                      ("erm", None)]


def _grid_file(tmp_path: Path, n_samples: int, epochs: int, seeds: int) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(f"""
[grid]
method = ["erm", "amp"]
dataset = "spiral"
epochs = {epochs}
seeds = {seeds}
dataset_options = {{n_samples = {n_samples}}}
[run]
out = "{tmp_path / 'out'}"
workers = 1
""")
    return path


def _grid(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-m", "flatmin", "grid", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_exactly_once(tmp_path: Path, runs: int, epochs: int) -> None:
    db = sqlite3.connect(tmp_path / "out" / "results.db")
    keys = [k for (k,) in db.execute("SELECT key FROM runs")]
    assert len(keys) == len(set(keys)) == runs
    assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    for (run_dir, metrics) in db.execute("SELECT run_dir, metrics FROM runs"):
        log = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == list(range(1, epochs + 1))  # trained once, no repeats
        assert json.loads(metrics)["epochs_completed"] == epochs


@pytest.mark.slow  # processes killed and restarted: .ci/run runs it
def test_grid_killed_halfway_and_restarted_has_every_run_once(tmp_path):
    path = _grid_file(tmp_path, n_samples=2000, epochs=8, seeds=3)
    proc = _grid(path)
    db_path = tmp_path / "out" / "results.db"
    while proc.poll() is None:  # kill once two of the six runs are in
        if db_path.exists():
            try:
                if sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM runs").fetchone()[0] >= 2:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = _grid(path)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    _check_exactly_once(tmp_path, runs=6, epochs=8)


@pytest.mark.slow  # processes killed and restarted: .ci/run runs it
def test_two_grid_processes_on_one_db_train_each_run_once(tmp_path):
    path = _grid_file(tmp_path, n_samples=400, epochs=4, seeds=3)
    procs = [_grid(path), _grid(path)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    _check_exactly_once(tmp_path, runs=6, epochs=4)


def test_a_database_that_is_not_one_is_a_clear_error(tmp_path):
    from flatmin.errors import FlatminError

    (tmp_path / "bad.db").write_text("not sqlite " * 100)
    with pytest.raises(FlatminError, match="not a usable results database"):
        Store(tmp_path / "bad.db")


def test_a_reused_pid_or_another_host_is_judged_correctly():
    """Same host: a pid that now names a later process is dead; another host: only its lease counts."""
    from flatmin.results.store import _owner_dead, owner_id

    me = owner_id()
    host, _, rest = me.rpartition(":")
    assert "@" in rest and not _owner_dead(me)
    assert _owner_dead(f"{host}:{rest.partition('@')[0]}@1")  # same pid, started at another time
    assert not _owner_dead(f"not-{host}:1@1")


def test_a_grid_with_a_failed_run_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    from flatmin.cli import main
    from flatmin.experiments.backends import local

    real = local.train_run

    def flaky(config, run_dir):
        if config["seed"] == 1:
            raise RuntimeError("simulated crash")
        return real(config, run_dir)

    monkeypatch.setattr(local, "train_run", flaky)  # workers=1 trains in this process
    rc = main(["grid", "--methods", "erm", "--dataset", "spiral", "--epochs", "1", "--seeds", "2",
               "--workers", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "1 run(s) missing" in err and "seed 1: RuntimeError: simulated crash" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert len(Store(tmp_path / "results.db").rows()) == 1


def _owner_pid(owner: str) -> int:
    return int(owner.rpartition(":")[2].partition("@")[0])


@pytest.mark.slow  # processes killed and restarted: .ci/run runs it
def test_a_peer_killed_mid_run_loses_nothing(tmp_path):
    """Two grids on one store; SIGKILL one while it trains: the survivor trains every run, once, exit 0."""
    epochs = 12
    path = _grid_file(tmp_path, n_samples=2000, epochs=epochs, seeds=2)
    procs = [_grid(path), _grid(path)]
    db_path = tmp_path / "out" / "results.db"
    deadline, holders = time.monotonic() + 120, set()
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:  # wait until each process holds a claim: both are training
            holders = {_owner_pid(o) for (o,) in sqlite3.connect(db_path).execute("SELECT owner FROM claims")}
        except sqlite3.OperationalError:
            pass
        if holders == {p.pid for p in procs}:
            break
        time.sleep(0.02)
    victim, survivor = procs
    assert holders == {p.pid for p in procs}, "both grids should hold a run before the kill"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    out, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, out
    _check_exactly_once(tmp_path, runs=4, epochs=epochs)  # erm, amp × 2 seeds
    print(f"dead-peer: exit {survivor.returncode}, done {time.monotonic() - t0:.1f}s after the kill; "
          "4 of 4 runs stored once, 0 claims left")


def test_a_long_inline_run_keeps_its_lease(tmp_path):
    """With workers=1 the run trains in the grid's own thread: a side thread renews the lease, so a
    grid on another host cannot take the run over while it trains (and can once it stops)."""
    a = Store(tmp_path / "r.db", lease_s=0.2)
    other = Store(tmp_path / "r.db", lease_s=0.2)
    other.owner = "otherhost:1"
    assert a.claim("k")
    with a.heartbeat(["k"]):
        time.sleep(1.0)  # five leases long
        assert other.try_claim("k") == "held"
    time.sleep(0.4)
    assert other.try_claim("k") == "claimed"  # no heartbeat, lease ran out: taken over

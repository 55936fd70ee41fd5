"""`--backend ray` on a real local Ray instance (2 CPUs, started and stopped here; no mocks)."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flatmin.cli import main
from flatmin.experiments.runner import execute, make_task
from flatmin.results.store import Store
from flatmin.train import TrainConfig

FAST = ["--dataset", "spiral", "--epochs", "2", "--no-figures", "--methods", "erm,amp", "--seeds", "2"]
SRC = str(Path(__file__).parents[1] / "src")


def test_nothing_imports_ray_unless_asked(tmp_path):
    argv = ["compare", "--dataset", "spiral", "--epochs", "1", "--methods", "erm", "--seeds", "1",
            "--workers", "1", "--no-figures", "--out", str(tmp_path)]
    code = (f"import sys; from flatmin.cli import main; import flatmin.experiments.grid; "
            f"assert main({argv!r}) == 0; assert 'ray' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300, capture_output=True)
    assert len(Store(tmp_path / "results.db").rows()) == 1


@pytest.fixture(scope="module")
def cluster() -> str:
    """One local Ray instance for the module; its GCS address lets a second driver process join."""
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture()
def backend(cluster):
    """The Ray backend class (its module needs Ray installed)."""
    from flatmin.experiments.backends.ray import RayBackend

    return RayBackend


def _rows(db: Path) -> list[dict]:
    """Store rows without what differs between two sittings (times, folders)."""
    rows = Store(db).rows()
    for r in rows:
        r["metrics"].pop("train_time_s")
        r["metrics"].pop("cost", None)  # CPU and wall seconds differ run to run
        for k in ("time_s", "finished_at", "run_dir"):
            r.pop(k)
    return rows


def test_compare_on_ray_equals_the_local_backend_run_for_run(cluster, tmp_path, capsys):
    assert main(["compare", *FAST, "--workers", "1", "--out", str(tmp_path / "local")]) == 0
    assert main(["compare", *FAST, "--backend", "ray", "--out", str(tmp_path / "ray")]) == 0
    captured = capsys.readouterr()
    assert sum(": test err" in line for line in captured.out.splitlines()) == 8  # each run reported once
    assert "run/s" not in captured.err  # the one progress bar is the driver's, on a terminal only
    local, on_ray = _rows(tmp_path / "local" / "results.db"), _rows(tmp_path / "ray" / "results.db")
    assert len(local) == 4 and [r["key"] for r in local] == [r["key"] for r in on_ray]
    for a, b in zip(local, on_ray):
        assert a == b  # config, label, seed and every metric (error, NLL, ECE, reliability bins)
    assert not list((tmp_path / "ray" / "runs").glob(".probe-*"))  # the shared-folder probe cleans up


@pytest.mark.slow  # processes killed and restarted: .ci/run runs it
@pytest.mark.parametrize("retries", [3, 0])
def test_a_worker_killed_mid_run_is_retried_and_every_run_is_stored_once(backend, tmp_path, retries):
    epochs = 6
    tasks = [make_task(TrainConfig(method=m, dataset="spiral", epochs=epochs, seed=0,
                                   dataset_options={"n_samples": 2000}), f"kill-{m}", tmp_path)
             for m in ("erm", "sam")]
    killed: list[str] = []

    def kill_one_mid_run() -> None:  # SIGKILL the worker of a run that has logged an epoch, not finished
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for t in tasks:
                log = t.run_dir / "log.jsonl"
                if log.exists() and log.read_text().strip() and not (t.run_dir / "metrics.json").exists():
                    title = f"ray::flatmin {t.label} seed 0".encode()
                    for pid in filter(str.isdigit, os.listdir("/proc")):
                        try:
                            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                                os.kill(int(pid), signal.SIGKILL)
                                killed.append(t.label)
                                return  # one run only: both may have logged an epoch by now
                        except OSError:
                            pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_mid_run)
    killer.start()
    store = Store(tmp_path / "results.db")
    failed = execute(tasks, store, backend(None, num_cpus=2, max_retries=retries), log=lambda s: None)
    killer.join()
    assert killed, "no worker was caught mid-run"
    rows = store.rows()
    assert all(r["metrics"]["epochs_completed"] == epochs for r in rows)
    assert store.db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    if retries:  # the killed run was trained again (from its checkpoint) and stored like the other
        assert failed == []
        assert sorted(r["key"] for r in rows) == sorted(t.key for t in tasks)  # each once
    else:  # without retries the same kill is a failure: so the retry above is what saved the run
        assert len(failed) == 1 and failed[0].startswith(f"{killed[0]} seed 0: ") and "Error" in failed[0]
        assert [r["label"] for r in rows] == [t.label for t in tasks if t.label != killed[0]]


def test_a_run_failing_for_its_own_reason_is_reported_once_and_the_others_finish(cluster, tmp_path, capsys):
    out = tmp_path / "bad"
    args = ["compare", *FAST[:-4], "--methods", "erm,erm:lr=1e30", "--seeds", "1", "--backend", "ray",
            "--out", str(out)]
    assert main(args) == 1  # a failed run (bad usage would be 2)
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(err_lines) == 1 and "1 runs did not finish" in err_lines[0]
    assert "erm:lr=1e30 seed 0: NonFiniteLossError: non-finite training loss" in err_lines[0]
    assert captured.out.count("FAILED erm:lr=1e30 seed 0") == 1  # recorded once, not retried
    assert [(r["label"], r["seed"]) for r in Store(out / "results.db").rows()] == [("erm", 0)]


def test_a_wrong_ray_address_is_one_message_and_writes_nothing(cluster, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "never"
    for flags, says in ((["--ray-address", f"127.0.0.1:{port}"], "no Ray cluster answers at 127.0.0.1"),
                        (["--ray-address", "nonsense"], "expected auto, HOST:PORT or ray://HOST:10001"),
                        (["--cpus-per-run", "0"], "--cpus-per-run: expected a finite number > 0"),
                        (["--cpus-per-run", "nan"], "--cpus-per-run: expected a finite number > 0"),
                        # more than any node has: refused before a task is submitted, never a hang
                        (["--ray-address", cluster, "--cpus-per-run", "3"], "--cpus-per-run 3: no node"),
                        (["--ray-address", cluster, "--gpus-per-run", "64"], "--gpus-per-run 64: no node")):
        assert main(["compare", *FAST, "--backend", "ray", *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not out.exists()
    assert main(["compare", *FAST, "--ray-address", "auto", "--out", str(out)]) == 2
    assert "--ray-address: only with --backend ray" in capsys.readouterr().err
    assert not out.exists()


def test_the_shared_folder_probe_names_what_a_node_cannot_do(tmp_path):
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    from flatmin.experiments.backends.ray import _probe

    (tmp_path / ".probe-abc").write_text("abc")
    assert _probe(str(tmp_path), "abc") == ""
    assert "does not see the files" in _probe(str(tmp_path), "other")
    assert "does not see the files" in _probe(str(tmp_path / "elsewhere"), "abc")


@pytest.mark.slow  # processes killed and restarted: .ci/run runs it
@pytest.mark.xfail(strict=False, reason="open: in a clean clone's full -n auto run the Ray driver "
                   "finishes all four runs without raising on the Ctrl-C (passes alone)")
def test_interrupt_keeps_finished_runs_and_a_rerun_trains_only_the_rest(cluster, tmp_path, capsys):
    out = tmp_path / "int"
    # One run at a time (2 CPUs each on the 2-CPU cluster), 120 epochs (≈ 1.5 s a run since a run no longer
    # fsyncs a checkpoint every epoch; 40 epochs let all four finish before the signal): Ctrl-C lands while
    # the next run is mid-way, not as it finishes (a cancel meeting a finishing task aborts Ray 2.60)
    args = ["compare", "--dataset", "spiral", "--epochs", "120", "--no-figures", "--methods", "erm,sam",
            "--seeds", "2", "--backend", "ray", "--ray-address", cluster, "--cpus-per-run", "2",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "flatmin", *args], env={**os.environ, "PYTHONPATH": SRC},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = out / "results.db"
    while proc.poll() is None:  # Ctrl-C once the first run has finished (its metrics.json) or is stored
        if any(out.glob("runs/*/metrics.json")):
            break
        try:
            if db.exists() and sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] >= 1:
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "interrupted: cancelling" in text
    stored = {r["run_dir"] for r in Store(db).rows()}
    assert 1 <= len(stored) < 4, text
    before = {d: (Path(d) / "metrics.json").stat().st_mtime_ns for d in stored}
    assert main(args) == 0
    assert f"{len(stored)} of 4 runs already in" in capsys.readouterr().out
    assert before == {d: (Path(d) / "metrics.json").stat().st_mtime_ns for d in stored}  # not retrained
    assert len(Store(db).rows()) == 4

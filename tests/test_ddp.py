"""DDP: 2 CPU ranks (gloo) reproduce the single-process run; per-rank ascent; resume; torchrun CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tests.helpers import spawn_ranks

from flatmin.errors import ConfigError
from flatmin.train import TrainConfig, train
from flatmin.train.distributed import shard

pytestmark = [pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available"),
    pytest.mark.slow]  # multi-process: the quick loop (-m "not slow") keeps the conformance spawn

# B = 101 over 3,600 MNIST-1D examples: every batch is uneven over 2 ranks (51/50), and so is the
# last one (65 examples: 33/32), which is exactly what the weighted all-reduce must get right.
MNIST1D = dict(dataset="mnist1d", epochs=2, batch_size=101, lr=0.05)  # at 0.1 SAM amplifies rounding
SPIRAL = dict(dataset="spiral", epochs=3, batch_size=20, lr=0.1, dataset_options={"n_samples": 200})
TIMEOUT = 240  # a bound, not a timing assertion (a loaded 2-core machine is slow)


@contextmanager
def trained_model() -> Iterator[dict]:
    """Keep the last model `train` builds (the one it hands to the data-parallel wrapper) in ``kept``."""
    from flatmin.train import loop

    kept: dict = {}
    real = loop.current

    def current(device: torch.device, **options):
        process = real(device, **options)
        wrap = process.wrap

        def keep(model: torch.nn.Module, *args) -> torch.nn.Module:
            kept["model"] = model
            return wrap(model, *args)

        process.wrap = keep
        return process

    loop.current = current
    try:
        yield kept
    finally:
        loop.current = real


@contextmanager
def counted_steps() -> Iterator[list[str]]:
    """Host syncs inside every training step but each epoch's first (the trainer's steps as they run)."""
    from flatmin.optim.syncs import count_syncs
    from flatmin.train import loop

    real, seen, calls = loop.train_step, [], [0]

    def counting(*args, **kw):
        calls[0] += 1
        if calls[0] == 1:
            return real(*args, **kw)
        with count_syncs() as log:
            out = real(*args, **kw)
        seen.extend(f"{op} at {where}" for op, where in log.events)
        return out

    loop.train_step = counting
    try:
        yield seen
    finally:
        loop.train_step = real


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """All parameters as one vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train_interrupted_then_resumed(cfg: TrainConfig, out: str) -> dict | None:
    """Die at the start of epoch 2 on every rank (as a kill would), then resume from the checkpoint."""
    from flatmin.train import loop

    real = loop.run_epoch

    def dying(*args, **kw):
        if args[4] == 1:  # the epoch argument
            raise KeyboardInterrupt
        return real(*args, **kw)

    loop.run_epoch = dying
    try:
        train(cfg, out, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        loop.run_epoch = real
    torch.distributed.barrier()  # every rank is down (rank 0 has written epoch 1) before any restarts
    assert json.loads(Path(out, "log.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    return train(cfg, out, resume=True, progress=False)


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[dict, str | None, bool]],
            answers: str) -> None:
    """One rank: join through the env vars torchrun would set, run the jobs, save result and θ."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = []
    for cfg, folder, interrupt in jobs:
        with trained_model() as kept, counted_steps() as syncs:
            if interrupt:
                result = _train_interrupted_then_resumed(TrainConfig(**cfg), folder)
            else:
                result = train(TrainConfig(**cfg), folder, progress=False)
        out.append({"result": result, "params": flat_params(kept["model"]).tolist(), "syncs": syncs})
    Path(f"{answers}.{rank}").write_text(json.dumps(out))


def _spawn(jobs: list[tuple[dict, str | None, bool]], tmp_path: Path, world_size: int = 2) -> list[list]:
    """Run the jobs on ``world_size`` spawned ranks, bounded in time; every rank's answers."""
    return spawn_ranks(_worker, (jobs,), str(tmp_path / "answers"), TIMEOUT, world_size, "DDP ranks")


def _single_run(cfg: dict) -> tuple[dict, torch.Tensor]:
    """The single-process result and final parameters of a config."""
    with trained_model() as kept:
        result = train(TrainConfig(**cfg), progress=False)
    return result, flat_params(kept["model"])


def test_shard_splits_the_global_batch_into_contiguous_near_equal_parts():
    idx = torch.randperm(11)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat(parts), idx)
    with pytest.raises(ConfigError, match="cannot be shared by 3 ranks"):
        shard(idx[:2], 0, 3)


METHODS = ("erm", "amp", "sam")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-rank job for the whole module (process start-up is the expensive part)."""
    tmp = tmp_path_factory.mktemp("ddp")
    spiral = {**SPIRAL, "method": "amp"}
    jobs = {m: ({**MNIST1D, "method": m}, None, False) for m in METHODS}
    jobs["local"] = ({**MNIST1D, "method": "amp", "ddp_local_ascent": True}, None, False)
    for m in ("amp", "sam"):  # 2 ranks x 3 micro-batches each
        jobs[f"accumulate_{m}"] = ({**MNIST1D, "method": m, "accumulate": 3}, None, False)
    jobs["whole"] = (spiral, str(tmp / "whole"), False)
    jobs["killed"] = (spiral, str(tmp / "killed"), True)
    ranks = _spawn(list(jobs.values()), tmp)
    return {name: (jobs[name][0], *answers) for name, *answers in zip(jobs, *ranks)} | {"tmp": tmp}


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_reproduce_the_single_process_run(ddp_runs, method):
    cfg, rank0, rank1 = ddp_runs[method]
    assert rank1["result"] is None and rank0["result"]["world_size"] == 2
    assert rank0["params"] == rank1["params"], "θ drifted between ranks"  # bit for bit
    single, params = _single_run(cfg)
    for split in ("train", "val", "test"):
        assert rank0["result"][split]["error"] == single[split]["error"], split
        for key in ("nll", "ece"):
            assert abs(rank0["result"][split][key] - single[split][key]) < 1e-4, (split, key)
    # rounding differs (sums split over ranks); training amplifies it to ~1e-4 in θ for SAM
    assert torch.allclose(torch.tensor(rank0["params"]), params, atol=1e-3)


@pytest.mark.parametrize("method", ["amp", "sam"])
def test_two_ranks_with_micro_batches_reproduce_the_single_process_run(ddp_runs, method):
    cfg, rank0, rank1 = ddp_runs[f"accumulate_{method}"]
    assert rank0["params"] == rank1["params"]
    single, _ = _single_run({**cfg, "accumulate": 1})
    for split in ("train", "val", "test"):
        assert rank0["result"][split]["error"] == single[split]["error"], split
        for key in ("nll", "ece"):
            assert abs(rank0["result"][split][key] - single[split][key]) < 1e-4, (split, key)


def test_no_host_sync_in_a_data_parallel_step(ddp_runs):
    for name in ("amp", "sam", "accumulate_amp", "local"):
        for answers in ddp_runs[name][1:]:
            assert answers["syncs"] == [], (name, answers["syncs"][:3])


def test_local_ascent_keeps_ranks_in_sync_but_is_another_algorithm(ddp_runs):
    _, rank0, rank1 = ddp_runs["local"]
    assert rank0["params"] == rank1["params"]  # the final gradient is still all-reduced
    assert rank0["params"] != ddp_runs["amp"][1]["params"]  # each rank ascended on its own half


def test_checkpoint_and_resume_under_ddp_retrace_the_uninterrupted_run(ddp_runs):
    whole, killed = ddp_runs["whole"][1]["result"], ddp_runs["killed"][1]["result"]
    for split in ("train", "val", "test"):
        assert killed[split] == whole[split]
    tmp = ddp_runs["tmp"]
    logged = [json.loads(x)["epoch"] for x in (tmp / "killed" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    assert sorted(p.name for p in (tmp / "whole").iterdir()) == ["checkpoint.pt", "log.jsonl", "metrics.json"]


def test_torchrun_command_line(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "spiral", "--method", "sam", "--epochs", "2", "--batch-size", "20", "--quiet",
            "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flatmin", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # one JSON document: only rank 0 prints
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["world_size"] == 2
    assert printed["test"] == {k: saved["test"][k] for k in ("error", "nll", "ece")}
    single = train(TrainConfig(dataset="spiral", method="sam", epochs=2, batch_size=20), progress=False)
    assert saved["test"]["error"] == single["test"]["error"]
    assert abs(saved["test"]["nll"] - single["test"]["nll"]) < 1e-4

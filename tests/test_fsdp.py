"""FSDP2 (fully_shard) on 2 CPU ranks (gloo): every rule's sharded step ≡ unsharded; `--fsdp` ≡ one process.

One spawn of 2 ranks runs everything that needs both (process start-up is the expensive part): the
optimizer-level comparisons, the trainer runs and an interrupted run resumed. The single-process
references run in the test process; a real ``kill -9`` of a torchrun job is resumed with W = 1.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers import spawn_ranks

from flatmin.errors import ConfigError
from flatmin.optim import AMP, BSAM, ERM, ESAM, GSAM, MSAM, RMP, SAM, WSAM, FriendlySAM, LookSAM
from flatmin.optim.driver import closure_pass, drive, sub_batch
from flatmin.optim.rules.amp_variants import OnePassAMP, ReuseAMP, SubBatchAMP
from flatmin.optim.sharded import full_state, is_sharded, shard_optimizer_state
from flatmin.optim.syncs import count_syncs
from flatmin.train import TrainConfig, train
from flatmin.train.checkpoint import load_checkpoint
from flatmin.train.distributed import FSDPProcess, shard_model
from test_ddp import TIMEOUT, _train_interrupted_then_resumed, trained_model

pytestmark = [pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available"),
    pytest.mark.slow]  # multi-process: the quick loop (-m "not slow") keeps the conformance spawn

# B = 21 over 180 training examples: every batch splits 11/10 over 2 ranks, the last one (12) 6/6.
SPIRAL = dict(dataset="spiral", epochs=2, batch_size=21, lr=0.1, dataset_options={"n_samples": 200},
              fsdp=True)
METHODS = {"erm": {}, "amp": {"method": "amp", "ball": "global"},
           "amp_per_tensor": {"method": "amp", "ball": "per_tensor", "epsilon": 0.02},
           "sam": {"method": "sam"}, "rmp": {"method": "rmp"}, "gsam": {"method": "gsam"},
           "amp_accumulate": {"method": "amp", "accumulate": 2}}

# What the torchrun command line of the kill -9 test trains (600 spiral points: 540 train, 25×21 + 15).
KILL = dict(dataset="spiral", method="amp", epochs=3, batch_size=21, lr=0.1, fsdp=True)

# The optimizer-level cases, every rule: (rule, keyword arguments); ε small enough that every ball clips.
CASES = {
    "amp_global": (AMP, dict(lr=0.1, epsilon=0.01, ball="global", momentum=0.9)),
    "amp_per_tensor_n2_adam": (AMP, dict(lr=0.01, epsilon=0.01, inner_iter=2, ball="per_tensor",
                                         base_optimizer=torch.optim.Adam)),
    "sam": (SAM, dict(lr=0.1, rho=0.05, momentum=0.9)),
    "asam": (SAM, dict(lr=0.1, rho=0.5, adaptive=True)),
    "sam_splits": (SAM, dict(lr=0.1, rho=0.05, splits=2, momentum=0.9)),
    "rmp": (RMP, dict(lr=0.1, radius=0.1)),
    "erm": (ERM, dict(lr=0.1, momentum=0.9)),
    "reuse": (ReuseAMP, dict(lr=0.1, epsilon=0.01, reuse_every=2)),
    "onepass": (OnePassAMP, dict(lr=0.1, epsilon=0.01, momentum=0.9)),
    "subbatch": (SubBatchAMP, dict(lr=0.1, epsilon=0.01, ascent_fraction=0.5)),
    "gsam": (GSAM, dict(lr=0.1, rho=0.05, alpha=0.4, momentum=0.9)),
    "gsam_rho_min": (GSAM, dict(lr=0.1, rho=0.05, alpha=0.4, rho_min=0.01, lr_min=0.01)),
    "fsam": (FriendlySAM, dict(lr=0.1, rho=0.05, lmbda=0.6, momentum=0.9)),
    "looksam": (LookSAM, dict(lr=0.1, rho=0.05, k=2, momentum=0.9)),
    "wsam": (WSAM, dict(lr=0.1, rho=0.05, gamma=0.8, momentum=0.9)),
    "wsam_coupled": (WSAM, dict(lr=0.1, rho=0.05, gamma=0.8, decouple=False, momentum=0.9)),
    "bsam": (BSAM, dict(num_data=200, lr=0.05, rho=0.05)),
    "esam": (ESAM, dict(lr=0.1, rho=0.05, beta=0.6, seed=3, momentum=0.9)),
    "msam": (MSAM, dict(lr=0.1, rho=0.3, momentum=0.9)),
}
SEEDED = (RMP, BSAM)  # rules that draw noise: a seeded generator each, the same on every rank


class _Net(torch.nn.Module):
    """Rows 9 and 5 split 5/4 and 3/2 over 2 ranks (uneven shards); the root owns a parameter too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def _net() -> torch.nn.Module:
    """The test model in float64, to compare tightly."""
    torch.manual_seed(0)
    return _Net().double()


def _step(opt, net, x, y, *, poison: bool = False, reduce_flag=None) -> None:
    """One step of the driver (the closure slices the batch for sub-batch ascent and m-sharpness);
    ``poison``: this rank reports a NaN loss after a finite backward (so only its own flag is set)."""
    def closure(ascent: bool = False, split: int = 0, splits: int = 1):
        opt.zero_grad(set_to_none=True)
        xs, ys = (x[sub_batch(len(x), split, splits)], y[sub_batch(len(y), split, splits)]) if splits > 1 \
            else (x, y)
        n = opt.ascent_size(len(xs)) if ascent else len(xs)
        loss = torch.nn.functional.cross_entropy(net(xs[:n]), ys[:n])
        loss.backward()
        return loss * float("nan") if poison else loss
    drive(opt, closure_pass(closure, opt), reduce_flag=reduce_flag, sub_batches=True)


def _build(name: str, params) -> torch.optim.Optimizer:
    rule, kwargs = CASES[name]
    if rule in SEEDED:
        kwargs = {**kwargs, "generator": torch.Generator().manual_seed(7)}
    opt = rule(params, **kwargs)
    if name == "gsam_rho_min":  # the learning rate halved (as by a scheduler): ρ_t follows it
        for group in opt.param_groups:
            group["lr"] = 0.05
    return opt


def _optimizer_checks() -> dict:
    """Per case: sharded vs unsharded θ after 4 steps (a checkpoint round trip after 2) and the state
    (base optimizer's and the rule's kept buffers), syncs, memory, a one-rank NaN skipped everywhere."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))  # the same on both ranks
    out = {}
    for name in CASES:
        ref = _net()
        net = copy.deepcopy(ref)
        shard_model(net)
        ref_opt, opt = _build(name, ref.parameters()), _build(name, net.parameters())
        syncs = []
        for step in range(4):
            _step(ref_opt, ref, x, y)
            with count_syncs() as log:
                _step(opt, net, x, y)
            syncs.append(log.describe())
            with torch.no_grad():  # an evaluation between steps, as the trainer's (gathers the root)
                net(x)
            if step == 1:  # gather to full state (the single-process layout), cut it again, load it fresh
                saved = full_state(opt.state_dict())
                layout_diff = _max_diff(_tensors(saved), _tensors(ref_opt.state_dict()))
                if isinstance(opt, RMP):
                    saved_gen = opt.generator.get_state()
                opt = _build(name, net.parameters())
                opt.load_state_dict(shard_optimizer_state(saved, list(net.parameters())))
                if isinstance(opt, RMP):
                    opt.generator.set_state(saved_gen)
        state_diff = _max_diff(_tensors(full_state(opt.state_dict())), _tensors(ref_opt.state_dict()))
        full = [p.full_tensor() for p in net.parameters()]
        held = [b for b in opt.held_buffers() if b.dim() > 0]  # (Adam's step counters are scalars)
        before = [p.to_local().clone() for p in net.parameters()]
        rank = torch.distributed.get_rank()  # rank 1 alone sees a NaN loss: every rank must skip
        agree = FSDPProcess(rank, 2, torch.device("cpu")).reduce_flag
        _step(opt, net, x, y, poison=rank == 1, reduce_flag=agree)
        out[name] = {
            "skipped": opt.skipped_steps,
            "untouched": all(torch.equal(a, p.to_local()) for a, p in zip(before, net.parameters())),
            "diff": _max_diff(full, list(ref.parameters())), "layout_diff": layout_diff,
            "state_diff": state_diff,
            "syncs": [s for s in syncs if s],
            "buffers_sharded": all(is_sharded(b) for b in held) and bool(held),
            "held_local": sum(b.to_local().numel() for b in held), "held_full": sum(b.numel() for b in held)}
    return out


def _tensors(state: dict) -> list[torch.Tensor]:
    """Every per-parameter tensor of an optimizer state, in order: the base optimizer's, then the rule's
    kept buffers (a Δ, a gradient, an EMA: the index-keyed dicts of ``"perturbation"``)."""
    base = [v for i in sorted(state["state"]) for _, v in sorted(state["state"][i].items())
            if isinstance(v, torch.Tensor) and v.dim() > 0]
    kept = [v for _, d in sorted(state.get("perturbation", {}).items()) if isinstance(d, dict) and d
            and all(isinstance(k, int) for k in d) for _, v in sorted(d.items())]
    return base + kept


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(s.shape == t.shape for s, t in zip(a, b))
    return max((float((s.detach() - t.detach()).abs().max()) for s, t in zip(a, b)), default=0.0)


def _full_params(model: torch.nn.Module) -> list[float]:
    """All parameters gathered (a collective under FSDP), as one list."""
    return torch.cat([(p.full_tensor() if is_sharded(p) else p).detach().flatten()
                      for p in model.parameters()]).tolist()


def _worker(rank: int, world_size: int, port: int, jobs: dict, answers: str) -> None:
    """One rank: the optimizer checks, then each trainer job (a run, an interrupted run, a resumed one)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    out = {"optimizer": _optimizer_checks()}
    for name, (cfg, folder, how) in jobs.items():
        with trained_model() as kept:
            if how == "interrupt":
                result = _train_interrupted_then_resumed(TrainConfig(**cfg), folder)
            else:
                result = train(TrainConfig(**cfg), folder, resume=how == "resume", progress=False)
        out[name] = {"result": result, "params": _full_params(kept["model"])}
    Path(f"{answers}.{rank}").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-rank spawn for the module; a W = 1 checkpoint to be resumed at W = 2 is written first."""
    tmp = tmp_path_factory.mktemp("fsdp")
    resume_cfg = {**SPIRAL, "method": "amp", "epochs": 3, "fsdp": False}
    _single_interrupted(resume_cfg, tmp / "from_w1")  # epoch 1 written by a single process
    jobs = {name: ({**SPIRAL, **over}, None, "run") for name, over in METHODS.items()}
    jobs["bf16"] = ({**SPIRAL, "method": "sam", "precision": "bf16"}, None, "run")
    jobs["whole"] = (KILL, str(tmp / "whole"), "run")
    jobs["killed"] = (KILL, str(tmp / "killed"), "interrupt")
    jobs["from_w1"] = ({**resume_cfg, "fsdp": True}, str(tmp / "from_w1"), "resume")
    ranks = spawn_ranks(_worker, (jobs,), str(tmp / "answers"), 2 * TIMEOUT, what="FSDP ranks")
    return {"ranks": ranks, "jobs": jobs, "tmp": tmp, "resume_cfg": resume_cfg}


def _single_interrupted(cfg: dict, out: Path) -> None:
    """A single-process run stopped after its first epoch (its checkpoint is what remains)."""
    from flatmin.train import loop

    real = loop.run_epoch

    def dying(*args, **kw):
        if args[4] == 1:
            raise KeyboardInterrupt
        return real(*args, **kw)

    loop.run_epoch = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg), out, progress=False)
    finally:
        loop.run_epoch = real


def _same_metrics(got: dict, want: dict) -> None:
    """Errors identical, NLL and ECE within 1e-4, on every split."""
    for split in ("train", "val", "test"):
        assert got[split]["error"] == want[split]["error"], split
        for key in ("nll", "ece"):
            assert abs(got[split][key] - want[split][key]) < 1e-4, (split, key, got[split], want[split])


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_equals_the_unsharded_step(fsdp_runs, case):
    for rank in fsdp_runs["ranks"]:
        got = rank["optimizer"][case]
        assert got["diff"] < 1e-12, got["diff"]  # float64: the shards' norms round like the whole's
        assert got["layout_diff"] < 1e-12, "a gathered state is not the single-process state"
        assert got["state_diff"] < 1e-12, "the sharded rule's state (and kept buffers) differ"
        if "adam" not in case:  # torch's unfused Adam reads its CPU step counter with .item() (test_syncs)
            assert got["syncs"] == [], "\n".join(got["syncs"])
        assert got["buffers_sharded"]
        assert got["skipped"] == 1 and got["untouched"], "one rank's NaN loss: every rank skips"
        assert got["held_local"] < 0.7 * got["held_full"]  # this rank's rows only (at most 5/9 of them)


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp_reproduces_the_single_process_run(fsdp_runs, name):
    cfg = fsdp_runs["jobs"][name][0]
    rank0, rank1 = (r[name] for r in fsdp_runs["ranks"])
    assert rank1["result"] is None and rank0["result"]["world_size"] == 2
    assert rank0["params"] == rank1["params"]
    with trained_model() as kept:
        single = train(TrainConfig(**{**cfg, "fsdp": False}), progress=False)
    _same_metrics(rank0["result"], single)
    assert torch.allclose(torch.tensor(rank0["params"]), torch.tensor(_full_params(kept["model"])), atol=1e-4)


def test_fsdp_composes_with_bf16_parameters(fsdp_runs):
    rank0 = fsdp_runs["ranks"][0]["bf16"]["result"]
    single = train(TrainConfig(**{**fsdp_runs["jobs"]["bf16"][0], "fsdp": False}), progress=False)
    # bf16 all-gathers round θ itself for the forward pass (autocast keeps fp32 weights): close, not equal
    assert abs(rank0["test"]["error"] - single["test"]["error"]) < 5
    assert abs(rank0["test"]["nll"] - single["test"]["nll"]) < 0.05


def test_interrupted_fsdp_run_resumes_on_its_trajectory(fsdp_runs):
    rank0 = {job: fsdp_runs["ranks"][0][job] for job in ("whole", "killed", "from_w1")}
    assert rank0["killed"]["params"] == rank0["whole"]["params"]  # W = 2 → W = 2: bit for bit
    for split in ("train", "val", "test"):
        assert rank0["killed"]["result"][split] == rank0["whole"]["result"][split]
    single = train(TrainConfig(**fsdp_runs["resume_cfg"]), progress=False)
    _same_metrics(rank0["from_w1"]["result"], single)  # W = 1 → W = 2
    log = (fsdp_runs["tmp"] / "from_w1" / "log.jsonl").read_text()
    logged = [json.loads(x)["epoch"] for x in log.splitlines()]
    assert logged == [1, 2, 3]
    whole = fsdp_runs["tmp"] / "whole"  # rank 0 alone wrote, and only these
    assert sorted(p.name for p in whole.iterdir()) == ["checkpoint.pt", "log.jsonl", "metrics.json"]
    assert len((whole / "log.jsonl").read_text().splitlines()) == 3


def test_kill_9_of_a_torchrun_fsdp_job_resumes_with_one_process(fsdp_runs, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", KILL["dataset"], "--method", KILL["method"], "--epochs", str(KILL["epochs"]),
            "--batch-size", str(KILL["batch_size"]), "--lr", str(KILL["lr"]), "--fsdp", "--quiet",
            "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flatmin", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    errors = tmp_path / "stderr.txt"  # a file, not a pipe: a full pipe would stall the job
    with open(errors, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-run
    proc.wait()
    assert (out / "checkpoint.pt").exists(), errors.read_text()[-2000:]
    assert not (out / "metrics.json").exists(), "the job finished before it was killed"
    saved = TrainConfig.from_dict(load_checkpoint(out)["config"])
    assert saved.fsdp and saved.to_dict() == TrainConfig(**KILL).to_dict() | {"model": "mlp", **{
        k: v for k, v in saved.to_dict().items() if TrainConfig(**KILL).to_dict()[k] is None}}
    resumed = train(saved.replace(fsdp=False), out, resume=True, progress=False)
    whole = fsdp_runs["ranks"][0]["whole"]["result"]  # the same run, W = 2, never interrupted
    _same_metrics(resumed, whole)


def test_fsdp_refuses_per_rank_ascent():
    with pytest.raises(ConfigError, match="exclude each other"):
        train(TrainConfig(**{**SPIRAL, "ddp_local_ascent": True}), progress=False)

"""The conformance matrix's multi-process cells: every registered rule on 2 gloo ranks, replicated
(DDP) and sharded (FSDP2's ``fully_shard``), ≡ the same rule in one process on the whole batch, to
1e-12 in float64 (the sums run in another order), with no host sync in a sharded step.

One spawn of 2 ranks computes every cell (process start-up is the expensive part); each rank runs
the one-process reference itself. Settings whose sub-batches, ascent head or example selection are per
rank by design (m-sharpness, sub-batch AMP, ESAM's data selection) are compared in one process only
(tests/conformance/test_conformance_step.py): their DDP step is not the one-process step, and is not
meant to be.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch
from tests.conformance.rule_db import CASES, N, RuleCase, Step, batch, model
from tests.conformance.test_conformance_routes import trainer_fields
from tests.helpers import spawn_ranks

from flatmin.optim.sharded import is_sharded
from flatmin.optim.syncs import count_syncs

pytestmark = [pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")]

# B = 21 over 108 training examples: batches split 11/10 over 2 ranks (uneven shards too)
TRAIN = dict(dataset="spiral", epochs=1, batch_size=21, lr=0.1, dataset_options={"n_samples": 120})
SHARDABLE = [c for c in CASES if c.splits == 1 and not c.selects
             and c.build(model().parameters()).batch_fraction(True) == 1]  # a per-rank ascent head too
MODES = ("ddp", "fsdp")
STEPS = 3
TRAINER = [c for c in SHARDABLE if trainer_fields(c) is not None]
TIMEOUT = 300  # a bound on the spawn, not a timing assertion


def _wrap(mode: str, net: torch.nn.Module, unused: bool) -> torch.nn.Module:
    """DDP or fully_shard around the matrix's model (``unused``: some tensors sit out a pass)."""
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=unused)
    from flatmin.train.distributed import shard_model

    return shard_model(net)


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if is_sharded(p) else p).detach()


def _cell(mode: str, case: RuleCase, rank: int) -> dict:
    """3 steps on this rank's half of each batch vs 3 one-process steps on the whole batch."""
    ref = model()
    ref_opt = case.build(ref.parameters())
    torch.manual_seed(1)
    drv = Step(ref, ref_opt, case)
    for t in range(STEPS):
        drv.run("drive", *batch(t))
    # a rule that switches tensors off for its ascent (ESAM's β < 1) needs DDP's unused-parameter
    # search, whose own host syncs are DDP's, not the rule's: that cell's syncs are not counted
    unused = case.info.unused_params is not None and case.info.unused_params(case.kwargs)
    net = _wrap(mode, model(), unused)
    opt = case.build(net.parameters())
    torch.manual_seed(1)
    drv = Step(net, opt, case)
    half = slice(rank * N // 2, (rank + 1) * N // 2)
    syncs = 0
    for t in range(STEPS):
        x, y = batch(t)
        with count_syncs() as log:
            drv.run("drive", x[half], y[half])
        syncs += len(log) if t and not (unused and mode == "ddp") else 0  # step 0 sets state up
    diff = max(float((_full(p) - q).abs().max()) for p, q in zip(net.parameters(), ref.parameters()))
    return {"diff": diff, "syncs": syncs}


def _full_params(net: torch.nn.Module) -> list[float]:
    """Every parameter gathered (a collective under FSDP), as one list."""
    return torch.cat([_full(p).flatten() for p in net.parameters()]).tolist()


def _trainer_cell(mode: str, case: RuleCase) -> dict:
    """The trainer on 2 ranks (``--fsdp`` or DDP): its final weights, to compare with one process."""
    from tests.test_ddp import trained_model

    from flatmin.train import TrainConfig, train

    with trained_model() as kept:
        train(TrainConfig(method=case.info.name, fsdp=mode == "fsdp", **TRAIN, **trainer_fields(case)),
              progress=False)
    return {"params": _full_params(kept["model"])}


def _worker(rank: int, world: int, port: int, answers: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for mode in MODES:
        for case in SHARDABLE:
            try:
                out[f"{mode}/{case.id}"] = _cell(mode, case, rank)
            except Exception as err:  # noqa: BLE001 (a failing cell is reported by its test, not the spawn)
                out[f"{mode}/{case.id}"] = {"error": f"{type(err).__name__}: {err}",
                                            "where": traceback.format_exc(limit=-3)}
                torch.distributed.barrier()
        for case in TRAINER:
            key = f"train/{mode}/{case.id}"
            try:
                out[key] = _trainer_cell(mode, case)
            except Exception as err:  # noqa: BLE001
                out[key] = {"error": f"{type(err).__name__}: {err}", "where": traceback.format_exc(limit=-3)}
                torch.distributed.barrier()
    Path(f"{answers}.{rank}").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    answers = str(tmp_path_factory.mktemp("conformance") / "answers")
    return spawn_ranks(_worker, (), answers, TIMEOUT, what="the conformance ranks")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SHARDABLE, ids=lambda c: c.id)
def test_two_ranks_equal_one_process(cells, mode, case):
    if not case.info.sharded and mode == "fsdp":
        pytest.skip(f"{case.info.name}: the registry says it does not run sharded (the trainer refuses it)")
    for rank, answers in enumerate(cells):
        got = answers[f"{mode}/{case.id}"]
        where = f"rank {rank}: {case.id} under {mode}"
        assert "error" not in got, f"{where}: {got.get('error')}\n{got.get('where')}"
        assert got["diff"] < 1e-12, f"{where} is {got['diff']:.3g} from one process"
        assert got["syncs"] == 0, f"{where}: {got['syncs']} host syncs"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TRAINER, ids=lambda c: c.id)
def test_the_trainer_on_two_ranks_reproduces_one_process(cells, mode, case):
    """`torchrun --nproc_per_node 2 -m flatmin train --method NAME [--fsdp]`, in-process: the weights of
    the one-process run (float32; 1e-5: the ranks' partial sums round differently)."""
    from tests.test_ddp import trained_model

    from flatmin.train import TrainConfig, train

    with trained_model() as kept:
        train(TrainConfig(method=case.info.name, **TRAIN, **trainer_fields(case)), progress=False)
    single = torch.tensor(_full_params(kept["model"]))
    for rank, answers in enumerate(cells):
        got = answers[f"train/{mode}/{case.id}"]
        where = f"rank {rank}: {case.id} trainer under {mode}"
        assert "error" not in got, f"{where}: {got.get('error')}\n{got.get('where')}"
        torch.testing.assert_close(torch.tensor(got["params"]), single, rtol=0, atol=1e-5)

"""BatchNorm running statistics are touched only by the unperturbed pass."""

from __future__ import annotations

import torch
from torch import nn

from flatmin.optim import frozen_running_stats


def test_frozen_running_stats_uses_batch_stats_and_keeps_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()
    x = torch.randn(32, 4) * 3 + 1
    model(x)  # one normal pass moves the running stats
    bn = model[1]
    stats = ("running_mean", "running_var", "num_batches_tracked")
    buffers = {k: getattr(bn, k).clone() for k in stats}
    ref = model(x).detach()  # batch statistics in train mode
    assert all(not torch.equal(getattr(bn, k), v) for k, v in buffers.items())  # a normal pass moves them
    buffers = {k: v.clone() for k, v in bn.state_dict().items()}
    with frozen_running_stats(model):
        out = model(x)
    assert torch.allclose(out, ref)
    for k, v in buffers.items():
        assert torch.equal(bn.state_dict()[k], v), k
    assert bn.track_running_stats

"""Loss landscapes: filter normalisation, exact curves of quadratics, θ untouched, CLI files."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from flatmin.analysis._common import DatasetLoss
from flatmin.analysis.landscape import loss_curve_1d, loss_surface_2d, random_direction


@pytest.fixture(autouse=True, scope="module")
def _float64_one_thread():
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny ops: threads only add contention
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def conv_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4), nn.Linear(4, 3))


def data(n=40):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def snapshot(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def assert_unchanged(model, before):
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before))


def test_filter_normalised_direction_has_thetas_filter_norms_and_zero_bias_bn():
    model = conv_bn_model()
    d = random_direction(model, torch.Generator().manual_seed(0))
    for p, dp in zip(model.parameters(), d):
        assert dp.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(dp) == 0
        else:
            dims = tuple(range(1, p.dim()))
            norm = torch.linalg.vector_norm
            assert torch.allclose(norm(dp, dim=dims), norm(p.detach(), dim=dims), rtol=1e-12)
    again = random_direction(model, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(d, again))  # one seed, one direction
    keep = random_direction(model, torch.Generator().manual_seed(0), ignore_bn=False, filter_normalize=False)
    for p, dp in zip(model.parameters(), keep):
        assert torch.equal(dp, p.detach()) if p.dim() <= 1 else not torch.equal(dp, p.detach())


def test_curve_at_zero_is_the_plain_loss_and_the_model_is_restored_exactly():
    model, (x, y) = conv_bn_model(), data()
    model.train()
    before = snapshot(model)
    fn = DatasetLoss(x, y, batch_size=16).loss_and_accuracy
    d = random_direction(model, torch.Generator().manual_seed(0))
    alphas = torch.linspace(-1, 1, 5).tolist()
    curve = loss_curve_1d(model, fn, d, alphas)
    assert curve.loss.shape == curve.accuracy.shape == (5,)
    loss0, acc0 = fn(model)
    assert curve.loss[2] == loss0 and curve.accuracy[2] == acc0
    assert curve.loss[0] != loss0
    assert_unchanged(model, before)
    assert model.training  # the mode is given back too


def test_surface_matches_a_direct_evaluation_and_restores_the_model():
    model, (x, y) = conv_bn_model(), data()
    before = snapshot(model)
    fn = DatasetLoss(x, y).loss_and_accuracy
    g = torch.Generator().manual_seed(3)
    d1, d2 = random_direction(model, g), random_direction(model, g)
    surf = loss_surface_2d(model, fn, d1, d2, [-0.5, 0.0, 0.5], [0.0, 0.25])
    assert surf.loss.shape == (3, 2)
    moved = conv_bn_model()
    with torch.no_grad():
        for p, a, b in zip(moved.parameters(), d1, d2):
            p.add_(0.5 * a + 0.25 * b)
    assert surf.loss[2, 1] == pytest.approx(fn(moved)[0], rel=1e-12)
    assert_unchanged(model, before)


class Quadratic(nn.Module):
    """½ vec(W)ᵀ A vec(W): a 2-D weight, so filter normalisation applies."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        m = torch.randn(12, 12, generator=g)
        self.register_buffer("A", m @ m.T)
        self.W = nn.Parameter(torch.randn(3, 4, generator=g))

    def forward(self):
        w = self.W.flatten()
        return 0.5 * w @ self.A @ w


def test_quadratic_curve_is_the_expected_parabola():
    model = Quadratic()
    d = random_direction(model, torch.Generator().manual_seed(0))[0].flatten()
    w0, A = model.W.detach().flatten().clone(), model.A
    alphas = torch.linspace(-2, 2, 9)
    curve = loss_curve_1d(model, lambda m: m(), [d.reshape(3, 4)], alphas.tolist())
    expected = 0.5 * w0 @ A @ w0 + alphas * (d @ A @ w0) + 0.5 * alphas**2 * (d @ A @ d)
    assert torch.allclose(torch.as_tensor(curve.loss), expected, rtol=1e-12)
    assert torch.isnan(torch.as_tensor(curve.accuracy)).all()
    assert torch.equal(model.W.detach().flatten(), w0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from flatmin.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    torch.set_default_dtype(torch.float32)
    try:
        for method in ("erm", "amp"):
            train(TrainConfig(dataset="spiral", method=method, epochs=1), out=root / method, progress=False)
    finally:
        torch.set_default_dtype(torch.float64)
    return [str(root / m / "checkpoint.pt") for m in ("erm", "amp")]


def test_cli_writes_curves_and_surfaces(checkpoints, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from flatmin.analysis._common import load_runs, split_loss
    from flatmin.cli import main

    args = ["landscape", *checkpoints, "--points", "5", "--max-examples", "60", "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / "landscape_1d.png").stat().st_size > 10_000
    with open(tmp_path / "landscape_1d.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 5 and rows == [{k: str(v) for k, v in r.items()} for r in
                                               json.loads((tmp_path / "landscape_1d.json").read_text())]
    runs = load_runs(checkpoints)
    for run in runs:  # α = 0 is the checkpoint's own loss on the same examples
        row, = [r for r in rows if (r["name"], r["split"], float(r["alpha"])) == (run.name, "test", 0.0)]
        loss, acc = split_loss(run, "test", 60).loss_and_accuracy(run.model)
        assert float(row["loss"]) == pytest.approx(loss, rel=1e-6)
        assert float(row["accuracy"]) == pytest.approx(acc)
    assert main([*args, "--dim", "2", "--points", "3", "--splits", "train"]) == 0
    assert len(list(tmp_path.glob("landscape_2d_*.png"))) == 2
    assert len(json.loads((tmp_path / "landscape_2d.json").read_text())) == 2 * 3 * 3
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["landscape", str(bad), "--out", str(tmp_path)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err

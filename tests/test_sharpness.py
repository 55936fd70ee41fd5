"""Sharpness measures against exact Hessians of tiny models and closed forms of quadratics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatmin.analysis.sharpness import (
    dataset_loss,
    epsilon_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    hvp,
)


@pytest.fixture(autouse=True, scope="module")
def _float64_one_thread():
    """float64 for exact comparisons; one thread, as tiny ops only lose to contention."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


class Quadratic(nn.Module):
    """½θᵀAθ with θ split over two tensors (so the multi-tensor paths are exercised)."""

    def __init__(self, A: torch.Tensor, theta: torch.Tensor | None = None) -> None:
        super().__init__()
        theta = torch.zeros(7) if theta is None else theta
        self.register_buffer("A", A)
        self.a = nn.Parameter(theta[:3].clone())
        self.b = nn.Parameter(theta[3:].reshape(2, 2).clone())

    def forward(self) -> torch.Tensor:
        t = torch.cat([self.a, self.b.flatten()])
        return 0.5 * t @ self.A @ t


def quad_loss(m):
    return m()


def sym(eigs, seed=0):
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(torch.tensor(eigs)) @ q.T


def mlp_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)


def exact_hessian(model, loss_fn):
    """The full Hessian over the flattened parameters, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(vec):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = vec[i:i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(lambda *a: functional_call(model, parts, a))

    return torch.autograd.functional.hessian(f, flat)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_dataset_loss_batches_sum_to_the_full_loss_and_hvp_is_exact():
    model, x, y = mlp_and_data()
    full = dataset_loss(x, y, batch_size=1000)
    batched = dataset_loss(x, y, batch_size=7)
    assert torch.allclose(full(model), batched(model))
    assert torch.allclose(full(model), nn.functional.cross_entropy(model(x), y))
    H = exact_hessian(model, lambda f: nn.functional.cross_entropy(f(x), y))
    v = [torch.randn_like(p) for p in model.parameters()]
    hv = torch.cat([h.flatten() for h in hvp(model, batched, v)])
    assert torch.allclose(hv, H @ torch.cat([t.flatten() for t in v]), atol=1e-10)


def test_top_eigenvalue_matches_exact_hessian_of_a_tiny_mlp():
    model, x, y = mlp_and_data()
    before = snapshot(model)
    H = exact_hessian(model, lambda f: nn.functional.cross_entropy(f(x), y))
    lam = hessian_top_eigenvalue(model, dataset_loss(x, y, batch_size=16), iters=2000, tol=1e-10,
                                 generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.eigvalsh(H).max().item()
    assert lam == pytest.approx(exact, rel=1e-3)
    assert_unchanged(model, before)


def test_top_eigenvalue_is_the_largest_not_the_largest_in_magnitude():
    model = Quadratic(sym([-5.0, -1.0, 0.5, 1.0, 2.0, 2.5, 3.0]))
    lam = hessian_top_eigenvalue(model, quad_loss, iters=3000, tol=1e-12,
                                 generator=torch.Generator().manual_seed(1))
    assert lam == pytest.approx(3.0, rel=1e-3)


def test_hutchinson_trace_is_exact_for_a_diagonal_quadratic():
    model = Quadratic(torch.diag(torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0, 0.5, 7.0])))
    est = hessian_trace(model, quad_loss, samples=5, generator=torch.Generator().manual_seed(0))
    assert est.value == pytest.approx(16.5, abs=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_trace_is_within_a_few_standard_errors_of_the_exact_trace():
    model, x, y = mlp_and_data(seed=3)
    before = snapshot(model)
    exact = torch.trace(exact_hessian(model, lambda f: nn.functional.cross_entropy(f(x), y))).item()
    est = hessian_trace(model, dataset_loss(x, y), samples=200, generator=torch.Generator().manual_seed(0))
    assert 0 < est.stderr < 0.2 * abs(exact)
    assert abs(est.value - exact) < 4 * est.stderr
    assert_unchanged(model, before)


def test_epsilon_sharpness_of_a_quadratic_at_its_minimum_is_half_eps_squared_lambda_max():
    model = Quadratic(sym([0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 4.0], seed=2))
    before = snapshot(model)
    eps = 0.05
    s = epsilon_sharpness(model, quad_loss, eps, steps=50, generator=torch.Generator().manual_seed(0))
    assert s == pytest.approx(0.5 * eps**2 * 4.0, rel=1e-4)
    assert_unchanged(model, before)


def test_epsilon_sharpness_away_from_the_minimum_and_relative_flag():
    A = sym([0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0], seed=4)
    theta = torch.linspace(-1, 1, 7)
    model = Quadratic(A, theta)
    eps, base = 0.1, 0.5 * theta @ A @ theta
    s = epsilon_sharpness(model, quad_loss, eps, steps=100)
    # independent check: the maximum over a dense sample of the sphere can only be lower
    u = torch.randn(20000, 7, generator=torch.Generator().manual_seed(0))
    pts = theta + eps * u / u.norm(dim=1, keepdim=True)
    sampled = (0.5 * ((pts @ A) * pts).sum(1)).max() - base
    assert sampled.item() <= s + 1e-12 and s == pytest.approx(sampled.item(), rel=0.02)
    rel = epsilon_sharpness(model, quad_loss, eps, steps=100, relative=True)
    assert rel == pytest.approx(100 * s / (1 + base.item()), rel=1e-9)
    assert math.isfinite(rel)


def test_cli_tabulates_the_three_measures(tmp_path, capsys):
    from flatmin.analysis._common import load_runs, split_loss
    from flatmin.cli import main
    from flatmin.train import TrainConfig, train

    torch.set_default_dtype(torch.float32)  # a checkpoint as users make them
    try:
        train(TrainConfig(dataset="spiral", method="erm", epochs=1), out=tmp_path / "erm", progress=False)
    finally:
        torch.set_default_dtype(torch.float64)
    ckpt = str(tmp_path / "erm" / "checkpoint.pt")
    args = ["sharpness", ckpt, "--max-examples", "80", "--iters", "15", "--samples", "4", "--steps", "3",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| erm (seed 0) | train | 80 |" in table
    row, = json.loads((tmp_path / "out" / "sharpness.json").read_text())
    assert (tmp_path / "out" / "sharpness.csv").read_text().startswith("name,checkpoint,split,examples")
    assert (tmp_path / "out" / "sharpness.png").stat().st_size > 1000
    run, = load_runs([ckpt])  # the same seed gives the same first random vector: the same λ_max
    lam = hessian_top_eigenvalue(run.model, split_loss(run, "train", 80), iters=15,
                                 generator=torch.Generator().manual_seed(0))
    assert row["lambda_max"] == pytest.approx(lam, rel=1e-6) and row["eps_sharpness"] >= 0
    assert main(["sharpness", ckpt, "--split", "test", "--max-examples", "0"]) == 2

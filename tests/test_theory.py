"""Theorem 1 reached by flatmin's own AMP optimizer; Corollary 2's region against direct numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flatmin.analysis import theory as T


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-D problems: threads only add contention
    yield
    torch.set_num_threads(threads)


G = T.example()
MU, KAPPA, A, C = G["mu"], G["kappa"], G["A"], G["C"]


def test_inverted_gaussian_is_equation_7():
    theta = torch.tensor([0.3, 0.2], dtype=torch.float64)
    d = theta - MU
    expected = C - A * math.exp(-0.5 * float(d @ torch.linalg.inv(KAPPA) @ d))
    assert T.inverted_gaussian(theta, MU, KAPPA, A, C).item() == pytest.approx(expected, rel=1e-14)
    assert T.inverted_gaussian(MU, MU, KAPPA, A, C).item() == C - A
    batch = torch.stack([theta, MU, theta])
    assert T.inverted_gaussian(batch, MU, KAPPA, A, C).shape == (3,)


def test_amp_loss_at_mu_is_the_closed_form_and_is_attained_along_the_narrowest_axis():
    eps = 0.5
    closed = C - A * math.exp(-eps**2 / (2 * 0.5))  # σ² = λ_min(κ) = 0.5
    assert T.gamma_amp_star(KAPPA, A, C, eps) == pytest.approx(closed, rel=1e-14)
    assert T.amp_loss(MU, MU, KAPPA, A, C, eps).item() == pytest.approx(closed, abs=1e-8)
    q = torch.linalg.eigh(KAPPA).eigenvectors[:, 0]  # the narrowest direction
    assert T.inverted_gaussian(MU + eps * q, MU, KAPPA, A, C).item() == pytest.approx(closed, rel=1e-12)


def test_amp_loss_agrees_with_brute_force_in_3d_and_is_minimal_at_mu():
    g = torch.Generator().manual_seed(0)
    kappa = torch.diag(torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64))
    mu, eps = torch.zeros(3, dtype=torch.float64), 0.4
    thetas = 0.3 * torch.randn(20, 3, dtype=torch.float64, generator=g)
    numeric = T.amp_loss(thetas, mu, kappa, 1.0, 0.0, eps, samples=200)
    u = T.sphere(3, 200_000, seed=1)
    brute = T.inverted_gaussian(thetas[:, None] + eps * u, mu, kappa, 1.0, 0.0).max(-1).values
    assert torch.all(numeric >= brute - 1e-12) and torch.allclose(numeric, brute, atol=1e-4)
    assert torch.all(numeric > T.gamma_amp_star(kappa, 1.0, 0.0, eps))


def test_flatmin_amp_reaches_mu_and_the_closed_form_minimum():
    result = T.theorem1(epsilon=0.5, steps=250)
    assert result["theta_error"] < 1e-5
    assert result["amp_loss_found"] == pytest.approx(result["amp_loss_closed_form"], abs=1e-6)
    assert result["amp_loss_closed_form"] > result["erm_minimum"]  # AMP pays for width


def test_operational_region_boundary_matches_direct_comparison_of_gamma_amp_star():
    sigma1 = 0.5
    for c in (0.1, 0.5, 1.0, 2.0):
        eps = math.sqrt(2 * sigma1**2 * c)
        beta = np.linspace(0.02, 0.98, 25)
        # points on both sides of the closed-form boundary r*(β), and far from it
        inside = beta > math.exp(-c)
        bound = np.where(inside, 1 / (1 + np.log(np.where(inside, beta, 1)) / c), 5.0)
        rs = np.concatenate([bound * 0.999, bound * 1.001, np.full_like(beta, 0.5), np.full_like(beta, 8.0)])
        bs = np.tile(beta, 4)
        region = T.operational_region(bs, rs, c)
        for b, r, inside_region in zip(bs, rs, region):
            k1 = torch.eye(2, dtype=torch.float64) * sigma1**2
            g1 = T.gamma_amp_star(k1, 1.0, 0.0, eps)
            g2 = T.gamma_amp_star(k1 * r, float(b), 0.0, eps)
            assert inside_region == (g2 < g1), (c, b, r)
        assert region.any() and not region.all()


def test_cli_writes_figures_and_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    from flatmin.cli import main

    assert main(["theory", "--out", str(tmp_path), "--steps", "150"]) == 0
    assert (tmp_path / "theorem1.png").stat().st_size > 10_000
    assert (tmp_path / "corollary2.png").stat().st_size > 10_000
    numbers = json.loads((tmp_path / "theory.json").read_text())["theorem1"]
    assert numbers["theta_error"] < 1e-3 and abs(numbers["value_error"]) < 1e-4
    assert main(["theory", "--out", str(tmp_path), "--epsilon", "-1"]) == 2

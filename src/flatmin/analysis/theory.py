"""Theorem 1 and Corollary 2 of the AMP paper (§4.1, Figs. 3-4) on inverted Gaussian losses.

γ(θ) = C − A·exp(−½(θ−μ)ᵀκ⁻¹(θ−μ)) (eq. 7), γ_AMP(θ) = max_{‖Δ‖≤ε} γ(θ+Δ) (eq. 10).
Theorem 1: γ_AMP is minimised at θ = μ with value C − A·exp(−ε²/2σ²), σ² = λ_min(κ).
Here flatmin's own `AMP` optimizer minimises γ and must land there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flatmin.optim import AMP
from flatmin.results.plot import pyplot, save_figure


def inverted_gaussian(theta: Tensor, mu: Tensor, kappa: Tensor, A: float, C: float) -> Tensor:
    """γ(θ; μ, κ, A, C), eq. (7); θ may carry leading batch dimensions (…, K)."""
    d = theta - mu
    q = (d * torch.linalg.solve(kappa, d.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return C - A * torch.exp(-0.5 * q)


def gamma_amp_star(kappa: Tensor, A: float, C: float, epsilon: float) -> float:
    """Theorem 1's minimum of the AMP loss: C − A·exp(−ε²/2σ²)."""
    sigma2 = torch.linalg.eigvalsh(kappa).min().item()
    return C - A * math.exp(-epsilon**2 / (2 * sigma2))


def sphere(K: int, samples: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """Unit vectors: an even grid of angles in 2-D, Gaussian draws normalised above."""
    if K == 2:
        t = torch.arange(samples, dtype=dtype) * (2 * math.pi / samples)
        return torch.stack([torch.cos(t), torch.sin(t)], -1)
    u = torch.randn(samples, K, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return u / u.norm(dim=-1, keepdim=True)


def amp_loss(theta: Tensor, mu: Tensor, kappa: Tensor, A: float, C: float, epsilon: float, *,
             samples: int = 720, ascent_steps: int = 50) -> Tensor:
    """γ_AMP(θ) numerically: γ is an increasing function of a convex quadratic, so its maximum
    over the ball lies on the sphere; dense samples of it, then projected ascent from the best."""
    theta = theta.detach()
    u = sphere(theta.shape[-1], samples, theta.dtype)                 # (S, K)
    values = inverted_gaussian(theta.unsqueeze(-2) + epsilon * u, mu, kappa, A, C)  # (…, S)
    best, delta = values.max(-1).values, epsilon * u[values.argmax(-1)]
    for _ in range(ascent_steps):  # Δ ← ε·(Δ + ε·ĝ)/‖·‖: a power iteration on the sphere
        delta = delta.detach().requires_grad_(True)
        g, = torch.autograd.grad(inverted_gaussian(theta + delta, mu, kappa, A, C).sum(), delta)
        step = delta.detach() + epsilon * g / (g.norm(dim=-1, keepdim=True) + 1e-30)
        delta = epsilon * step / step.norm(dim=-1, keepdim=True)
        best = torch.maximum(best, inverted_gaussian(theta + delta, mu, kappa, A, C))
    return best


def minimize_with_amp(mu: Tensor, kappa: Tensor, A: float, C: float, epsilon: float,
                      theta0: Tensor, *, steps: int = 400, lr: float = 0.5, inner_lr: float = 10.0,
                      inner_iter: int = 10) -> Tensor:
    """Run `flatmin.AMP` (SGD base, cosine lr) on γ from θ₀; returns the trajectory (steps+1, K).

    A large ζ and several inner iterations make the inner ascent a power iteration that finds
    the narrowest direction even where ∇γ ≈ 0; the cosine decay settles the kink of γ_AMP at μ.
    """
    theta = torch.nn.Parameter(theta0.clone().to(mu.dtype))
    opt = AMP([theta], lr=lr, epsilon=epsilon, inner_lr=inner_lr, inner_iter=inner_iter)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.base_optimizer, T_max=steps)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = inverted_gaussian(theta, mu, kappa, A, C)
        loss.backward()
        return loss

    path = [theta.detach().clone()]
    for _ in range(steps):
        opt.step(closure)
        sched.step()
        path.append(theta.detach().clone())
    return torch.stack(path)


def operational_region(beta: np.ndarray, r: np.ndarray, eps2_over_2sigma2: float) -> np.ndarray:
    """Corollary 2 (eq. 15): where AMP prefers the shallower (A₂ = βA₁) but wider (σ₂² = rσ₁²)
    minimum: β > exp(−c) and r > 1/(1 + log(β)/c), with c = ε²/2σ₁²."""
    beta, r, c = np.asarray(beta, float), np.asarray(r, float), float(eps2_over_2sigma2)
    inside = beta > math.exp(-c)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = 1.0 / (1.0 + np.log(np.where(inside, beta, 1.0)) / c)
    return inside & (r > bound)


# --- the figures of `flatmin theory` ---------------------------------------------------------------


def example(angle: float = 0.5) -> dict:
    """A 2-D inverted Gaussian whose narrow axis (σ² = 0.5) is rotated off the coordinate axes."""
    c, s = math.cos(angle), math.sin(angle)
    Q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    kappa = Q @ torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64)) @ Q.T
    return dict(mu=torch.tensor([1.0, -0.5], dtype=torch.float64), kappa=kappa, A=1.0, C=1.0)


def theorem1(epsilon: float = 0.5, steps: int = 300, theta0: tuple[float, float] = (-0.5, 0.8)) -> dict:
    """Minimise γ_AMP with flatmin.AMP and compare with Theorem 1's θ = μ and closed form."""
    g = example()
    path = minimize_with_amp(g["mu"], g["kappa"], g["A"], g["C"], epsilon,
                             torch.tensor(theta0, dtype=torch.float64), steps=steps)
    found = path[-1]
    value = amp_loss(found, g["mu"], g["kappa"], g["A"], g["C"], epsilon).item()
    closed = gamma_amp_star(g["kappa"], g["A"], g["C"], epsilon)
    return dict(epsilon=epsilon, steps=steps, mu=g["mu"], kappa=g["kappa"], A=g["A"], C=g["C"],
                theta_found=found, theta_error=(found - g["mu"]).norm().item(),
                amp_loss_found=value, amp_loss_closed_form=closed, value_error=value - closed,
                erm_minimum=g["C"] - g["A"], trajectory=path)


def plot_theorem1(result: dict, path):
    """Fig. 3 style: contours of γ and of γ_AMP, the AMP trajectory and the ε-ball where it ends."""
    plt = pyplot()
    mu, kappa, A, C, eps = (result[k] for k in ("mu", "kappa", "A", "C", "epsilon"))
    xs = torch.linspace(float(mu[0]) - 2, float(mu[0]) + 2, 81, dtype=torch.float64)
    ys = torch.linspace(float(mu[1]) - 2, float(mu[1]) + 2, 81, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (title, z) in zip(axes, [
            ("γ(θ) (ERM loss)", inverted_gaussian(grid, mu, kappa, A, C)),
            (f"γ_AMP(θ), ε = {eps:g}", amp_loss(grid, mu, kappa, A, C, eps, samples=180, ascent_steps=0))]):
        cs = ax.contourf(xs, ys, z, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax)
        traj = result["trajectory"]
        ax.plot(traj[:, 0], traj[:, 1], ".-", color="white", ms=2, lw=0.8, label="AMP trajectory")
        t = torch.linspace(0, 2 * math.pi, 200)
        f = result["theta_found"]
        ax.plot(f[0] + eps * torch.cos(t), f[1] + eps * torch.sin(t), color="red", label="ε-ball at found θ")
        ax.plot(*mu.tolist(), "r+", ms=12, label="μ")
        ax.set(title=title, xlabel="θ₁", ylabel="θ₂", aspect="equal")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Theorem 1: found γ_AMP = {result['amp_loss_found']:.6f}, "
                 f"closed form C − A·exp(−ε²/2σ²) = {result['amp_loss_closed_form']:.6f}")
    return save_figure(fig, path)


def plot_region(path, cs=(0.1, 0.5, 1.0, 2.0)):
    """Fig. 4 (right): the operational region of AMP in the (β, r) plane for several ε²/2σ₁²."""
    plt = pyplot()
    beta = np.linspace(1e-3, 0.999, 500)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c, color in zip(cs, plt.cm.viridis(np.linspace(0, 0.9, len(cs)))):
        b = beta[beta > math.exp(-c)]
        bound = 1.0 / (1.0 + np.log(b) / c)
        ax.fill_between(b, np.minimum(bound, 10), 10, color=color, alpha=0.25)
        ax.plot(b, bound, color=color, label=f"ε²/2σ₁² = {c:g}")
    ax.set(xlim=(0, 1), ylim=(0, 10), xlabel="β = A₂/A₁", ylabel="r = σ₂²/σ₁²",
           title="Operational region of AMP (Corollary 2)")
    ax.legend()
    return save_figure(fig, path)

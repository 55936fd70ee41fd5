"""bSAM — Bayesian SAM (Möllenhoff & Khan, ICLR 2023: "SAM as an optimal relaxation of Bayes").

A Gaussian posterior N(θ, diag(1/(N·s))) is learned with a variational-online-Newton update whose
gradient comes from SAM's perturbed point, the perturbation scaled by the precision s:

    θ_n = θ + e,  e ~ N(0, 1/(N·s))            (before the step's first pass)
    g = ∇f(θ_n);   ε = ρ·g/s                    (the ascent pass)
    g_ε = ∇f(θ + ε)                             (the final pass)
    gm ← β₁·gm + (1−β₁)·(g_ε + δ·θ)
    θ ← θ − lr·gm/s
    s ← β₂·s + (1−β₂)·(√s·|g| + damping + δ)

with N = ``num_data`` (the training-set size), δ = ``weight_decay`` (the authors set δ = prior
precision / N), s starting at ``s_init``. This is the authors' JAX ``build_bsam_optimizer``
(team-approx-bayes/bayesian-sam, ``optim.py``) step for step: θ is updated with the old s, then s.
bSAM brings its own update, so there is no ``base_optimizer``: the internal `VariationalUpdate`
(an ordinary torch Optimizer holding gm, s) is the base, and the rule owns the noise and ascent.
Differences: the authors average g_ε and √s|g| over m = 8 sub-batches each with its own noise and
ε (m-sharpness, ``--batchsplit``); here m = 1 (the whole batch). ``adaptive`` exists in the popular
collection's signature but not in bSAM; only ``adaptive=False`` is accepted. A skipped (non-finite)
step leaves θ, gm and s untouched (the guard's snapshot).

Without a closure: ``opt.begin_step()`` (the noise) before the first forward pass, ``opt.perturb()``
after its backward, ``opt.restore_and_step()`` after the second backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, POSITIVE, POSITIVE_INT
from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer, check_nonnegative
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register
from flatmin.optim.rules._common import check_unit
from flatmin.optim.rules.sam import RHO

NUM_DATA = Hyper("num_data", POSITIVE_INT, None, "bSAM: training-set size N (default: the dataset's)",
                 "bsam_num_data", required=True)
HYPERS = (NUM_DATA, RHO, Hyper("damping", NONNEGATIVE, 0.1, "bSAM: damping added to the precision"),
          Hyper("s_init", POSITIVE, 1.0, "bSAM: the initial precision s"))


class VariationalUpdate(Optimizer):
    """bSAM's update of θ, the gradient mean gm and the precision s (√s|g| left in state["gs"] by BSAM)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
        s_init: float = 1.0,
        foreach: bool = True,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, damping=damping, s_init=s_init)
        )
        self.foreach = foreach

    def init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """gm = 0, s = s_init, gs = 0 the first time p is seen."""
        state = self.state[p]
        if "s" not in state:
            state["s"] = torch.full_like(p, float(group["s_init"]))
            state["gm"] = torch.zeros_like(p)
            state["gs"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One bSAM update from ``.grad`` (= g_ε) and state["gs"]."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            K.bsam_update(
                params,
                [p.grad for p in params],
                [s["gm"] for s in states],
                [s["s"] for s in states],
                [s["gs"] for s in states],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                damping=group["damping"],
                foreach=self.foreach,
            )


class BSAM(PerturbedOptimizer):
    """Bayesian SAM: noisy first pass, precision-scaled ascent, variational update (gm, s: 2× params)."""

    def __init__(
        self,
        params: Iterable,
        num_data: int,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        rho: float = 0.05,
        adaptive: bool = False,
        damping: float = 0.1,
        s_init: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
    ) -> None:
        NUM_DATA.check(num_data)
        if adaptive:
            raise ValueError("adaptive=True is not part of bSAM (the authors' method); use adaptive=False")
        self.validate_group(dict(rho=rho, betas=betas, damping=damping, s_init=s_init))
        check_nonnegative("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        base_kwargs = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            damping=damping,
            s_init=s_init,
            foreach=True if foreach is None else bool(foreach),
        )
        super().__init__(
            params,
            dict(rho=rho),
            VariationalUpdate,
            base_kwargs,
            foreach=foreach,
            check_finite=check_finite,
            nonfinite=nonfinite,
        )
        self.num_data, self.generator = num_data, generator

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ ≥ 0; β₁, β₂ in [0, 1); damping ≥ 0; s_init > 0."""
        check_group(HYPERS, group)
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
            check_unit("betas[0]", betas[0], high_open=True)
            check_unit("betas[1]", betas[1], high_open=True)

    def _states(self, group: dict[str, Any]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """The trainable parameters of a group and their bSAM state (made on first use)."""
        params = [p for p in group["params"] if p.requires_grad]
        return params, [self.base_optimizer.init_state(p, group) for p in params]

    @torch.no_grad()
    def _begin(self) -> None:
        """θ ← θ + e, e ~ N(0, 1/(N·s))."""
        for group in self.param_groups:
            params, states = self._states(group)
            if params:
                self.save_theta(params)
                draws, _ = self.normal_draws(params, self.generator)  # the same noise for any number of ranks
                K.bsam_noise(
                    self.views(params),
                    self.views([s["s"] for s in states]),
                    draws,
                    num_data=self.num_data,
                    foreach=self.foreach,
                )

    def ascent_passes(self) -> int:
        """One ascent pass (at the noisy sample)."""
        return 1

    @torch.no_grad()
    def _ascend(self, grad_scale: Tensor | float | None = None) -> None:
        """gs ← √s·|g|; θ ← θ + ρ·g/s (g unscaled by the loss scale)."""
        inv = 1.0 if grad_scale is None else 1.0 / grad_scale
        for group, params, weights, grads in self.slots():
            states = [self.base_optimizer.init_state(p, group) for p in params]
            K.bsam_ascent(
                weights,
                grads,
                self.thetas_of(params),
                self.views([s["s"] for s in states]),
                self.views([s["gs"] for s in states]),
                rho=group["rho"],
                inv_scale=inv,
                foreach=self.foreach,
            )

    def extra_state(self) -> dict[str, Any]:
        """The noise generator's state (when one was given), so a resumed run draws the same noise."""
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the saved noise stream."""
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


def _build(params: Iterable, base: Any, **kwargs: Any) -> BSAM:
    """bSAM brings its own (Adam-like) update: SGD's momentum defaults do not apply; N is required."""
    if kwargs.get("num_data") is None:
        raise ValueError("bsam needs num_data=N, the size of the training set (its posterior's scale)")
    return BSAM(params, **{k: v for k, v in kwargs.items() if k not in ("momentum", "nesterov")})


def _protocol(cfg: Any) -> dict[str, Any]:
    """bSAM's update from the trainer's protocol: β₁ = momentum, δ = weight decay, lr = lr/(1 − momentum) —
    its gradient mean is an average, not SGD's sum, so this gives SGD's steady step size at s = 1."""
    return dict(lr=cfg.lr / (1 - cfg.momentum), betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


register(RuleInfo(
    "bsam", BSAM, "Bayesian SAM: a variational posterior learned from SAM's perturbed gradient",
    paper="Möllenhoff & Khan, ICLR 2023", code="team-approx-bayes/bayesian-sam", hypers=HYPERS,
    kept="gm, s, √s·g (own update)", own_update=True, make=_build, protocol=_protocol, neutral=None,
    examples=({"num_data": 100, "rho": 0.05, "lr": 0.05},)))

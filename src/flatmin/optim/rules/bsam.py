"""bSAM — Bayesian SAM (Möllenhoff & Khan, ICLR 2023: "SAM as an optimal relaxation of Bayes").

A Gaussian posterior N(θ, diag(1/(N·s))) is learned with a variational-online-Newton update whose
gradient comes from SAM's perturbed point, the perturbation scaled by the precision s:

    θ_n = θ + e,  e ~ N(0, 1/(N·s))            (before the step's first pass)
    g = ∇f(θ_n);   ε = ρ·g/s                    (the ascent pass)
    g_ε = ∇f(θ + ε)                             (the final pass)
    gm ← β₁·gm + (1−β₁)·(g_ε + δ·θ)
    θ ← θ − lr·gm/s
    s ← β₂·s + (1−β₂)·(√s·|g| + damping + δ)

with N = ``num_data`` × ``data_factor`` (the training-set size, counted ``data_factor`` times for its
augmentation: the authors' ``--dafactor``, 4 in their CIFAR runs) and δ = ``prior_precision`` / N
(the authors' ``--priorprec``, 40 on CIFAR), or δ = ``weight_decay`` when no prior precision is
given (the two exclude each other; neither: δ = 1e-4); s starts at ``s_init``. This is the authors'
JAX ``build_bsam_optimizer`` (team-approx-bayes/bayesian-sam, ``optim.py``) step for step: θ is
updated with the old s, then s. bSAM brings its own update, so there is no ``base_optimizer``: the
internal `VariationalUpdate` (an ordinary torch Optimizer holding gm, s) is the base, and the rule
owns the noise and ascent.

At evaluation the authors average the softmax over S = 32 samples of the posterior (``test.py
--testmc 32``, fresh noise for every test batch): `predict` does that (``test_samples``; 0: the
logits at the mean θ), and the trainer evaluates bSAM through it. Their training recipe — lr 0.5,
a linear warm-up over 5 epochs then cosine over the rest (per epoch), β₁ 0.9, β₂ 0.999, ρ 0.01,
prior precision 40, ``--dafactor 4`` — is the trainer's default for ``--method bsam`` (its registry
``recipe`` and `flatmin.train.config`'s presets), each field overridable.

Differences from the authors' code (checked against a float64 loop written from it in
``tests/test_authors_gsam_bsam.py``; their code is GPL-3.0 and JAX, so it is read, not run or copied):
the authors average g_ε and √s|g| over m = 8 sub-batches each with its own noise and ε
(m-sharpness, ``--batchsplit 8``); here m = 1 (the whole batch). Their noise is JAX's PRNG; here
torch's, one draw per tensor in parameter order (the same for any number of ranks). Their batch is
200 and their run 181 epochs (``--epochs 180`` counts from 0); the trainer keeps the dataset's batch
size and epochs. ``adaptive`` exists in the popular collection's signature but not in bSAM; only
``adaptive=False`` is accepted. A skipped (non-finite) step leaves θ, gm and s untouched (the guard's
snapshot).

Without a closure: ``opt.begin_step()`` (the noise) before the first forward pass, ``opt.perturb()``
after its backward, ``opt.restore_and_step()`` after the second backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.checks import COUNT, NONNEGATIVE, POSITIVE, POSITIVE_INT
from flatmin.optim import _kernels as K
from flatmin.optim.base import PerturbedOptimizer, check_nonnegative
from flatmin.optim.registry import Hyper, RuleInfo, check_group, register
from flatmin.optim.rules._common import check_unit
from flatmin.optim.rules.sam import RHO

NUM_DATA = Hyper("num_data", POSITIVE_INT, None, "bSAM: training-set size N (default: the dataset's)",
                 "bsam_num_data", required=True)
HYPERS = (NUM_DATA, RHO, Hyper("damping", NONNEGATIVE, 0.1, "bSAM: damping added to the precision"),
          Hyper("s_init", POSITIVE, 1.0, "bSAM: the initial precision s"),
          Hyper("prior_precision", NONNEGATIVE, None, "bSAM: prior precision δ₀; δ = δ₀/(N·data_factor) "
                "(the authors' --priorprec; None: δ = weight decay)", "bsam_prior_precision", None),
          Hyper("data_factor", POSITIVE, 1.0, "bSAM: N counted this many times for augmentation (the "
                "authors' --dafactor)", "bsam_data_factor", None),
          Hyper("test_samples", COUNT, 32, "bSAM: posterior samples averaged at evaluation (the authors' "
                "--testmc 32; 0: at the mean)", "bsam_test_samples"))
DEFAULT_DECAY = 1e-4  # δ when neither a prior precision nor a weight decay is given


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

    writes_base_state = True  # the ascent leaves √s|g| in the update's state

    def __init__(
        self,
        params: Iterable,
        num_data: int,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        damping: float = 0.1,
        s_init: float = 1.0,
        prior_precision: float | None = None,
        data_factor: float = 1.0,
        test_samples: int = 32,
        *,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        nonfinite: str | None = None,
    ) -> None:
        NUM_DATA.check(num_data)
        if adaptive:
            raise ValueError("adaptive=True is not part of bSAM (the authors' method); use adaptive=False")
        self.validate_group(dict(rho=rho, betas=betas, damping=damping, s_init=s_init,
                                 prior_precision=prior_precision, data_factor=data_factor,
                                 test_samples=test_samples))
        check_nonnegative("lr", lr)
        if prior_precision is not None and weight_decay is not None:
            raise ValueError("prior_precision and weight_decay both set δ (δ = prior_precision/"
                             "(N·data_factor)); give one")
        if prior_precision is not None:
            weight_decay = prior_precision / (num_data * data_factor)
        weight_decay = DEFAULT_DECAY if weight_decay is None else weight_decay
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
        self.data_factor, self.test_samples = data_factor, test_samples

    @property
    def posterior_size(self) -> float:
        """N·data_factor: the data count the posterior's precision is scaled by."""
        return self.num_data * self.data_factor

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
                    num_data=self.posterior_size,
                    foreach=self.foreach,
                )

    @torch.no_grad()
    def predict(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None,
                samples: int | None = None) -> Tensor:
        """The authors' MC predictive: log (1/S)·Σ softmax(model(x) at θ_i), θ_i ~ N(θ, 1/(N·s)), S fresh
        draws (``samples``, default ``test_samples``; 0: ``model(x)`` at the mean). Returned as
        log-probabilities, which are their own logits. θ is put back by copy, bit for bit."""
        samples = self.test_samples if samples is None else samples
        if samples == 0:
            return model(x)
        if self._state.begun:
            raise RuntimeError("BSAM.predict: a step is under way (θ is perturbed); predict between steps")
        params, states = [], []
        for group in self.param_groups:
            p, st = self._states(group)
            params += p
            states += st
        saved = [t.clone() for t in self.views(params)]
        views, precisions = self.views(params), self.views([s["s"] for s in states])
        logps = []
        try:
            for _ in range(samples):
                draws, _ = self.normal_draws(params, generator)
                K.bsam_noise(views, precisions, draws, num_data=self.posterior_size, foreach=self.foreach)
                out = model(x)
                logps.append(torch.log_softmax(out.to(torch.promote_types(out.dtype, torch.float32)), dim=1))
                K.copy_(views, saved, self.foreach)
        finally:
            K.copy_(views, saved, self.foreach)
        return torch.logsumexp(torch.stack(logps), dim=0) - math.log(samples)

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
    """bSAM's update from the trainer's config: lr is bSAM's own step (its recipe: the authors' 0.5), β₁ =
    momentum, δ from the prior precision (else the protocol's weight decay)."""
    decay = cfg.weight_decay if getattr(cfg, "bsam_prior_precision", None) is None else None
    return dict(lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=decay)


# The authors' CIFAR recipe (README, train.py): α = 0.5, 5 warm-up epochs, then cosine.
RECIPE = {"lr": 0.5, "lr_schedule": "cosine", "warmup_epochs": 5}

register(RuleInfo(
    "bsam", BSAM, "Bayesian SAM: a variational posterior learned from SAM's perturbed gradient",
    paper="Möllenhoff & Khan, ICLR 2023", code="team-approx-bayes/bayesian-sam", hypers=HYPERS,
    kept="gm, s, √s·g (own update)", own_update=True, make=_build, protocol=_protocol, recipe=RECIPE,
    neutral=None,
    examples=({"num_data": 100, "rho": 0.05, "lr": 0.05},
              {"num_data": 100, "rho": 0.01, "lr": 0.05, "prior_precision": 4.0, "data_factor": 4.0,
               "weight_decay": None})))

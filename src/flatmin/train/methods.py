"""The methods of Table 1, each a small object the one training loop consults.

A method says three things: which optimizer drives the update (plain SGD, or a perturbation
optimizer from `flatmin.optim`), how a batch is prepared (MixUp mixes, adversarial training
attacks), and what loss is minimised (label smoothing, flooding). The loop has no `if method`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin.errors import UnknownNameError
from flatmin.optim import RMP, SAM, build_amp, frozen_running_stats
from flatmin.train.config import TrainConfig


@dataclass
class Batch:
    """Inputs and what the loss needs: targets, and for MixUp the second targets and λ."""

    x: Tensor
    y: Tensor
    y2: Tensor | None = None
    lam: Tensor | None = None

    def head(self, n: int) -> Batch:
        """The first n examples (sub-batch ascent)."""
        cut = lambda t: t if t is None or t.dim() == 0 else t[:n]  # noqa: E731
        return Batch(self.x[:n], self.y[:n], cut(self.y2), self.lam)


class Method:
    """ERM: plain SGD on the cross-entropy. Other methods override one piece each."""

    name = "erm"
    dropout = False  # build the model with the paper's Dropout baseline

    def build_optimizer(self, params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
        """SGD with the protocol's momentum, Nesterov and weight decay."""
        return torch.optim.SGD(params, **sgd_kwargs(cfg))

    def prepare(self, model: nn.Module, batch: Batch, cfg: TrainConfig, input_range: float) -> Batch:
        """Turn the augmented batch into what is trained on."""
        return batch

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """The training objective on one batch."""
        return F.cross_entropy(logits, batch.y)


def sgd_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The paper's SGD: momentum 0.9, Nesterov, weight decay 1e-4 (all from the config)."""
    return dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=cfg.weight_decay)


class Dropout(Method):
    """§5.1: 10% of the units after each ReLU dropped (the model is built with it)."""

    name, dropout = "dropout", True


class LabelSmoothing(Method):
    """Targets mixed with the uniform distribution (coefficient 0.2)."""

    name = "label_smoothing"

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """Cross-entropy against smoothed targets."""
        return F.cross_entropy(logits, batch.y, label_smoothing=cfg.label_smoothing)


class Flooding(Method):
    """Ishida et al. 2020: |L − b| + b keeps the training loss from going below b (0.02)."""

    name = "flooding"

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """Gradient ascent once the batch loss falls below the flood level."""
        b = cfg.flood_level
        return (F.cross_entropy(logits, batch.y) - b).abs() + b


class MixUp(Method):
    """Zhang et al. 2018: train on λx + (1−λ)x′ with λ ~ Beta(α, α), α = 1, one λ per batch."""

    name = "mixup"

    def prepare(self, model: nn.Module, batch: Batch, cfg: TrainConfig, input_range: float) -> Batch:
        """Mix the batch with a random permutation of itself."""
        x = batch.x
        lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample().to(x.device)
        perm = torch.randperm(len(x), device=x.device)
        return Batch(lam * x + (1 - lam) * x[perm], batch.y, batch.y[perm], lam)

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """The same mixture of the two cross-entropies."""
        return (batch.lam * F.cross_entropy(logits, batch.y)
                + (1 - batch.lam) * F.cross_entropy(logits, batch.y2))


class AdversarialTraining(Method):
    """One-step FGSM (Goodfellow et al. 2015) on the inputs, trained on the adversarial batch.

    "Perturbation size 1 per pixel" (§5.1) is read as one intensity level out of 255: the step is
    ``adv_epsilon/255`` of the input's dynamic range in every input dimension (for normalised
    images that is 1/255/std per channel — here approximated with the normalised range).
    """

    name = "adv_training"

    def prepare(self, model: nn.Module, batch: Batch, cfg: TrainConfig, input_range: float) -> Batch:
        """x ← x + ε·sign(∇ₓL); the attack's forward pass leaves BatchNorm statistics alone."""
        x = batch.x.detach().requires_grad_(True)
        with torch.enable_grad(), frozen_running_stats(model):
            loss = F.cross_entropy(model(x), batch.y)
            (grad,) = torch.autograd.grad(loss, x)
        step = cfg.adv_epsilon / 255.0 * input_range
        return Batch((x + step * grad.sign()).detach(), batch.y)


class RandomPerturbation(Method):
    """RMP (§5.1): a random model perturbation of radius r = 0.1 before each gradient."""

    name = "rmp"

    def build_optimizer(self, params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
        """`flatmin.RMP` around the protocol's SGD."""
        return RMP(params, torch.optim.SGD, radius=cfg.rmp_radius, ball=cfg.ball, **sgd_kwargs(cfg))


class AdversarialModelPerturbation(Method):
    """AMP (Algorithm 1) with ε, ζ, N, the ball and the efficient variant from the config."""

    name = "amp"

    def build_optimizer(self, params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
        """`flatmin.AMP` around the protocol's SGD."""
        return build_amp(params, cfg.amp_variant, reuse_every=cfg.reuse_every,
                         ascent_fraction=cfg.ascent_fraction, epsilon=cfg.epsilon, inner_lr=cfg.inner_lr,
                         inner_iter=cfg.inner_iter, base_optimizer=torch.optim.SGD, ball=cfg.ball,
                         **sgd_kwargs(cfg))


class SharpnessAware(Method):
    """SAM (Foret et al. 2021) with radius ρ."""

    name, adaptive = "sam", False

    def build_optimizer(self, params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
        """`flatmin.SAM` around the protocol's SGD."""
        return SAM(params, torch.optim.SGD, rho=cfg.rho, adaptive=self.adaptive, **sgd_kwargs(cfg))


class AdaptiveSharpnessAware(SharpnessAware):
    """ASAM (Kwon et al. 2021): SAM on the |w|-scaled sphere."""

    name, adaptive = "asam", True


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(), Dropout(), LabelSmoothing(), Flooding(), MixUp(), AdversarialTraining(),
    RandomPerturbation(), AdversarialModelPerturbation(), SharpnessAware(), AdaptiveSharpnessAware(),
)}


def get_method(name: str) -> Method:
    """A method by name; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise UnknownNameError("method", name, list(METHODS))
    return METHODS[name]

"""The methods of Table 1, each a small object the one training loop consults; every perturbation
rule of `flatmin.optim.registry` is one (`RuleMethod`), with no line here per rule.

A method says three things: which optimizer drives the update (plain SGD, or a perturbation
optimizer from `flatmin.optim`), how a batch is prepared (MixUp mixes, adversarial training
attacks), and what loss is minimised (label smoothing, flooding). The loop has no `if method`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin.errors import ConfigError, UnknownNameError
from flatmin.optim import PerturbedOptimizer, frozen_running_stats, registry
from flatmin.optim.driver import split_sizes
from flatmin.optim.registry import RuleInfo
from flatmin.optim.rules.erm import ERM
from flatmin.train.config import TrainConfig, default_nesterov

Predict = Callable[[Tensor], Tensor]  # a batch of inputs -> logits (or log-probabilities)


@dataclass
class Batch:
    """Inputs and what the loss needs: targets, and for MixUp the second targets and λ."""

    x: Tensor
    y: Tensor
    y2: Tensor | None = None
    lam: Tensor | None = None

    def head(self, n: int) -> Batch:
        """The first n examples (sub-batch ascent)."""
        return self.slice(0, n)

    def slice(self, start: int, stop: int) -> Batch:
        """Examples start..stop (λ is one per batch and is kept)."""
        cut = lambda t: t if t is None or t.dim() == 0 else t[start:stop]  # noqa: E731
        return Batch(self.x[start:stop], self.y[start:stop], cut(self.y2), self.lam)

    def take(self, index: Tensor) -> Batch:
        """The examples at ``index`` (ESAM's data selection; a device tensor, so no host sync)."""
        cut = lambda t: t if t is None or t.dim() == 0 else t.index_select(0, index)  # noqa: E731
        return Batch(cut(self.x), cut(self.y), cut(self.y2), self.lam)

    def split(self, k: int) -> list[Batch]:
        """K contiguous micro-batches (gradient accumulation), sizes differing by at most one."""
        if k == 1:
            return [self]
        bounds = [0]
        for size in split_sizes(len(self.x), k):
            bounds.append(bounds[-1] + size)
        return [self.slice(a, b) for a, b in zip(bounds, bounds[1:])]


class Method:
    """ERM: plain SGD on the cross-entropy. Other methods override one piece each."""

    name = "erm"
    dropout = False  # build the model with the paper's Dropout baseline
    fields: tuple[str, ...] = ()  # the config fields this method reads (its hyperparameters)

    def fields_for(self, cfg: TrainConfig) -> tuple[str, ...]:
        """The fields a run of this config reads (a variant may read fewer than the method)."""
        return self.fields

    def build_optimizer(self, params: Iterable, cfg: TrainConfig) -> PerturbedOptimizer:
        """SGD with the protocol's momentum, Nesterov and weight decay, under the step protocol."""
        return ERM(params, SGD, **sgd_kwargs(cfg))

    def unused_params(self, cfg: TrainConfig) -> bool:
        """Whether some parameters get no gradient in a pass (DDP must then look for them)."""
        return False

    def predictor(self, model: nn.Module, opt: Any, cfg: TrainConfig) -> Callable[[], Predict] | None:
        """How evaluation predicts: None, ``model(x)``; else a maker called at the start of each
        evaluation that returns x -> logits (or log-probabilities) for that evaluation."""
        return None

    def prepare(self, model: nn.Module, batch: Batch, cfg: TrainConfig, input_range: float) -> Batch:
        """Turn the augmented batch into what is trained on."""
        return batch

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """The training objective on one batch."""
        return F.cross_entropy(logits, batch.y)


# The trainer's base SGD on torch's multi-tensor kernel, which torch picks by itself only on CUDA: on a CPU
# the same numbers bit for bit (tests/test_train.py) for ~10 % less CPU per run of the default compare.
SGD = functools.partial(torch.optim.SGD, foreach=True)


def sgd_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The paper's SGD: momentum 0.9, Nesterov (MSAM: none, as its authors), weight decay 1e-4 (all from
    the config; an open ``nesterov`` is the method's default)."""
    nesterov = default_nesterov(cfg.method) if cfg.nesterov is None else cfg.nesterov
    return dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov and cfg.momentum > 0,
                weight_decay=cfg.weight_decay)


class Dropout(Method):
    """§5.1: 10% of the units after each ReLU dropped (the model is built with it)."""

    name, dropout, fields = "dropout", True, ("dropout",)


class LabelSmoothing(Method):
    """Targets mixed with the uniform distribution (coefficient 0.2)."""

    name, fields = "label_smoothing", ("label_smoothing",)

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """Cross-entropy against smoothed targets."""
        return F.cross_entropy(logits, batch.y, label_smoothing=cfg.label_smoothing)


class Flooding(Method):
    """Ishida et al. 2020: |L − b| + b keeps the training loss from going below b (0.02)."""

    name, fields = "flooding", ("flood_level",)

    def loss(self, logits: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
        """Gradient ascent once the batch loss falls below the flood level."""
        b = cfg.flood_level
        return (F.cross_entropy(logits, batch.y) - b).abs() + b


class MixUp(Method):
    """Zhang et al. 2018: train on λx + (1−λ)x′ with λ ~ Beta(α, α), α = 1, one λ per batch."""

    name, fields = "mixup", ("mixup_alpha",)

    def prepare(self, model: nn.Module, batch: Batch, cfg: TrainConfig, input_range: float) -> Batch:
        """Mix the batch with a random permutation of itself."""
        x = batch.x
        alpha = cfg.mixup_alpha
        beta = torch.distributions.Beta(alpha, alpha, validate_args=False)  # no host-side checks
        lam = beta.sample().to(x.device)
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

    name, fields = "adv_training", ("adv_epsilon",)

    def prepare(self, model: nn.Module, batch: Batch, cfg: TrainConfig, input_range: float) -> Batch:
        """x ← x + ε·sign(∇ₓL); the attack's forward pass leaves BatchNorm statistics alone."""
        x = batch.x.detach().requires_grad_(True)
        with torch.enable_grad(), frozen_running_stats(model):
            loss = F.cross_entropy(model(x), batch.y)
            (grad,) = torch.autograd.grad(loss, x)
        step = cfg.adv_epsilon / 255.0 * input_range
        return Batch((x + step * grad.sign()).detach(), batch.y)


class RuleMethod(Method):
    """A perturbation rule from `flatmin.optim.registry`, around the protocol's SGD (or its own update):
    its config fields, its optimizer and what it reads from the config all come from its `RuleInfo`."""

    def __init__(self, info: RuleInfo) -> None:
        self.info, self.name, self.fields = info, info.name, info.fields_for()

    def fields_for(self, cfg: TrainConfig) -> tuple[str, ...]:
        """The rule's fields, less those its setting does not read (AMP's reuse_every without reuse)."""
        return self.info.fields_for(cfg.to_dict())

    def kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        """The rule's keywords from the config (only the fields its setting reads)."""
        used = set(self.fields_for(cfg))
        return {h.name: getattr(cfg, h.field) for h in self.info.trainer_hypers if h.field in used}

    def unused_params(self, cfg: TrainConfig) -> bool:
        """The registry says whether this setting leaves tensors without a gradient in a pass."""
        return self.info.unused_params is not None and self.info.unused_params(self.kwargs(cfg))

    def predictor(self, model: nn.Module, opt: Any, cfg: TrainConfig) -> Callable[[], Predict] | None:
        """A rule whose optimizer has ``predict(model, x, generator)`` (bSAM's MC predictive) is evaluated
        through it; its draws are seeded afresh for each evaluation (the same θ gives the same metrics)."""
        predict = getattr(opt, "predict", None)
        if predict is None:
            return None
        device = next(iter(model.parameters())).device

        def start() -> Predict:
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            return lambda x: predict(model, x, generator)
        return start

    def build_optimizer(self, params: Iterable, cfg: TrainConfig) -> PerturbedOptimizer:
        """The rule with the config's values, around SGD with the protocol's momentum and decay."""
        kwargs = self.kwargs(cfg)
        if self.info.from_config is not None:
            kwargs.update(self.info.from_config(cfg))
        if self.info.own_update:  # bSAM: its own update, its step size and decay from the protocol
            return self.info.build(params, None, **kwargs, **self.info.protocol(cfg))
        return self.info.build(params, SGD, **kwargs, **sgd_kwargs(cfg))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(), Dropout(), LabelSmoothing(), Flooding(), MixUp(), AdversarialTraining(),
    *(RuleMethod(info) for name, info in registry.rules().items() if name != "erm"),
)}


def method_fields() -> dict[str, tuple[str, ...]]:
    """Every method's own config fields, by name (what tables, tuning and run keys read)."""
    return {name: m.fields for name, m in METHODS.items()}


def ignored_fields(cfg: TrainConfig, given: Iterable[str]) -> dict[str, list[str]]:
    """Of the ``given`` fields, those that are some method's own but that this run's method (in its
    setting) never reads, each with the methods that do read it: a value set there changes nothing."""
    own = set(get_method(cfg.method).fields_for(cfg))
    readers: dict[str, list[str]] = {}
    for name, m in METHODS.items():
        for f in m.fields:
            readers.setdefault(f, []).append(name)
    return {f: readers[f] for f in given if f in readers and f not in own}


def refuse_unread(configs: list[TrainConfig], given: Iterable[str], where: dict[str, str]) -> None:
    """A method's field set for a set of runs none of whose methods reads it (``compare --methods erm,sam
    --ball global``, a grid's ``epsilon`` with no AMP in it): one message naming the option, the methods
    and who would read it; ``where`` maps a field to how the user wrote it (its flag, a grid key)."""
    for field in given:
        unread = [ignored_fields(c, [field]).get(field) for c in configs]
        if configs and all(r is not None for r in unread):
            methods = list(dict.fromkeys(c.method for c in configs))
            mine = [m for m in methods if m in unread[0]]
            fix = (f"choose the setting of {', '.join(mine)} that reads it" if mine
                   else f"add a method that reads it ({', '.join(unread[0])})")
            raise ConfigError(f"{where.get(field, field)}: no run here reads {field} (methods: "
                              f"{', '.join(methods)}), so the value would change nothing; drop it, or {fix}")


def get_method(name: str) -> Method:
    """A method by name; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise UnknownNameError("method", name, list(METHODS))
    return METHODS[name]

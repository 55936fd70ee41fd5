"""What the flatness analyses share: the loss over a fixed data set and exact θ save/restore."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin.errors import FlatminError
from flatmin.train import load_run

LossFn = Callable[[nn.Module], Tensor]


class DatasetLoss:
    """L(θ) = Σ ℓ(x_i, y_i; θ) / n over fixed tensors, in eval mode (BatchNorm on running stats).

    Calling it gives the whole loss with its graph; ``batches`` gives the per-batch terms (each
    already divided by n) so that Hessian-vector products can be summed batch by batch in
    bounded memory; ``loss_and_accuracy`` is the cheap no-grad evaluation the landscapes use.
    """

    def __init__(self, x: Tensor, y: Tensor, *, batch_size: int = 512,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(f"need matching, non-empty x and y, got {len(x)} and {len(y)}")
        self.x, self.y, self.batch_size, self.transform = x, y, batch_size, transform

    def __len__(self) -> int:
        return len(self.y)

    def _outputs(self, model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits, labels) per batch, on the model's device, in eval mode (given back after)."""
        training, first = model.training, next(model.parameters())
        model.eval()
        try:
            for i in range(0, len(self.y), self.batch_size):
                x = self.x[i:i + self.batch_size].to(first.device)
                x = self.transform(x) if self.transform is not None else x
                x = x.to(first.dtype) if x.is_floating_point() else x
                yield model(x), self.y[i:i + self.batch_size].to(first.device)
        finally:
            model.train(training)

    def batches(self, model: nn.Module) -> Iterator[Tensor]:
        """Summed batch losses over n: they add up to L(θ) exactly."""
        for out, y in self._outputs(model):
            yield F.cross_entropy(out, y, reduction="sum") / len(self.y)

    def __call__(self, model: nn.Module) -> Tensor:
        return sum(self.batches(model))  # type: ignore[return-value]

    @torch.no_grad()
    def loss_and_accuracy(self, model: nn.Module) -> tuple[float, float]:
        """(L(θ), accuracy) without building a graph."""
        loss, correct = 0.0, 0
        for out, y in self._outputs(model):
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum())
        return loss / len(self.y), correct / len(self.y)


def loss_terms(loss_fn: LossFn, model: nn.Module) -> Iterator[Tensor]:
    """A `DatasetLoss` in batches, any other loss function as one term."""
    batches = getattr(loss_fn, "batches", None)
    return batches(model) if batches is not None else iter([loss_fn(model)])


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters the loss is a function of (the Hessian's coordinates)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def preserved(model: nn.Module) -> Iterator[list[Tensor]]:
    """Yield copies of θ and put them back bit for bit afterwards (and the train/eval mode)."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    training = model.training
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.train(training)


@torch.no_grad()
def set_offset(model: nn.Module, theta: Sequence[Tensor], coefs: Sequence[float],
               directions: Sequence[Sequence[Tensor]]) -> None:
    """θ ← θ₀ + Σ_k c_k·d_k, written from the saved θ₀ (no drift from adding and subtracting)."""
    for i, p in enumerate(model.parameters()):
        value = theta[i].clone()
        for c, d in zip(coefs, directions):
            value.add_(d[i], alpha=float(c))
        p.copy_(value)


def limit(x: Tensor, y: Tensor, max_examples: int | None) -> tuple[Tensor, Tensor]:
    """The first N examples (a fixed, reproducible subset)."""
    return (x, y) if max_examples is None else (x[:max_examples], y[:max_examples])


def load_runs(paths: Sequence[str], device: str = "cpu") -> list:
    """Checkpoints as `flatmin.train.Run`s, with labels made unique by their folder if need be."""
    runs = [load_run(p, device=device) for p in paths]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.name} [{r.path.parent.name or r.path.name}]"
    return runs


def split_loss(run, split: str, max_examples: int | None, batch_size: int = 512) -> DatasetLoss:
    """L(θ) of a run over a split of its own data, inputs as at test time (no augmentation)."""
    if split not in ("train", "test"):
        raise FlatminError(f"unknown split {split!r}; valid splits: test, train")
    if max_examples is not None and max_examples < 1:
        raise FlatminError(f"--max-examples must be >= 1, got {max_examples}")
    data = getattr(run.dataset, split)
    x, y = limit(data.x, data.y, max_examples)
    return DatasetLoss(x, y, batch_size=batch_size, transform=lambda b: run.dataset.transform(b, train=False))


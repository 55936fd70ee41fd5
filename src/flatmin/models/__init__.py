"""Model registry: one `create_model` signature for every architecture the experiments use."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from flatmin.errors import UnknownNameError
from flatmin.models.lenet import cnn28, cnn28_small
from flatmin.models.preact_resnet import preactresnet18
from flatmin.models.pyramidnet import pyramidnet110_48, pyramidnet164_270
from flatmin.models.small import cnn1d, mlp
from flatmin.models.user import build_user_model, is_factory_spec
from flatmin.models.vgg import vgg16
from flatmin.models.wide_resnet import wrn28_2, wrn28_10

# name -> builder(num_classes, in_channels, dropout, input_shape, **family-specific keywords)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": preactresnet18,
    "vgg16": vgg16,
    "wrn28_10": wrn28_10,
    "wrn28_2": wrn28_2,
    "pyramidnet164_270": pyramidnet164_270,
    "pyramidnet110_48": pyramidnet110_48,
    "mlp": mlp,
    "cnn1d": cnn1d,
    "cnn28": cnn28,
    "cnn28_small": cnn28_small,
}

_COMMON = ("num_classes", "in_channels", "dropout", "input_shape")

__all__ = ["MODELS", "create_model"]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int | None = None,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
    **kw: object,
) -> nn.Module:
    """Build any registered model by name, so configs and the CLI name models as plain strings.

    `in_channels=None` takes the channels from `input_shape` (per-example shape, no batch dim)
    when it has one, else the family's default (3 for the CIFAR models, 1 for cnn1d).
    `dropout` > 0 puts `nn.Dropout(dropout)` after every ReLU (the paper's Dropout baseline).
    A ``module.path:factory`` name calls the user's factory instead (see `flatmin.models.user`).
    """
    if is_factory_spec(name):
        return build_user_model(name, num_classes, input_shape, float(dropout), **kw)
    if name not in MODELS:
        raise UnknownNameError("model", name, list(MODELS))
    builder = MODELS[name]
    extra = [p for p in inspect.signature(builder).parameters if p not in _COMMON]
    for key in kw:
        if key not in extra:
            accepted = ", ".join(extra) if extra else "none"
            raise ValueError(f"unknown argument {key!r} for model {name!r}; extra arguments: {accepted}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        if not input_shape or min(input_shape) < 1:
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape}")
        if in_channels is None and len(input_shape) >= 2:
            in_channels = input_shape[0]
    if in_channels is not None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        kw["in_channels"] = in_channels
    return builder(num_classes, dropout=float(dropout), input_shape=input_shape, **kw)

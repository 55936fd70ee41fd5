"""The user's own model: ``--model module.path:factory`` (or ``path/to/file.py:factory``).

The factory is called as ``factory(num_classes=K, input_shape=(C, H, W) or (D,) ..., **extra)`` and
must return an ``nn.Module`` mapping a batch of inputs to K logits; ``input_shape`` is one example's
shape, without the batch dimension. ``dropout=p`` is passed only when the dropout method asks for it.
Modules are looked up on sys.path and then in the current directory, as ``python -m`` would.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from torch import nn

from flatmin.errors import FlatminError


def is_factory_spec(name: str) -> bool:
    """``module:function`` rather than a registry name."""
    return ":" in name


def _import(module: str, spec: str) -> ModuleType:
    """A dotted module (sys.path, then the working directory) or a .py file."""
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise FlatminError(f"--model {spec}: no such file {path}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(loaded)
        try:
            loaded.loader.exec_module(mod)
            return mod
        except Exception as err:
            raise _import_failed(spec, str(path), err) from None
    try:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # `flatmin` as a console script does not put the cwd there
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and (module == err.name or module.startswith(err.name + ".")):
            raise FlatminError(f"--model {spec}: no module named {err.name!r} (looked on sys.path and in "
                               f"{os.getcwd()}; set PYTHONPATH or give path/to/file.py:FUNCTION)") from None
        raise _import_failed(spec, module, err) from None
    except Exception as err:
        raise _import_failed(spec, module, err) from None


def _import_failed(spec: str, what: str, err: Exception) -> FlatminError:
    """The user's module itself raised while importing: say which and why."""
    return FlatminError(f"--model {spec}: importing {what} failed: {type(err).__name__}: {err}")


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable that ``module:function`` names; a missing module or attribute is named."""
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise FlatminError(f"--model {spec!r}: expected module.path:function (or file.py:function)")
    mod = _import(module, spec)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
            raise FlatminError(f"--model {spec}: {module} has no attribute {attr!r}; its callables: "
                               f"{', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FlatminError(f"--model {spec}: {attr} is a {type(obj).__name__}, not a function or class")
    return obj


def build_user_model(spec: str, num_classes: int, input_shape: Sequence[int] | None,
                     dropout: float = 0.0, **kw: object) -> nn.Module:
    """Import and call the factory; a failure inside it is reported with the call it was."""
    factory = resolve_factory(spec)
    kwargs: dict[str, object] = {"num_classes": num_classes,
                                 "input_shape": tuple(input_shape) if input_shape is not None else None, **kw}
    if dropout > 0:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "dropout" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise FlatminError(f"--model {spec}: the dropout method needs a factory that takes dropout=")
        kwargs["dropout"] = dropout
    call = f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise FlatminError(f"--model: {call} failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise FlatminError(f"--model: {call} returned {type(model).__name__}, not a torch.nn.Module")
    return model

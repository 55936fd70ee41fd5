"""Option definitions every command shares, with one validated type per kind of value.

A number is checked once, here, whether it comes from the command line (argparse ``type=``), a
grid file or a resumed configuration: finite, of the right kind, in range. `check_out` and
`check_device` are the checks a command makes before any work, so a bad ``--out`` or
``--device`` fails in one line before the first batch rather than with a traceback after it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from flatmin.checks import (  # noqa: F401 (re-exported: the option types)
    COUNT,
    FINITE,
    FRACTION,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SHARE,
    Choice,
    Flag,
    Number,
)
from flatmin.data.registry import canonical_name
from flatmin.errors import ConfigError, FlatminError
from flatmin.optim import registry
from flatmin.train.config import PRECISIONS, TrainConfig
from flatmin.train.methods import METHODS


def check_device(text: str) -> str:
    """A device this machine has; anything else a ConfigError saying what is available."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {text!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {text!r}: flatmin runs on cpu, cuda or mps")
    return text


def device(text: str) -> str:
    """argparse ``type=`` for ``--device``."""
    try:
        return check_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def text(value: str) -> str:
    """A non-empty string (an empty name is never what the user meant)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return value.strip()


def path(value: str) -> Path:
    """A non-empty path."""
    return Path(text(value))


def rule_options() -> dict[str, tuple[str, Any, str]]:
    """The rules' flags, generated from `flatmin.optim.registry` (a shared field's help names its users)."""
    users = registry.field_users()
    out = {}
    for name, h in registry.config_fields().items():
        who = users[name]
        help_ = h.help if len(who) == 1 else f"{h.help} ({', '.join(who)})"
        out[h.flag] = (name, h.rule, help_.replace("%", "%%"))
    return out


# CLI flag -> (config field, type, help). Flags left out keep the config's (or the preset's) value.
OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--dataset": ("dataset", text, "dataset name (mnist1d, spiral, digits, cifar10, cifar100, svhn, gtsrb, "
                  "fashion-mnist, mnist, kmnist) or your files: npz:PATH, folder:PATH, csv:PATH"),
    "--model": ("model", text, "model name (default: the dataset's) or your factory module.path:function"),
    "--method": ("method", text, f"one of {', '.join(METHODS)}"),
    "--epochs": ("epochs", POSITIVE_INT, "training epochs"),
    "--batch-size": ("batch_size", POSITIVE_INT, "global batch size"),
    "--lr": ("lr", POSITIVE, "initial learning rate (divided by 10 at 50%% and 75%% of the epochs)"),
    "--momentum": ("momentum", FRACTION, "SGD momentum (0.9)"),
    "--weight-decay": ("weight_decay", NONNEGATIVE, "weight decay"),
    "--grad-clip": ("grad_clip", POSITIVE, "clip the gradient norm (the authors use 50)"),
    "--accumulate": ("accumulate", POSITIVE_INT, "micro-batches per gradient pass (accumulation; 1)"),
    "--eval-every": ("eval_every", POSITIVE_INT, "evaluate val/test every k epochs and after the last (1)"),
    "--augment": ("augment", text, "none, standard, cutout or autoaugment (image datasets)"),
    "--val-fraction": ("val_fraction", FRACTION, "share of the training set held out (0.1)"),
    "--data-dir": ("data_dir", text, "where the dataset files are (default: the user cache)"),
    **rule_options(),
    "--dropout": ("dropout", FRACTION, "dropout method: share of units dropped (0.1)"),
    "--label-smoothing": ("label_smoothing", FRACTION, "label_smoothing method: coefficient (0.2)"),
    "--flood-level": ("flood_level", NONNEGATIVE, "flooding method: level b (0.02)"),
    "--mixup-alpha": ("mixup_alpha", POSITIVE, "mixup method: Beta(α, α) (1.0)"),
    "--adv-epsilon": ("adv_epsilon", NONNEGATIVE, "adv_training: FGSM step in pixel levels of 255 (1)"),
    "--seed": ("seed", COUNT, "random seed"),
    "--device": ("device", device, "cpu, cuda, cuda:1, ..."),
    "--precision": ("precision", text, f"one of {', '.join(PRECISIONS)}"),
}
# config field -> its rule, for values that do not come from the command line (grid files, resumes).
RULES: dict[str, Any] = {field: typ for field, typ, _ in OPTIONS.values()
                         if isinstance(typ, (Number, Choice, Flag))}
RULES.update(eval_batch_size=POSITIVE_INT, lr_gamma=SHARE)


# Options of the user's own data (flatmin.data.user), passed to the reader as dataset_options.
DATASET_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--train-size": ("train_size", POSITIVE_INT, "train on a seeded random subset of this many examples "
                     "(after the val holdout)"),
    "--image-size": ("image_size", POSITIVE_INT, "folder: data: resize every image to N x N"),
    "--label-column": ("label_column", text, "csv: data: the label column (default: label)"),
    "--layout": ("layout", text, "npz: data: nchw or nhwc for 4-D x (default: inferred)"),
    "--categorical": ("categorical", text, "csv: data: non-numeric columns are an error or onehot"),
}


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The config flags, shared by `train`, `compare`, `grid` and the training analyses."""
    for flag, (_, typ, help_) in {**OPTIONS, **DATASET_OPTIONS}.items():
        if flag not in skip:
            parser.add_argument(flag, type=typ, default=None, help=help_)
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also log every step to log.jsonl and TensorBoard (extra: flatmin[tensorboard])")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--download", action="store_true", default=None,
                        help="download missing dataset files (needs a network)")
    parser.add_argument("--ddp-local-ascent", action="store_true", default=None,
                        help="under torchrun: per-rank ascent gradient (no all-reduce; SAM's m-sharpness)")
    parser.add_argument("--fsdp", action="store_true", default=None,
                        help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) "
                             "instead of replicating them (DDP)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user actually gave on the command line."""
    out = _given(args, OPTIONS)
    if "dataset" in out:
        out["dataset"] = canonical_name(out["dataset"])
    for flag in ("compile", "download", "ddp_local_ascent", "tensorboard", "fsdp"):
        if getattr(args, flag, None):
            out[flag] = True
    if data := _given(args, DATASET_OPTIONS):
        out["dataset_options"] = data
    return out


def _given(args: argparse.Namespace, table: dict[str, tuple[str, Any, str]]) -> dict[str, Any]:
    """{key: value} for the flags of ``table`` given on the command line."""
    values = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, (key, _, _) in table.items()}
    return {k: v for k, v in values.items() if v is not None}


DEFAULTS = TrainConfig().to_dict()
FIELDS = list(DEFAULTS)


def check_field(name: str, value: Any, where: str = "") -> Any:
    """One configuration value from a file (grid, checkpoint): known field, right type, in range."""
    if name not in FIELDS:
        raise ConfigError(f"{where}unknown config field {name!r}; valid fields: {', '.join(FIELDS)}")
    default = DEFAULTS[name]
    if value is None and default is None:
        return value
    if name in RULES:
        return RULES[name].check(value, where + name)
    if name == "device":
        try:
            return check_device(value) if isinstance(value, str) else _wrong(name, value, "a device", where)
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _wrong(name, value, "true or false", where)
    if name == "milestones":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in value)
        return value if ok else _wrong(name, value, "a list of fractions in (0, 1)", where)
    if name == "dataset_options":
        return value if isinstance(value, dict) else _wrong(name, value, "a table", where)
    ok = isinstance(value, str) and value.strip()
    return value if ok else _wrong(name, value, "a non-empty string", where)


def _wrong(name: str, value: Any, what: str, where: str) -> Any:
    raise ConfigError(f"{where}{name} must be {what}, got {value!r}")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every field of a configuration by the CLI's rules, its device included, before any work."""
    for name in FIELDS:
        check_field(name, getattr(cfg, name))
    return cfg


def check_out(folder: str | Path, flag: str = "--out") -> Path:
    """A folder that exists and is writable, or could be created: checked, nothing created."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == folder and not folder.is_dir():
        raise FlatminError(f"{flag} {folder} is a file, not a folder; choose a folder")
    if not probe.is_dir():
        raise FlatminError(f"{flag} {folder}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlatminError(f"{flag} {folder}: no permission to write in {probe}; choose a writable folder")
    return folder


def out_dir(folder: str | Path, flag: str = "--out") -> Path:
    """The output folder, checked and created."""
    folder = check_out(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FlatminError(f"{flag} {folder}: cannot create it ({err.strerror})") from None
    return folder


def check_seeds(value: Any, where: str) -> list[int]:
    """A count (>= 1) or a non-empty list of distinct seeds (>= 0), as seeds."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return value
    raise ConfigError(f"{where} must be a count >= 1 or a list of distinct seeds >= 0, got {value!r}")


def parse_seeds(spec: str, flag: str = "--seeds") -> list[int]:
    """``5`` -> seeds 0..4; ``0,3,7`` -> those seeds."""
    try:
        seeds = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: expected a count (5) or a list (0,3,7)") from None
    return check_seeds(seeds[0] if len(seeds) == 1 and "," not in spec else seeds, f"{flag} {spec!r}:")


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

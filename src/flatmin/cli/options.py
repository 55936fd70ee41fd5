"""Option definitions the commands share: the flag table of the configuration, argparse types.

Only the command line lives here. A number's rule is its config field's (`FIELD_RULES` beside
`TrainConfig`), so a value is checked by one rule whether it comes from a flag (argparse
``type=``), a grid file or a resumed configuration; the checks a command makes before any work
(`check_out`, `check_device`, seeds) are in `flatmin.checks`, below every library that calls them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from flatmin.checks import COUNT, IMAGE_SIZE, NONNEGATIVE, POSITIVE, POSITIVE_INT, THREADS, check_device
from flatmin.data.registry import DATASETS, canonical_name
from flatmin.data.user import UserLoader as USER_DATA
from flatmin.errors import ConfigError, FlatminError
from flatmin.experiments import backends
from flatmin.optim import registry
from flatmin.train.config import DEFAULT_LR_SCHEDULE, FIELD_RULES, PRECISIONS, nesterov_help
from flatmin.train.methods import METHODS


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


def _flag(field: str, help_: str, typ: Any = None) -> tuple[str, Any, str]:
    """(config field, argparse type, help): a number's type is the field's rule in `FIELD_RULES`."""
    return field, typ or FIELD_RULES.get(field, text), help_


def _schedule_help() -> str:
    """--lr-schedule's help with each dataset's default, read from the datasets' own defaults."""
    by: dict[str, list[str]] = {}
    for name, loader in {**DATASETS, "npz:/folder:/csv: (your data)": USER_DATA}.items():
        by.setdefault(loader.defaults.get("lr_schedule", DEFAULT_LR_SCHEDULE), []).append(name)
    default = "; ".join(f"{k} for {', '.join(v)}" for k, v in by.items()) if len(by) > 1 else (
        f"{next(iter(by))} for every dataset")
    return ("learning-rate schedule: step (x --lr-gamma at each of --milestones, the paper's 0.1 at 50%% and "
            f"75%% of the epochs), cosine (from --lr toward 0) or constant; default: {default}")


def _milestones(value: str) -> tuple[float, ...]:
    """``0.5,0.75`` -> fractions of the epochs, each in (0, 1), increasing."""
    try:
        out = tuple(float(v) for v in text(value).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.5,0.75, got {value!r}") from None
    if not all(0 < v < 1 for v in out) or list(out) != sorted(set(out)):
        raise argparse.ArgumentTypeError(f"expected increasing fractions in (0, 1), got {value!r}")
    return out


# The flags of the optimizer rules' own fields, kept in one dict of their own so that the optimizers'
# registry can replace it with flags generated from its list of rules.
def _rule_options() -> dict[str, tuple[str, Any, str]]:
    """The rules' flags, generated from `flatmin.optim.registry` (a shared field's help names its users)."""
    users = registry.field_users()
    out = {}
    for name, h in registry.config_fields().items():
        who = users[name]
        help_ = h.help if len(who) == 1 else f"{h.help} ({', '.join(who)})"
        out[h.flag] = (name, h.rule, help_.replace("%", "%%"))
    return out


RULE_OPTIONS: dict[str, tuple[str, Any, str]] = _rule_options()
# CLI flag -> (config field, type, help). Flags left out keep the config's (or the preset's) value.
OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--dataset": _flag("dataset", "dataset name (mnist1d, spiral, digits, cifar10, cifar100, svhn, gtsrb, "
                       "fashion-mnist, mnist, kmnist) or your files: npz:PATH, folder:PATH, csv:PATH"),
    "--model": _flag("model", "model name (default: the dataset's) or your factory module.path:function"),
    "--method": _flag("method", f"one of {', '.join(METHODS)}"),
    "--epochs": _flag("epochs", "training epochs"),
    "--batch-size": _flag("batch_size", "global batch size"),
    "--lr": _flag("lr", "initial learning rate (then it follows --lr-schedule)"),
    "--lr-schedule": _flag("lr_schedule", _schedule_help()),
    "--warmup-epochs": _flag("warmup_epochs", "linear warm-up epochs before the schedule (0; bsam: its "
                             "authors' 5)"),
    "--milestones": _flag("milestones", "step schedule: fractions of the epochs where the lr is multiplied "
                          "by --lr-gamma (0.5,0.75)", _milestones),
    "--lr-gamma": _flag("lr_gamma", "step schedule: factor at each milestone (0.1)"),
    "--momentum": _flag("momentum", "SGD momentum (0.9)"),
    "--nesterov": _flag("nesterov", nesterov_help()),
    "--weight-decay": _flag("weight_decay", "weight decay"),
    "--grad-clip": _flag("grad_clip", "clip the gradient norm (the authors use 50)"),
    "--accumulate": _flag("accumulate", "micro-batches per gradient pass (accumulation; 1)"),
    "--eval-every": _flag("eval_every", "evaluate val/test every k epochs and after the last (1)"),
    "--augment": _flag("augment", "none, standard, cutout or autoaugment (image datasets)"),
    "--val-fraction": _flag("val_fraction", "share of the training set held out (0.1)"),
    "--data-dir": _flag("data_dir", "where the dataset files are (default: the user cache)"),
    **RULE_OPTIONS,
    "--dropout": _flag("dropout", "dropout method: share of units dropped (0.1)"),
    "--label-smoothing": _flag("label_smoothing", "label_smoothing method: coefficient (0.2)"),
    "--flood-level": _flag("flood_level", "flooding method: level b (0.02)"),
    "--mixup-alpha": _flag("mixup_alpha", "mixup method: Beta(α, α) (1.0)"),
    "--adv-epsilon": _flag("adv_epsilon", "adv_training: FGSM step in pixel levels of 255 (1)"),
    "--seed": _flag("seed", "random seed"),
    "--device": _flag("device", "cpu, cuda, cuda:1, ...", device),
    "--precision": _flag("precision", f"one of {', '.join(PRECISIONS)}"),
}


# Options of the user's own data (flatmin.data.user), passed to the reader as dataset_options.
DATASET_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--train-size": ("train_size", POSITIVE_INT, "train on a seeded random subset of this many examples "
                     "(after the val holdout)"),
    "--image-size": ("image_size", IMAGE_SIZE, "folder: data: resize every image to N x N (N <= 4096)"),
    "--label-column": ("label_column", text, "csv: data: the label column (default: label), class ids 0..K-1 "
                       "or text names (sorted: a name's id is its place; the mapping is in metrics.json)"),
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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every checkpoint analysis takes."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="flatmin checkpoint files")
    parser.add_argument("--max-examples", type=POSITIVE_INT, default=None, help="use the first N examples")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=512, help="evaluation batch size")
    parser.add_argument("--device", type=device, default="cpu", help="torch device, e.g. cuda")


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """`--quiet` of compare and grid: no overall progress bar (it shows on a terminal only anyway)."""
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (runs done, ETA, what trains now; shown on a terminal only)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """The models are tiny: one thread per process beats two fighting over a core."""
    parser.add_argument("--threads", type=THREADS, default=1,
                        help="torch CPU threads (default 1; at most this machine's CPUs)")


def use_threads(n: int) -> None:
    """Apply --threads."""
    if n < 1:
        raise FlatminError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """`--backend` and the Ray options, shared by `compare` and `grid`."""
    parser.add_argument("--backend", default="local", choices=backends.BACKENDS,
                        help="local: a process pool (default); ray: one Ray task per run (extra `ray`)")
    parser.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:10001",
                        help="join this Ray cluster (default: start a local one with --workers CPUs)")
    parser.add_argument("--cpus-per-run", type=POSITIVE, default=None,
                        help="Ray: CPUs per run, also its torch threads (1)")
    parser.add_argument("--gpus-per-run", type=NONNEGATIVE, default=None, help="Ray: GPUs per run (0)")
    parser.add_argument("--max-retries", type=COUNT, default=None,
                        help="Ray: retries of a run whose worker died (3); a run's own error is not retried")


def create_backend(args: argparse.Namespace, workers: int) -> backends.Backend:
    """The backend the command line asks for, connected; call before anything is written."""
    ray = {f: getattr(args, f, None) for f in backends.RAY_OPTIONS}
    if getattr(args, "backend", "local") != "ray" and (given := [k for k, v in ray.items() if v is not None]):
        raise FlatminError(f"{', '.join('--' + f.replace('_', '-') for f in given)}: only with --backend ray")
    return backends.create(getattr(args, "backend", "local"), workers, **ray)

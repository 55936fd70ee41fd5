"""`flatmin train`: one model, one method, the paper's protocol; every default overridable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from flatmin.errors import FlatminError
from flatmin.train.config import PRECISIONS, TrainConfig
from flatmin.train.methods import METHODS

# CLI flag -> (config field, type, help). Flags left out keep the config's (or the preset's) value.
OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--dataset": ("dataset", str, "dataset name (mnist1d, spiral, digits, cifar10, cifar100, svhn, gtsrb, "
                              "fashion-mnist, mnist, kmnist)"),
    "--model": ("model", str, "model name (default: the dataset's)"),
    "--method": ("method", str, f"one of {', '.join(METHODS)}"),
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "global batch size"),
    "--lr": ("lr", float, "initial learning rate (divided by 10 at 50%% and 75%% of the epochs)"),
    "--momentum": ("momentum", float, "SGD momentum (0.9)"),
    "--weight-decay": ("weight_decay", float, "weight decay"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm (the authors use 50)"),
    "--augment": ("augment", str, "none, standard, cutout or autoaugment (image datasets)"),
    "--val-fraction": ("val_fraction", float, "share of the training set held out (0.1)"),
    "--data-dir": ("data_dir", str, "where the dataset files are (default: the user cache)"),
    "--epsilon": ("epsilon", float, "AMP: radius ε of the perturbation ball"),
    "--inner-lr": ("inner_lr", float, "AMP: inner learning rate ζ"),
    "--inner-iter": ("inner_iter", int, "AMP: inner iterations N"),
    "--ball": ("ball", str, "AMP/RMP: global (the paper) or per_tensor (the authors' code)"),
    "--amp-variant": ("amp_variant", str, "AMP: exact, reuse, subbatch or onepass"),
    "--reuse-every": ("reuse_every", int, "AMP reuse variant: recompute the perturbation every k steps"),
    "--ascent-fraction": ("ascent_fraction", float, "AMP subbatch variant: share of the batch for ascent"),
    "--rho": ("rho", float, "SAM/ASAM radius ρ"),
    "--rmp-radius": ("rmp_radius", float, "RMP radius r (0.1)"),
    "--dropout": ("dropout", float, "dropout method: share of units dropped (0.1)"),
    "--label-smoothing": ("label_smoothing", float, "label_smoothing method: coefficient (0.2)"),
    "--flood-level": ("flood_level", float, "flooding method: level b (0.02)"),
    "--mixup-alpha": ("mixup_alpha", float, "mixup method: Beta(α, α) (1.0)"),
    "--adv-epsilon": ("adv_epsilon", float, "adv_training: FGSM step in pixel levels of 255 (1)"),
    "--seed": ("seed", int, "random seed"),
    "--device": ("device", str, "cpu, cuda, cuda:1, ..."),
    "--precision": ("precision", str, f"one of {', '.join(PRECISIONS)}"),
}


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The config flags, shared by `train`, `compare` and `grid` (all default to 'not given')."""
    for flag, (_, typ, help_) in OPTIONS.items():
        if flag not in skip:
            parser.add_argument(flag, type=typ, default=None, help=help_)
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on a seeded random subset of this many examples (after the val holdout)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--download", action="store_true", default=None,
                        help="download missing dataset files (needs a network)")
    parser.add_argument("--ddp-local-ascent", action="store_true", default=None,
                        help="under torchrun: per-rank ascent gradient (no all-reduce; SAM's m-sharpness)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user actually gave on the command line."""
    out = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in OPTIONS.items()
           if getattr(args, flag[2:].replace("-", "_"), None) is not None}
    for flag in ("compile", "download", "ddp_local_ascent"):
        if getattr(args, flag, None):
            out[flag] = True
    if getattr(args, "train_size", None) is not None:  # a data option, not a TrainConfig field
        out["dataset_options"] = {"train_size": args.train_size}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flatmin train` flags."""
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder: log.jsonl, metrics.json, checkpoint.pt")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (small models run fastest on 1)")


def run(args: argparse.Namespace) -> int:
    """Train, print the final metrics as JSON, exit 0; bad input exits 2 with one message."""
    from flatmin.train.loop import train

    if args.threads is not None:
        if args.threads < 1:
            raise FlatminError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    overrides = config_overrides(args)
    if args.resume:
        if args.out is None:
            raise FlatminError("--resume needs --out DIR (the run to continue)")
        cfg = _resumed_config(args.out, overrides)
    else:
        cfg = TrainConfig(**overrides)
    result = train(cfg, args.out, resume=args.resume, progress=False if args.quiet else None)
    if result is not None:
        summary = {split: {k: result[split][k] for k in ("error", "nll", "ece")}
                   for split in ("train", "val", "test") if result.get(split)}
        json.dump({"out": str(args.out) if args.out else None, **summary,
                   "time_s": round(result["time_s"], 2)}, sys.stdout, indent=2)
        print()
    return 0


def _resumed_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration, with any flag the user gave checked against it by `train`."""
    from flatmin.train.checkpoint import CHECKPOINT, load_checkpoint

    if not (out / CHECKPOINT).exists():
        return TrainConfig(**overrides)  # nothing to resume yet: start it
    saved = TrainConfig.from_dict(load_checkpoint(out / CHECKPOINT)["config"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return saved.replace(**{k: v for k, v in overrides.items() if k in fields})

"""`flatmin train`: one model, one method, the paper's protocol; every default overridable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flatmin.checks import THREADS, check_out
from flatmin.cli import options
from flatmin.data.registry import folder_name
from flatmin.errors import FlatminError
from flatmin.train.checkpoint import CHECKPOINT, load_checkpoint
from flatmin.train.config import TrainConfig, check_config
from flatmin.train.loop import train
from flatmin.train.methods import ignored_fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`flatmin train` flags."""
    options.add_config_arguments(parser)
    parser.add_argument("--out", type=options.path, default=None,
                        help="output folder: log.jsonl, metrics.json, checkpoint.pt (default: a new "
                             "runs/<method>_<dataset>_s<seed>_<date-time>, printed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=THREADS, default=None,
                        help="torch CPU threads (small models run fastest on 1; at most this machine's CPUs)")


def run(args: argparse.Namespace) -> int:
    """Train, print the final metrics as JSON, exit 0; bad input exits 2 with one message."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = options.config_overrides(args)
    if args.resume:
        if args.out is None:
            raise FlatminError("--resume needs --out DIR (the run to continue)")
        cfg = _resumed_config(args.out, overrides)
    else:
        cfg = TrainConfig(**overrides)
    check_config(cfg)
    _refuse_ignored(cfg, overrides)
    out = args.out if args.out is not None else default_run_folder(cfg)
    check_out(out)
    if args.out is None and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone writes
        print(f"run folder: {out} (choose another with --out)", file=sys.stderr)
    result = train(cfg, out, resume=args.resume, progress=False if args.quiet else None)
    if result is not None:
        summary = {split: {k: result[split][k] for k in ("error", "nll", "ece")}
                   for split in ("train", "val", "test") if result.get(split)}
        json.dump({"out": str(out), **summary, "time_s": round(result["time_s"], 2)}, sys.stdout, indent=2)
        print()
    return 0


def default_run_folder(cfg: TrainConfig, root: Path = Path("runs")) -> Path:
    """``runs/<method>_<dataset>_s<seed>_<date-time>``: a new folder per run (a second one in the same
    second gets a suffix), so that every run writes its log, metrics and checkpoint somewhere."""
    stem = root / f"{cfg.method}_{folder_name(cfg.dataset)}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return out


def _refuse_ignored(cfg: TrainConfig, overrides: dict[str, Any]) -> None:
    """A method's option given to a method that does not read it (``--method erm --ball global``):
    the run would silently ignore it, so name the method, the option and who reads it."""
    flags = {field: flag for flag, (field, _, _) in options.OPTIONS.items()}
    if ignored := ignored_fields(cfg, [k for k in overrides if k in flags]):
        field, readers = next(iter(ignored.items()))
        fix = (f"choose the setting of {cfg.method} that reads it (see --help)" if cfg.method in readers
               else f"use a method that reads it ({', '.join(readers)})")
        raise FlatminError(f"{flags[field]}: method {cfg.method} does not read {field}, so the value would "
                           f"change nothing; drop it, or {fix}")


def _resumed_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration, with any flag the user gave checked against it by `train`."""
    if not (out / CHECKPOINT).exists():
        return TrainConfig(**overrides)  # nothing to resume yet: start it
    saved = TrainConfig.from_dict(load_checkpoint(out / CHECKPOINT)["config"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return saved.replace(**{k: v for k, v in overrides.items() if k in fields})


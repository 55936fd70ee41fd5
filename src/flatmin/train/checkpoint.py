"""Checkpoints: written atomically, read with ``weights_only=True``, recognisable as flatmin's."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatmin.checks import digest
from flatmin.data import load_dataset
from flatmin.errors import FlatminError, UnknownNameError
from flatmin.models import create_model
from flatmin.train.config import TrainConfig
from flatmin.train.methods import get_method

FORMAT, VERSION = "flatmin-checkpoint", 2  # 2: the payload's digest (1: none, read unverified)
CHECKPOINT = "checkpoint.pt"


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder and rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk: name the file the user will look for
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text variant of `atomic_write_bytes` (logs, metrics.json)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """JSON, atomically, readable."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Tag the payload as flatmin's, with the digest of its content, and write it atomically."""
    tagged = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write_bytes(path, lambda f: _torch_save({**tagged, "digest": digest(tagged)}, f))


def _torch_save(obj: Any, f: Any) -> None:
    """torch.save, but a full disk stays the OSError it is (torch re-raises it as a RuntimeError)."""
    try:
        torch.save(obj, f)
    except RuntimeError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, OSError):
            raise cause from None
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a flatmin checkpoint; anything else is a clear error, never code execution."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FlatminError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise FlatminError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FlatminError(f"{path} is not a flatmin checkpoint (no '{FORMAT}' tag)")
    if payload.get("version") not in (1, VERSION):
        raise FlatminError(f"{path} has checkpoint version {payload.get('version')}; "
                           f"this flatmin reads versions 1 and {VERSION}")
    if payload["version"] >= 2:
        saved = payload.pop("digest", None)
        if saved != digest(payload):
            raise FlatminError(f"{path} is damaged: its content does not match the digest saved with it "
                               "(a changed byte on disk); it was not used. Re-train, or resume from a copy")
    return payload


@dataclass
class Run:
    """A trained model with its data and configuration, ready for analysis."""

    model: nn.Module
    dataset: Any  # flatmin.data.Dataset
    config: TrainConfig
    name: str
    epoch: int
    path: Path


def load_run(path: str | Path, device: str | torch.device = "cpu", *, load_data: bool = True) -> Run:
    """Rebuild the model (eval mode) and its dataset from a checkpoint, for the analysis commands."""

    payload = load_checkpoint(path, map_location=device)
    try:
        cfg = TrainConfig.from_dict(payload["config"])
        method = get_method(cfg.method)
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                          seed=cfg.seed, augment=cfg.augment, **cfg.dataset_options) if load_data else None
        shape = tuple(payload["input_shape"])
        model = create_model(cfg.model, num_classes=payload["num_classes"], in_channels=shape[0],
                             input_shape=shape, dropout=cfg.dropout if method.dropout else 0.0)
        model.load_state_dict(payload["model"])
    except UnknownNameError as err:
        raise FlatminError(f"{path}: {err}") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise FlatminError(f"{path}: checkpoint does not match its configuration ({err})") from None
    model.to(device).eval()
    return Run(model, ds, cfg, f"{cfg.method} (seed {cfg.seed})", int(payload["epoch"]), Path(path))

"""Run folders and what the training-based analyses share.

Reading a run folder (metrics.json, log.jsonl, checkpoint.pt), training a few configurations
into sub-folders (resumable) and plain-text tables: used by radius, spiral, gradnorm,
calibration and cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatmin.errors import FlatminError
from flatmin.models import MODELS
from flatmin.models.user import is_factory_spec
from flatmin.train import METHODS, TrainConfig, train
from flatmin.train.checkpoint import CHECKPOINT, load_checkpoint
from flatmin.train.logging import read_epochs


@dataclass
class RunDir:
    """What a `flatmin train --out DIR` folder holds: its configuration, final metrics and log."""

    path: Path
    config: Any  # flatmin.train.TrainConfig
    metrics: dict[str, Any] | None
    log: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """Method and seed: how the figures name a run."""
        return f"{self.config.method} (seed {self.config.seed})"


def _read_json(path: Path) -> Any:
    """A JSON file, or a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FlatminError(f"{path} is not readable JSON ({err})") from None


def check_names(cfg: Any, path: Path | str) -> None:
    """A run whose model or method this flatmin does not know cannot be analysed."""
    if cfg.model is not None and cfg.model not in MODELS and not is_factory_spec(cfg.model):
        raise FlatminError(f"{path}: unknown model {cfg.model!r}; valid models: {', '.join(sorted(MODELS))}")
    if cfg.method not in METHODS:
        raise FlatminError(f"{path}: unknown method {cfg.method!r}; "
                           f"valid methods: {', '.join(sorted(METHODS))}")


def read_run_dir(path: str | Path) -> RunDir:
    """A flatmin run folder (or a file in one); anything else is a clear FlatminError."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FlatminError(f"no run folder at {path}")
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None
    if metrics is not None:
        if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
            raise FlatminError(f"{path / 'metrics.json'} is not a flatmin metrics file (no 'config')")
        config = metrics["config"]
    elif (path / CHECKPOINT).is_file():
        config = load_checkpoint(path / CHECKPOINT)["config"]
    else:
        raise FlatminError(f"{path} is not a flatmin run folder (no metrics.json or {CHECKPOINT})")
    try:
        cfg = TrainConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise FlatminError(f"{path}: not a flatmin run configuration ({err})") from None
    check_names(cfg, path)
    return RunDir(path, cfg, metrics, read_epochs(path))


def train_runs(configs: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Train each config into OUT/<name>/, resuming what an interrupted call left."""
    results = {}
    for name, cfg in configs.items():
        print(f"training {name}: {cfg.method} on {cfg.dataset} into {out / name}", flush=True)
        results[name] = train(cfg, out / name, resume=True, progress=False)
    return results


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """A fixed-width table on stdout: (key, header, format spec) per column."""
    widths = [max(len(h), 8) for _, h, _ in columns]
    print(" ".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        print(" ".join(f"{format(r[k], spec):>{w}}" for (k, _, spec), w in zip(columns, widths)))


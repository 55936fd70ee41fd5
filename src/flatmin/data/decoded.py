"""What a reader of the user's files returns: decoded splits (shared by npz, image folders, CSV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

SPLITS = ("train", "val", "test")  # val optional


@dataclass
class Arrays:
    """Decoded splits: x as stored (uint8 NCHW images or float32), y as int64 class ids."""

    splits: dict[str, tuple[Tensor, Tensor]]
    classes: list[str] | None = None  # folder names, when the data has them

    def to_payload(self) -> dict[str, Any]:
        """Plain tensors and lists, loadable with weights_only=True."""
        return {"splits": {k: list(v) for k, v in self.splits.items()}, "classes": self.classes}

"""What a reader of the user's files returns: decoded splits (shared by npz, image folders, CSV)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

SPLITS = ("train", "val", "test")  # val optional


@dataclass
class Arrays:
    """Decoded splits: x as stored (uint8 NCHW images or float32), y as int64 class ids."""

    splits: dict[str, tuple[Tensor, Tensor]]
    classes: list[str] | None = None  # class names by id (folder names, CSV text labels), if named
    notes: list[str] = field(default_factory=list)  # warnings of the reader, repeated whenever it is loaded

    def to_payload(self) -> dict[str, Any]:
        """Plain tensors and lists, loadable with weights_only=True."""
        return {"splits": {k: list(v) for k, v in self.splits.items()}, "classes": self.classes,
                "notes": self.notes}

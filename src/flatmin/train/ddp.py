"""Deprecated: the torchrun side moved into `flatmin.train.distributed` (one module, no circle)."""

import warnings

from flatmin.train.distributed import FSDPProcess, TorchrunProcess, shard, shard_model, weighted_allreduce

warnings.warn("flatmin.train.ddp moved to flatmin.train.distributed", DeprecationWarning, stacklevel=2)

__all__ = ["TorchrunProcess", "FSDPProcess", "shard", "shard_model", "weighted_allreduce"]

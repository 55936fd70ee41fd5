"""Perturbations of sharded parameters (FSDP2's ``fully_shard``: parameters are DTensors).

Each rank holds a shard (rows along dim 0) of every parameter, so every norm in a perturbation is
assembled from the ranks' shards: the kernels compute the *local* per-tensor norms and `ShardedNorms`
all-reduces their squares, once per norm — a scalar for a global ball (‖Δ‖² = Σ_ranks Σ_tensors
‖Δ_shard‖²), one value per tensor for the per-tensor ball (each full tensor's norm). Parameters are
never gathered. θ copies and Δ buffers are ``empty_like`` a parameter, so they are DTensors sharded
like it (params/W per rank). The kernels themselves run on the local shards (`local`).

RMP's random direction must not depend on W: `ShardOf` lets every rank draw each *full* tensor's noise
from the same generator (the single-process draw, number for number), take its norm locally (no
communication at all) and keep only its own rows. The price: each rank generates P random numbers per
step instead of P/W, and holds one full tensor's noise at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_sharded(t: Tensor) -> bool:
    """A DTensor parameter (FSDP2). Importing torch.distributed.tensor costs seconds, and no DTensor
    exists until someone has, so this only looks where it is already loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shards, as views: in-place ops on them change the DTensors (plain tensors pass through;
    a list with no DTensor possible is handed back as it is, at no cost to an unsharded step)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return tensors if isinstance(tensors, list) else list(tensors)
    return [t.to_local() if isinstance(t, module.DTensor) else t for t in tensors]


class ShardedNorms:
    """Norms of full tensors from their shards: one all-reduce of squared norms per call."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def total(self, partial: Tensor) -> Tensor:
        """A sum over the shards (an inner product's): one all-reduce."""
        out = partial.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def __call__(self, norms: Tensor, ball: str) -> Tensor:
        """Local per-tensor norms → the full tensors' norms ("per_tensor") or [‖all‖] ("global")."""
        sq = norms.square()
        if ball == "global":
            sq = sq.sum().reshape(1)
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt()


def _mesh_of(tensors: Sequence[Tensor]) -> Any:
    """The one 1-D device mesh every tensor is sharded over along dim 0 (ValueError otherwise)."""
    from torch.distributed.tensor import Shard

    mesh = tensors[0].device_mesh
    for t in tensors:
        if t.device_mesh != mesh or mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
            raise ValueError(
                f"sharded perturbations need every parameter sharded along dim 0 over one 1-D device mesh "
                f"(fully_shard's default); got placements {tuple(t.placements)} on {t.device_mesh}")
    return mesh


def norm_reducer(tensors: Sequence[Tensor]) -> ShardedNorms | None:
    """How to finish a norm over these tensors: None when nothing is sharded."""
    sharded = [t for t in tensors if is_sharded(t)]
    if not sharded:
        return None
    if len(sharded) != len(tensors):
        raise ValueError(f"a parameter group mixes {len(sharded)} sharded (DTensor) and "
                         f"{len(tensors) - len(sharded)} plain parameters; shard all of them (fully_shard "
                         "the root module too) so that one norm covers the whole perturbation")
    return ShardedNorms(_mesh_of(sharded).get_group())


class ShardOf:
    """The full shape of a sharded parameter, and this rank's rows of a full-size tensor."""

    def __init__(self, param: Tensor) -> None:
        self.shape = param.shape
        self.mesh, self.placements = param.device_mesh, param.placements

    def __call__(self, full: Tensor) -> Tensor:
        """This rank's shard of ``full`` (the same split as the parameter's; no communication)."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, self.mesh, self.placements, src_data_rank=None).to_local()


def shards_of(params: Sequence[Tensor]) -> list[ShardOf] | None:
    """`ShardOf` per parameter when they are sharded, None when they are plain tensors."""
    if norm_reducer(params) is None:
        return None
    return [ShardOf(p) for p in params]


class Shards:
    """What the base hands a rule so that its arithmetic on shards is its arithmetic on whole tensors:
    norms and inner products finished over the ranks, random draws that do not depend on W. Found once
    from the parameters (None: nothing is sharded, and every method is the plain computation)."""

    def __init__(self) -> None:
        self._reducer: ShardedNorms | None = None
        self._known = False

    def reset(self) -> None:
        """The parameters changed (a group was added): look again."""
        self._known = False

    def reducer(self, groups: Sequence[dict[str, Any]]) -> ShardedNorms | None:
        """How norms over these groups' parameters are finished (None when nothing is sharded)."""
        if not self._known:
            params = [p for group in groups for p in group["params"]]
            self._reducer, self._known = norm_reducer(params) if params else None, bool(params)
        return self._reducer

    @staticmethod
    def draws(params: Sequence[Tensor], generator: Any, reducer: ShardedNorms | None) -> list[Tensor]:
        """d ~ N(0, I) like each parameter, the same numbers for any W: with shards every rank draws the
        full tensor (the single-process draw, number for number) and keeps its own rows (`ShardOf`).
        Returns the *full* draws; `keep_rows` cuts them."""
        shapes = [p.shape for p in params]
        views = local(list(params))
        return [torch.randn(shape, dtype=v.dtype, device=v.device, generator=generator)
                for v, shape in zip(views, shapes)]

    @staticmethod
    def keep_rows(params: Sequence[Tensor], full: list[Tensor], reducer: ShardedNorms | None) -> list[Tensor]:
        """This rank's rows of full-size tensors (all of them when nothing is sharded)."""
        return full if reducer is None else [ShardOf(p)(f) for p, f in zip(params, full)]


# --- checkpoints: full state on rank 0, any W on load ---------------------------------------------


def full_state(obj: Any, keep: bool = True) -> Any:
    """A state dict with every DTensor gathered into a full CPU tensor (collective: every rank calls it).

    ``keep=False`` (ranks that do not write): each gathered tensor is dropped at once (None in its
    place), so such a rank holds one full tensor at a time, never the whole state.
    """
    if is_sharded(obj):
        full = obj.full_tensor()
        return full.cpu() if keep else None
    if isinstance(obj, dict):
        return {k: full_state(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v, keep) for v in obj)
    return obj


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """A full tensor cut like ``param`` (a DTensor; no communication), or moved beside a plain one."""
    if not is_sharded(param):
        return full.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def shard_optimizer_state(state: dict[str, Any], params: Sequence[Tensor]) -> dict[str, Any]:
    """A full (single-process layout) optimizer state dict, each per-parameter tensor cut like its parameter.

    Covers torch's ``state`` (keyed by parameter index) and the index-keyed dicts of the perturbation
    record (a kept Δ or gradient); tensors of another shape (a step counter) are left as they are.
    """
    def cut(by_index: dict) -> dict:
        out = {}
        for i, v in by_index.items():
            if isinstance(v, dict):
                v = {k: shard_like(t, params[i]) if _same_shape(t, params[i]) else t for k, t in v.items()}
            elif _same_shape(v, params[i]):
                v = shard_like(v, params[i])
            out[i] = v
        return out

    state = dict(state)
    state["state"] = cut(state.get("state", {}))
    if "perturbation" in state:
        state["perturbation"] = {k: cut(v) if _indexed(v) else v for k, v in state["perturbation"].items()}
    return state


def _same_shape(t: Any, param: Tensor) -> bool:
    """A per-parameter tensor (same shape as the full parameter)."""
    return isinstance(t, Tensor) and t.shape == param.shape and t.dim() > 0


def _indexed(v: Any) -> bool:
    """A dict keyed by parameter index (how kept per-parameter buffers are saved)."""
    return isinstance(v, dict) and bool(v) and all(isinstance(k, int) for k in v)

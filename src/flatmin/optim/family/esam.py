"""ESAM — Efficient SAM (Du, Yan, Feng, Zhou, Zhen, Goh & Tan, ICLR 2022): stochastic weight
perturbation (SWP) is here; sharpness-sensitive data selection (SDS) is NOT.

SWP, as in the authors' code (dydjw9/Efficient_SAM, ``ESAM.second_step``): after each update every
parameter tensor independently sits out the next step's ascent pass with probability 1 − β
(``requires_grad`` off: its weight gradient is not computed, which is where the saving comes from),
and the others are perturbed by ε = (ρ/β)·T²g/‖Tg‖, the norm over the tensors that took part. The
final pass computes every gradient again; the first step uses every tensor. β = 1 is SAM exactly.
Tensors are drawn on the host (Python's ``random.Random(seed)``; no device sync), at least one tensor
always takes part (the authors do not guard against none; tiny models would otherwise fail), and
the draw is checkpointed. Between steps the skipped tensors have ``requires_grad=False``: build other
optimizers or check gradients before the first step, or call ``release()`` to switch them back on.
The authors use 1e-7 as the norm guard; here 1e-12 as every flatmin rule (so β = 1 ≡ SAM bit for bit).

SDS (the authors' ``gamma``): the second pass uses only the γ-fraction of the batch whose
per-example loss rose most under ε. That needs per-example losses at θ and at θ+ε *before* the final
pass is run, and the step driver passes a pass only its share of the batch (a head, `batch_fraction`),
not a selection made from another pass's per-example losses; so only ``gamma=1`` (no selection) is
accepted. Under DDP the tensors a rank skips must be the same on every rank (same seed) and the
model must tolerate parameters without gradients in the ascent pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.optim.family._common import SharpnessRule, check_unit


class ESAM(SharpnessRule):
    """SAM with stochastic weight perturbation: each tensor joins the ascent with probability β."""

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, beta: float = 1.0, gamma: float = 1.0, adaptive: bool = False, *,
                 seed: int = 0, foreach: bool | None = None, check_finite: bool = True,
                 nonfinite: str | None = None, **base_kwargs: Any) -> None:
        check_unit("beta", beta, low_open=True)
        check_unit("gamma", gamma, low_open=True)
        if gamma != 1:
            raise ValueError(f"gamma={gamma!r}: ESAM's sharpness-sensitive data selection needs per-example "
                             "losses the step driver does not pass; only gamma=1 (no selection) is available")
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), base_kwargs,
                         foreach=foreach, check_finite=check_finite, nonfinite=nonfinite)
        self.beta, self.gamma = float(beta), float(gamma)
        self._rng = random.Random(seed)
        self._off: list[Tensor] = []  # tensors sitting out the next ascent pass

    def _ascend(self, grad_scale: object = None) -> None:
        """Every tensor back on; ε = (ρ/β)·T²g/‖Tg‖ over the tensors that took part."""
        self.release()
        self.sam_ascend(self.grouped(), scale=1.0 / self.beta)

    def release(self) -> None:
        """Switch ``requires_grad`` back on for the tensors the draw left out."""
        for p in self._off:
            p.requires_grad_(True)
        self._off = []

    def _after_step(self, found: Tensor | None) -> None:
        """Draw the tensors that sit out the next ascent pass (each with probability 1 − β)."""
        self.release()
        if self.beta >= 1:
            return
        live = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        off = [p for p in live if self._rng.random() > self.beta]
        if len(off) == len(live) and off:
            off = off[1:]  # at least one tensor ascends
        for p in off:
            p.requires_grad_(False)
        self._off = off

    def extra_state(self) -> dict[str, Any]:
        """The draw's random state and which tensors sit out."""
        order = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {"rng": self._rng.getstate(), "off": [order[p] for p in self._off]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Continue the same draws."""
        self.release()
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))
        order = [p for g in self.param_groups for p in g["params"]]
        self._off = [order[i] for i in state.get("off", [])]
        for p in self._off:
            p.requires_grad_(False)

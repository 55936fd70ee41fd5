"""GSAM — Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022).

    ε = ρ_t·T²g/‖Tg‖ at θ (SAM's ascent),  g_p = ∇f(θ+ε),
    d = g_p − α·g_⊥,   g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²)·g_p   (the part of g orthogonal to g_p),

and the base optimizer steps from θ with d. Descending along −g_⊥ lowers the surrogate gap
f(θ+ε) − f(θ) without raising f_p. α = 0 is SAM exactly.

The authors' code is the JAX ``gsam_gradient`` (google-research/big_vision,
``trainers/proj/gsam/gsam.py``, Apache-2.0, named official by the paper's first author); the PyTorch
juntang-zhuang/GSAM (MIT) is the author's re-implementation. flatmin follows both where they agree
and offers each one's extra as an option:

- the ρ schedule ρ_t = ρ_min + (ρ − ρ_min)·(lr_t − lr_min)/(lr_max − lr_min), lr_max == lr_min
  giving ρ (both codes; JAX ``rho_max, rho_min, lr_max, lr_min``): with ``rho_min`` given, lr_max is
  each group's learning rate at construction (``group["lr_max"]``) and ρ_t is read from the group's
  current lr at every step, so any torch LR scheduler drives it (the PyTorch code calls
  ``update_rho_t()`` by hand). ``rho_min=None`` (default): constant ρ. The trainer sets
  ``--gsam-rho-min`` and takes lr_min from its own schedule (the step schedule's last value, 0 for
  cosine, lr for constant), as the JAX config sets ``lr_min`` to its schedule's end;
- ``adaptive_perturbation=True``: the JAX code's adaptive form ε = ρ_t·|θ|⊙g/‖g‖ (plain ‖g‖);
  ``adaptive=True`` is the PyTorch code's instead, ASAM's ρ_t·θ²⊙g/‖|θ|⊙g‖ (the two exclude each
  other);
- ``minimize_fp=False``: the JAX code's min(f, h) mode, d = g + α·g_p⊥, g_p⊥ = g_p − ⟨g_p, ĝ⟩ĝ the
  part of g_p orthogonal to g (the default True is the paper's min(f_p, h) above).

Norms and the inner product are over the whole model, unweighted by |θ| (both codes), with the
PyTorch code's guards ``cos = ⟨g,g_p⟩/(‖g_p‖‖g‖ + 1e-12)``, ``g_⊥ = g − cos·‖g‖·g_p/(‖g_p‖ + 1e-12)``
(and the mirror image for ``minimize_fp=False``). Differences: θ is restored by copy (the PyTorch code
subtracts ε); the JAX decomposition divides by ‖g_p‖ (‖g‖) with no 1e-12 guard, which moves d by
~1e-12 relative (``tests/test_authors_gsam_bsam.py`` matches a float64 loop written from the JAX
code to 1e-12, and the PyTorch code run as released, where a checkout is given, to 1e-16); the
ascent's 1e-12 guard is both codes'. The gradient is the step's one batch on
every rank (the authors perturb per worker, unsynchronised); ``ddp_local_ascent`` is flatmin's
option for that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatmin.checks import NONNEGATIVE, Flag
from flatmin.optim import _kernels as K
from flatmin.optim.registry import Hyper, RuleInfo, register
from flatmin.optim.rules._common import SharpnessRule
from flatmin.optim.rules.sam import ADAPTIVE, RHO

HYPERS = (RHO, Hyper("alpha", NONNEGATIVE, 0.4, "GSAM: weight α of the surrogate-gap direction (0.4)",
                     "gsam_alpha"), ADAPTIVE,
          Hyper("rho_min", NONNEGATIVE, None, "GSAM: ρ at the schedule's lowest lr; ρ_t follows the lr "
                "(None: constant ρ; the authors' schedule)", "gsam_rho_min"),
          Hyper("lr_min", NONNEGATIVE, 0.0, "GSAM: the learning rate at which ρ reaches rho_min (the "
                "trainer: its schedule's lowest)"),
          Hyper("adaptive_perturbation", Flag(), False, "GSAM: the official JAX code's adaptive ascent "
                "ρ·|θ|·g/‖g‖", "gsam_adaptive_perturbation"),
          Hyper("minimize_fp", Flag(), True, "GSAM: min(f_p, h), the paper's (false: the JAX code's "
                "min(f, h), d = g + α·(g_p ⟂ g))", "gsam_minimize_fp"))


class GSAM(SharpnessRule):
    """SAM's ascent, then the update g_p − α·(component of g orthogonal to g_p); keeps g (1× params)."""

    hypers = HYPERS

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False, *,
                 rho_min: float | None = None, lr_min: float = 0.0, adaptive_perturbation: bool = False,
                 minimize_fp: bool = True, foreach: bool | None = None, check_finite: bool = True,
                 nonfinite: str | None = None, **base_kwargs: Any) -> None:
        defaults = dict(rho=rho, alpha=alpha, adaptive=adaptive, rho_min=rho_min, lr_min=lr_min,
                        adaptive_perturbation=adaptive_perturbation, minimize_fp=minimize_fp)
        super().__init__(params, base_optimizer, defaults, base_kwargs, foreach=foreach,
                         check_finite=check_finite, nonfinite=nonfinite)
        for group in self.param_groups:
            self._record_lr_max(group)

    def validate_group(self, group: dict[str, Any]) -> None:
        """ρ, α ≥ 0; ρ_min in [0, ρ]; lr_min ≥ 0; one adaptive form at most."""
        super().validate_group(group)
        if group.get("adaptive") and group.get("adaptive_perturbation"):
            raise ValueError("adaptive (ASAM's θ²·g/‖|θ|·g‖, the PyTorch code's) and adaptive_perturbation "
                             "(|θ|·g/‖g‖, the JAX code's) exclude each other; choose one")
        if group.get("rho_min") is not None:
            if group["rho_min"] > group["rho"]:
                raise ValueError(f"rho_min must be <= rho, got rho_min={group['rho_min']!r} > "
                                 f"rho={group['rho']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A new group records its learning rate as lr_max too."""
        super().add_param_group(param_group)
        self._record_lr_max(self.param_groups[-1])

    @staticmethod
    def _record_lr_max(group: dict[str, Any]) -> None:
        """lr_max: the group's learning rate when it joined (unless given)."""
        if group.get("lr_max") is None and group.get("lr") is not None:
            group["lr_max"] = float(group["lr"])

    def radius(self, group: dict[str, Any]) -> float | Tensor:
        """ρ, or ρ_t proportional to the learning rate between (lr_min, ρ_min) and (lr_max, ρ)."""
        lr_max = group.get("lr_max")
        if lr_max is None:
            return group["rho"]
        return rho_at(group["lr"], group["rho"], group["rho_min"], lr_max, group["lr_min"])

    def _direction(self, ratio: Tensor | float | None) -> None:
        """.grad ← g_p − α·g_⊥ = (1 + α·c)·g_p − α·g,  c = cos·‖g‖/(‖g_p‖ + 1e-12); with
        ``minimize_fp=False``: g + α·(g_p − c'·g) = α·g_p + (1 − α·c')·g,  c' = cos·‖g_p‖/(‖g‖ + 1e-12)."""
        slots = self.slots_with_kept()
        if not slots:
            return
        new = [g for s in slots for g in s.grads]
        old = self.kept_of([p for s in slots for p in s.params])
        self.to_final_units(old, ratio)
        inner = self.dot(old, new)
        new_norm, old_norm = self.global_norm(new), self.global_norm(old)
        cos = inner / (new_norm * old_norm + K.TINY)
        c = cos * old_norm / (new_norm + K.TINY)
        c_clean = cos * new_norm / (old_norm + K.TINY)
        for s in slots:
            alpha = s.group["alpha"]
            if s.group.get("minimize_fp", True):
                K.axpby_(s.grads, self.kept_of(s.params), 1 + alpha * c, -alpha, self.foreach)
            else:
                K.axpby_(s.grads, self.kept_of(s.params), alpha, 1 - alpha * c_clean, self.foreach)


def rho_at(lr: float, rho: float, rho_min: float | None, lr_max: float, lr_min: float = 0.0) -> float:
    """The authors' ρ_t for a learning rate: ρ_min + (ρ − ρ_min)·(lr − lr_min)/(lr_max − lr_min), ρ when
    rho_min is None or lr_max ≤ lr_min (what `GSAM` reads each step; for a rule without the schedule,
    set ``group["rho"] = rho_at(group["lr"], ...)`` after each scheduler step)."""
    if rho_min is None or not lr_max > lr_min:
        return rho
    return rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def _from_config(cfg: Any) -> dict[str, Any]:
    """The trainer's lr_min: the lowest learning rate of its schedule (the JAX config's ``lr_min``)."""
    return {"lr_min": cfg.lr_end()}


register(RuleInfo(
    "gsam", GSAM, "surrogate-gap guided SAM: SAM's gradient minus α·(the part of g orthogonal to it)",
    paper="Zhuang et al., ICLR 2022", code="google-research/big_vision (proj/gsam); juntang-zhuang/GSAM",
    hypers=HYPERS, kept="g",
    from_config=_from_config, neutral={"rho": 0.0, "alpha": 0.0, "rho_min": None},
    examples=({"rho": 0.05, "alpha": 0.4}, {"rho": 0.05, "rho_min": 0.01},
              {"rho": 0.05, "alpha": 0.4, "adaptive_perturbation": True, "minimize_fp": False})))

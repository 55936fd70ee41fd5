"""What every perturbation method shares: wrap a base optimizer, keep θ, restore it bit for bit.

A method is a *perturbation rule*: how many ascent passes a step makes (`ascent_passes`), what
an ascent pass does with its gradient (`_ascend`), what happens before any gradient (`_begin`:
RMP's random draw, a reused Δ), how the final gradient becomes the update's direction
(`_direction`) and what happens after the update (`_after_step`: a kept gradient). The pass order
itself lives once, in `flatmin.optim.driver`. `PerturbedOptimizer` is thin: it composes the parts
around a rule —

- `flatmin.optim.theta`: θ's copies and buffers kept across steps, keyed by parameter;
- `flatmin.optim.protocol`: the step as a state machine that refuses misuse
  (``begin_step() → perturb() × ascent_passes() → restore_and_step()``);
- `flatmin.optim.splits`: m-sharpness, the sub-batches' final gradients summed;
- `flatmin.optim.nonfinite`: the device-side guard (a skipped step changes nothing);
- `flatmin.optim.sharded`: rules see local tensors and norms already finished across ranks, so no
  rule knows about FSDP2 —

and writes SAM's normalised ascent ρ·T²d/‖Td‖ once (`sam_ascend`) for SAM, its family and MSAM.
The wrapper owns the parameter groups *jointly* with the base optimizer (the same dicts), so LR
schedulers, ``zero_grad`` and per-group hyperparameters act on both; `state_dict` is the base
optimizer's plus, under ``"perturbation"``, the method's kind and what it keeps between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.optim import _kernels as K
from flatmin.optim import driver
from flatmin.optim.nonfinite import StepGuard, check_policy, host_decides, supports_found_inf
from flatmin.optim.protocol import StepState
from flatmin.optim.sharded import Shards, local
from flatmin.optim.splits import Splits
from flatmin.optim.theta import Theta, finite_copy_, kept_buffer, param_order


def check_nonnegative(name: str, value: Any) -> None:
    """Reject negative or non-finite hyperparameters with a message naming the argument."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


class Slot(NamedTuple):
    """A parameter group as a rule computes with it: the parameters themselves (keys of kept buffers
    and optimizer state) beside the local tensors the arithmetic runs on."""

    group: dict[str, Any]  # the group's hyperparameters
    params: list[Tensor]  # the parameters: keys, never computed on
    weights: list[Tensor]  # their values (under FSDP2: this rank's shards, as views)
    grads: list[Tensor]  # their gradients — or the direction the rule ascends along — likewise local


def sam_parts(s: Slot) -> list[tuple[list[Tensor], list[Tensor], bool, float]]:
    """A slot's tensors as SAM's ascent scales them: (weights, directions, adaptive, η) per part. One part
    (T = |θ| where the group is ``adaptive``, else I) unless an adaptive group says ``weights_only`` (ASAM as
    its authors: T = |θ| + η on the weight tensors, ≥ 2 dimensions, and I on biases and other 1-D tensors)."""
    adaptive, eta = s.group.get("adaptive", False), float(s.group.get("eta", 0.0))
    if not (adaptive and s.group.get("weights_only", False)):
        return [(s.weights, s.grads, adaptive, eta)]
    scaled = [p.ndim > 1 for p in s.params]  # the parameters' own shape (a shard's may differ)
    out = []
    for flag in (True, False):
        idx = [i for i, keep in enumerate(scaled) if keep == flag]
        if idx:
            out.append(([s.weights[i] for i in idx], [s.grads[i] for i in idx], flag, eta if flag else 0.0))
    return out


class PerturbedOptimizer(Optimizer):
    """Base of the perturbation rules; subclasses define `ascent_passes` and `_ascend` (or `_begin`).

    ``nonfinite``: what a step with a NaN/±inf loss or gradient does — it is always skipped on the
    device (θ and every optimizer state untouched, no host sync) and counted; ``"raise"`` (default)
    then raises `flatmin.errors.NonFiniteLossError` at the next `poll()`, ``"skip"`` only counts,
    ``"off"`` checks nothing. ``check_finite=False`` is the older spelling of ``"off"``. A loss
    scaler's overflow is skipped too, counted apart (`overflow_steps`) and never raised.
    """

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        base_optimizer: Callable[..., Optimizer],
        base_kwargs: dict[str, Any],
        *,
        foreach: bool | None,
        check_finite: bool = True,
        nonfinite: str | None = None,
    ) -> None:
        super().__init__(params, defaults)
        if not callable(base_optimizer):
            raise ValueError(f"base_optimizer must be an optimizer class, got {base_optimizer!r}")
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.foreach = True if foreach is None else bool(foreach)
        self.guard = StepGuard(check_policy(nonfinite or ("raise" if check_finite else "off")))
        self._theta = Theta(self.foreach)  # θ while perturbed; buffers reused across steps
        self._state = StepState()
        self._splits = Splits(self.foreach)
        self._shards = Shards()
        self._ascent_scale: Tensor | float | None = None  # the loss scale of this step's ascent gradients
        self._scaled = False  # the last update was under a loss scaler (its overflows skip even under "off")

    # -- parameter groups ----------------------------------------------------------------------

    def validate_group(self, group: dict[str, Any]) -> None:
        """Subclasses check their per-group hyperparameters here."""

    def bind_model(self, model: nn.Module) -> None:
        """What a rule learns from the model its parameters belong to (Flat-LoRA: its LoRA layers);
        `create_optimizer` and the Hugging Face `PerturbedTrainer` call it. Default: nothing."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapper and the base optimizer at once (they share the dicts)."""
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            self.validate_group(self.param_groups[-1])
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.validate_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._shards.reset()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients to None without torch's per-call profiler scope: a step clears them 2–4 times, and on a
        small model on a CPU that scope cost about 3 % of a run (set_to_none=False: torch's own)."""
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @staticmethod
    def params_with_grad(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters that received a gradient this pass (frozen ones are left alone)."""
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    # -- what a rule computes with: local tensors, finished norms --------------------------------

    def slot(self, group: dict[str, Any], params: list[Tensor], directions: list[Tensor]) -> Slot:
        """These parameters of a group, with ``directions`` (gradients, a momentum) to compute with."""
        return Slot(group, params, local(params), local(directions))

    def slots(self) -> list[Slot]:
        """Every group with a gradient this pass, with its gradients."""
        out = []
        for group in self.param_groups:
            params, grads = self.params_with_grad(group)
            if params:
                out.append(self.slot(group, params, grads))
        return out

    def views(self, tensors: list[Tensor]) -> list[Tensor]:
        """The tensors a rule computes on for these (optimizer state it reads, say): in-place ops on
        them change the originals."""
        return local(tensors)

    def kept(self, store: dict[Tensor, Tensor], params: list[Tensor], zero: bool = False) -> list[Tensor]:
        """``store``'s buffers for these parameters (made like them on first use, zeros if ``zero``),
        to compute with."""
        return local([kept_buffer(store, p, zero) for p in params])

    @property
    def reduce_norms(self) -> K.NormReduce | None:
        """How the per-tensor norms a kernel takes of local tensors become the whole tensors' norms
        (None: they already are)."""
        return self._shards.reducer(self.param_groups)

    def finish_norm(self, norm: Tensor) -> Tensor:
        """A norm over local tensors → the norm over the whole tensors (one all-reduce when sharded)."""
        reduce = self.reduce_norms
        return norm if reduce is None else reduce(norm.reshape(1), "global")[0]

    def global_norm(self, tensors: list[Tensor]) -> Tensor:
        """‖·‖ over a list of (local) tensors as one vector, over the whole tensors."""
        return self.finish_norm(torch.linalg.vector_norm(K.norms(tensors, self.foreach)))

    def dot(self, a: list[Tensor], b: list[Tensor]) -> Tensor:
        """Σ_i ⟨a_i, b_i⟩ over (local) tensors, over the whole tensors."""
        partial = K.dot(a, b, self.foreach)
        reduce = self.reduce_norms
        return partial if reduce is None else reduce.total(partial)

    def normal_draws(self, params: list[Tensor], generator: torch.Generator | None,
                     with_norms: bool = False) -> tuple[list[Tensor], Tensor | None]:
        """d ~ N(0, I) like each parameter, to compute with, and (``with_norms``) each whole draw's norm —
        the same numbers for any number of ranks (each draws the whole tensor and keeps its rows)."""
        reduce = self.reduce_norms
        full = self._shards.draws(params, generator, reduce)
        norms = K.norms(full, self.foreach) if with_norms else None
        return self._shards.keep_rows(params, full, reduce), norms

    def radius(self, group: dict[str, Any]) -> float | Tensor:
        """SAM's ρ for a group this step (GSAM may schedule it)."""
        return group["rho"]

    def sam_ascend(self, slots: list[Slot], scale: float | Tensor = 1.0, consume: bool = True,
                   save: bool = True) -> None:
        """θ ← θ + scale·ρ·T²d/‖Td‖ with ONE norm over every group (ρ per group, T = |θ| + η where the
        group is ``adaptive``, else I; a group with ``adaptive_perturbation``: e·|θ|, GSAM's official form);
        θ is saved first (``save=False``: a further ascent from an already perturbed point, θ kept from
        the first). ``consume``: e is built in d's storage."""
        slots = [s for s in slots if s.params]
        if not slots:
            return
        parts = [sam_parts(s) for s in slots]
        norms = [K.sam_norm(w, g, adaptive, self.foreach, eta)
                 for part in parts for w, g, adaptive, eta in part]
        norm = self.finish_norm(torch.linalg.vector_norm(torch.stack(norms)))
        for s, part in zip(slots, parts):
            if save:
                self.save_theta(s.params)
            for w, g, adaptive, eta in part:
                K.sam_ascent(w, g, scale=scale * self.radius(s.group) / (norm + K.TINY), adaptive=adaptive,
                             inplace=consume, foreach=self.foreach, eta=eta,
                             by_weight=s.group.get("adaptive_perturbation", False))

    # -- θ kept exactly --------------------------------------------------------------------------

    @property
    def perturbed(self) -> bool:
        """True between a perturbation and the matching `restore()`."""
        return bool(self._theta)

    def save_theta(self, params: list[Tensor]) -> None:
        """Copy θ into buffers kept across steps, so that restore is a copy, not θ+Δ−Δ."""
        self._theta.save(params)

    def thetas_of(self, params: list[Tensor]) -> list[Tensor]:
        """The saved θ of already-saved parameters, to compute with."""
        return self._theta.of(params)

    @torch.no_grad()
    def restore(self) -> None:
        """Abandon the step: θ and what the rule keeps across steps back bit for bit; harmless when
        nothing is under way."""
        if self._state.begun:
            self.guard.keep(self.carried_state(), None)
        self._end_step()

    def _end_step(self) -> None:
        """θ back from its copies; no step under way any more."""
        self._theta.put_back()
        self._state.end()
        self._splits.done = 0
        self._ascent_scale = None

    def perturbation_norm(self) -> Tensor:
        """‖Δ‖ = ‖(θ+Δ) − θ‖ over what is perturbed now (0 when nothing is): Theorem 2's radius."""
        pairs = self._theta.pairs()
        if not pairs:
            return torch.zeros((), device=self._device())
        diffs = torch._foreach_sub(local(list(pairs)), local(list(pairs.values())))
        return self.finish_norm(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)).float()))

    def held_buffers(self) -> list[Tensor]:
        """Every buffer kept across steps: θ copies, the guard's snapshots; subclasses add Δ."""
        return self._theta.buffers() + self._splits.buffers() + self.guard.buffers()

    # -- the step's state (kept readable under the names rules and tests use) ----------------------

    @property
    def _begun(self) -> bool:
        return self._state.begun

    @property
    def _ascents(self) -> int:
        return self._state.ascents

    # -- the rule (what subclasses define) ---------------------------------------------------------

    # A rule whose perturbation does not read its ascent gradient (RWP: ε is random, g only enters the
    # mix) sets this, so the base checks that gradient itself; in every other rule a NaN/±inf in g moves
    # θ+Δ and so reaches the final gradient, which is checked anyway (no extra kernel on their steps).
    ascent_unread: bool = False
    # A rule that writes its base optimizer's state during the step (bSAM leaves √s|g| there) sets this,
    # so that a skipped step puts that state back on the CPU too, where a bad update is otherwise not taken.
    writes_base_state: bool = False

    def ascent_passes(self) -> int:
        """How many gradient passes feed `perturb` before the final pass of this step."""
        raise NotImplementedError

    def _begin(self) -> None:
        """Perturb before any gradient is taken (RMP, reused Δ); default: nothing."""

    def _ascend(self, grad_scale: Tensor | float | None) -> None:
        """One ascent update from the current gradients."""
        raise NotImplementedError

    def _direction(self, ratio: Tensor | float | None) -> None:
        """Rewrite ``.grad`` (θ+Δ not yet restored, the verdict taken) into the update direction; default:
        the final gradient itself. ``ratio``: what a gradient kept from an ascent pass is multiplied by to
        be in the final gradient's units (None: it already is)."""

    def carried_state(self) -> list[Tensor]:
        """What this step may change that the next steps read (a kept Δ, an EMA): put back bit for bit
        when the step is skipped or abandoned. The list must be the same at the step's start and end."""
        return []

    def _after_step(self, found: Tensor | None) -> None:
        """After the update (``found``: the device flag of a skipped step, None if unchecked)."""

    def batch_fraction(self, ascent: bool) -> float:
        """The share of the batch a pass uses (sub-batch ascent rules lower it for ascent passes)."""
        return 1.0

    def ascent_splits(self) -> int:
        """Sub-batches with an ascent of their own per step (m-sharpness; 1: the whole batch)."""
        return 1

    def select_share(self) -> float:
        """The share of the batch the final pass keeps (ESAM's data selection; 1: all of it)."""
        return 1.0

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """Indices of the examples the final pass uses, from per-example losses at θ and θ+Δ."""
        return torch.arange(loss_before.numel(), device=loss_before.device)

    @property
    def ascent_fraction(self) -> float:
        """The share of the batch the ascent passes use (1: all of it; sub-batch rules set it)."""
        return self.batch_fraction(True)

    def ascent_size(self, batch_size: int) -> int:
        """How many examples of a batch an ascent pass uses: what ``closure(ascent=True)`` slices."""
        return driver.head_size(batch_size, self.batch_fraction(True))

    # -- the step protocol (`protocol.StepState` checks each transition) ---------------------------

    def begin_step(self) -> None:
        """Start a step: the rule's perturbation before any gradient, if it has one."""
        self._state.begin(type(self).__name__)
        self.guard.begin()
        self._begin()
        if self.guard.policy != "off" or self._scaled:  # what a skipped step must leave as it was
            self.guard.hold(self.base_optimizer, self.carried_state(), self.writes_base_state)

    @torch.no_grad()
    def perturb(self, grad_scale: Tensor | float | None = None) -> None:
        """One ascent update from the current gradients (``grad_scale``: a loss scale to divide out)."""
        began_here = not self._state.begun
        if began_here:
            self.begin_step()
        try:
            self._state.can_ascend(type(self).__name__, self.ascent_passes())
        except RuntimeError:
            if began_here:  # a refused call leaves no step behind
                self.restore()
            raise
        self._ascent_scale = grad_scale
        if grad_scale is not None:  # a scaled gradient: did it overflow? (an overflow, not a failure)
            grads = [p.grad for p in param_order(self.param_groups) if p.grad is not None]
            self.guard.ascent(local(grads), self._state.passes, self._device())
        elif self.ascent_unread:  # a NaN here would not reach the final gradient: check it now
            grads = [p.grad for p in param_order(self.param_groups) if p.grad is not None]
            self.guard.unscaled_ascent(local(grads), self._device())
        self._ascend(grad_scale)
        self._state.ascended()

    @torch.no_grad()
    def next_split(self) -> None:
        """m-sharpness: put the finished sub-batch's final gradient aside, θ back, the next one ascends."""
        self._state.next_split(type(self).__name__, self.ascent_passes())
        self._theta.put_back()
        self._splits.add(self.param_groups)
        self.zero_grad(set_to_none=True)

    def fold_splits(self) -> None:
        """The mean of the sub-batches' final gradients into ``.grad`` (the last one is there already);
        `restore_and_step` does it, a framework that unscales first calls it after the last backward."""
        self._splits.fold(self.param_groups)

    @torch.no_grad()
    def restore_and_step(self, step: Callable[[], Any] | None = None, *, losses: Iterable[Any] = (),
                         scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None,
                         reduce_flag: Callable[[Tensor], Tensor] | None = None) -> None:
        """Last call of a step: θ back, then the base update from the gradient now in ``.grad``, which is
        consumed (set to None), so a loop without ``zero_grad`` before its first backward is still right.

        ``step``: the caller's own update instead (e.g. ``lambda: scaler.step(opt.base_optimizer)``),
        taken unguarded. Otherwise the update is guarded on the device (see `nonfinite`), with the
        ``losses`` of the step's passes checked too, gradients unscaled by ``scaler`` and clipped to
        ``max_grad_norm``; ``reduce_flag`` makes data-parallel ranks agree on a skip. The verdict is
        taken on the final gradient as the passes left it, before the rule turns it into its direction.
        """
        self._state.can_finish(type(self).__name__, self.ascent_passes())
        self.fold_splits()
        code = None
        if step is None:
            code = self._check_gradients(list(losses), scaler, reduce_flag, self._state.passes + 1)
            self._scaled = scaler is not None and scaler.is_enabled()
        ascent = self._ascent_scale  # .grad is unscaled now, unless the caller updates (ascent units)
        self._direction(None if step is not None or ascent is None else 1.0 / ascent)
        if step is None and max_grad_norm:
            params = [p for p in param_order(self.param_groups) if p.grad is not None]
            nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=self.foreach)
        before = self._theta.pairs()
        self._end_step()
        if step is not None:
            step()
            self._after_step(None)
            kept = local(self.carried_state())
            finite_copy_(kept, kept)  # a step the caller skipped must not poison the next
            self.zero_grad(set_to_none=True)
            return
        found = None if code is None else (code > 0).float()  # skip: overflow or non-finite
        if found is None:
            self.base_optimizer.step()
        else:
            if not supports_found_inf(self.base_optimizer) and not host_decides(found.device):
                # θ kept for the select where perturbations keep it (the CPU reads the flag instead)
                params = param_order(self.param_groups)
                if unsaved := [p for p in params if p.grad is not None and p not in before]:
                    self._theta.save(unsaved)
                    before.update(self._theta.pairs())
                    self._theta.saved.clear()
            self.guard.step(self.base_optimizer, found, before)
        self._after_step(found)
        if found is not None:
            self.guard.keep(self.carried_state(), found)
            self.guard.record(code)
        if scaler is not None and scaler.is_enabled():
            scaler.update()
        self.zero_grad(set_to_none=True)  # consumed: none leaks into the next step's first pass

    def _check_gradients(self, losses: list[Any], scaler: torch.amp.GradScaler | None,
                         reduce_flag: Callable[[Tensor], Tensor] | None, passes: int) -> Tensor | None:
        """Unscale and take the step's verdict on the device (`nonfinite.StepGuard.verdict`); None when
        nothing is checked. A skipped step is an inf step to the scaler too, so that it backs off after an
        ascent pass's overflow and every rank's scaler agrees."""
        grads = [p.grad for p in param_order(self.param_groups) if p.grad is not None]
        scaling = scaler is not None and scaler.is_enabled()
        found_inf, per_device = None, {}
        if scaling:
            scaler.unscale_(self.base_optimizer)
            per_device = scaler._per_optimizer_states[id(self.base_optimizer)]["found_inf_per_device"]
            found_inf = torch.stack([f.to(self._device()) for f in per_device.values()]).amax() \
                if per_device else torch.zeros((), device=self._device())
        code = self.guard.verdict(losses, local(grads), self._device(), found_inf=found_inf, passes=passes)
        if code is not None and reduce_flag is not None:
            code = reduce_flag(code)
        if code is not None:
            for f in per_device.values():
                f.copy_(torch.maximum(f, (code > 0).float().to(f.device)))
        return code

    def _device(self) -> torch.device:
        """The device of the first parameter (where flags and counters live)."""
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:
        """One batch: the closure (forward and backward, returning the loss or (outputs, loss); it may
        zero the gradients itself or not) runs once per pass (`flatmin.optim.driver`); returns the first
        result, detached. Gradients already in ``.grad`` when ``step`` is called are the gradient at θ
        (the peers' ``loss.backward(); opt.step(closure)``): they are the step's first pass, not a third
        one (the result returned is then None); a step leaves no gradient behind."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs forward and backward and returns "
                "the loss; without one, use the two-call form (see the class docs)"
            )
        given = any(p.grad is not None for p in param_order(self.param_groups))
        results = driver.drive(self, driver.closure_pass(closure, self), sub_batches=True, given=given)
        return driver.detached(results[0])

    # -- non-finite steps ------------------------------------------------------------------------

    def poll(self) -> int:
        """Read the skip counter (one host sync, at a logging point); raises under ``"raise"``."""
        return self.guard.poll(f"{type(self).__name__}.step")

    @property
    def skipped_steps(self) -> int:
        """Steps skipped, for a non-finite loss or gradient or an overflow (reads the device counters: a
        host sync); `poll` counts (and raises for) the non-finite ones only."""
        skips = self.guard.skips()
        return 0 if skips is None else int(skips)

    @property
    def overflow_steps(self) -> int:
        """Of the skipped steps, those a loss scale overflowed (a GradScaler's; never raised; a host sync)."""
        return 0 if self.guard.overflows is None else int(self.guard.overflows)

    @property
    def nonfinite(self) -> str:
        """The non-finite policy ("raise", "skip" or "off")."""
        return self.guard.policy

    # -- state -----------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """What a method carries from step to step besides the base optimizer (a stored Δ, a counter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Take back what `extra_state` saved (called after the groups are loaded)."""

    def kind(self) -> str:
        """What a state dict records to refuse loading into another method or base optimizer."""
        return f"{type(self).__name__}/{type(self.base_optimizer).__name__}"

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (the groups carry the perturbation hyperparameters too), plus
        ``"perturbation"``: the method's kind, its `extra_state` and the skip counters."""
        if self._state.begun or self.perturbed:
            raise RuntimeError(f"{type(self).__name__}.state_dict() in the middle of a step would save θ+Δ; "
                               "call it after restore_and_step() (or restore())")
        extra = {"kind": self.kind(), **self.extra_state()}
        if guard := self.guard.state():
            extra["guard"] = guard
        return {**self.base_optimizer.state_dict(), "perturbation": extra}

    def _check_kind(self, state_dict: dict[str, Any], extra: dict[str, Any]) -> None:
        """Refuse a state saved by another method or base optimizer (older flatmin states have no kind)."""
        kind = extra.get("kind")
        if kind is not None and kind != self.kind():
            raise ValueError(f"this state_dict was saved by {kind}, not {self.kind()}: refusing to load it")
        if kind is None:
            keys = set(self.defaults) - set(self.base_optimizer.defaults)
            for group in state_dict.get("param_groups", []):
                if missing := sorted(keys - set(group)):
                    raise ValueError(f"this state_dict has no {', '.join(missing)}: it was not saved by "
                                     f"{type(self).__name__}; refusing to load it")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer and share its (new) group dicts again."""
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("perturbation", {}))
        self._check_kind(state_dict, extra)
        extra.pop("kind", None)
        guard = extra.pop("guard", {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self.validate_group(group)
        self.guard.load(guard, self._device)
        self.load_extra_state(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base_optimizer!r})"

"""THE step protocol, written once: ascent passes, the final pass, the update from θ.

    begin_step()                      the rule may perturb first (RMP, reused Δ, one-pass AMP)
    N × [gradient pass; perturb()]    ascent passes (N = opt.ascent_passes())
    gradient pass                     the final pass, at θ+Δ
    restore_and_step()                θ back bit for bit; unscale, non-finite flag, clip, guarded update

Everything that trains with a perturbation rule drives it through `drive`: the optimizers'
``step(closure)``, the trainer, the Lightning and Hugging Face integrations, ``flatmin cost`` and
the benchmarks. What differs between callers is only *how a gradient pass is computed* — a
closure (`closure_pass`) or a loss function over micro-batches (`accumulate`) — and a few hooks:

- ``model``: only the step's first pass may move BatchNorm running statistics (they belong to θ);
- ``scaler``: a GradScaler's loss scale is divided out of the ascent and the update;
- micro-batches: `accumulate` sums a pass's gradient over K micro-batches, weighted by size, so a
  step on K micro-batches is the step on the whole batch;
- ``max_grad_norm``: clipping just before the base update, on the final gradient;
- ``on_pass``: called after each pass's gradient is complete (logging ‖∇J(θ)‖, say);
- ``finish(pass)``: a caller whose framework must run the final pass and update itself (Lightning's
  precision plugin) takes over from there (with m-sharpness: the last sub-batch's final pass).

Two rules need the data, not only gradients, and so are driven only by callers that can cut
their batch (``sub_batches=True``, the trainer) or score examples (``probe``):

- m-sharpness (``opt.ascent_splits() = G > 1``, `SAM(splits=G)`): the order above runs once per
  contiguous sub-batch (``Pass.split`` of ``Pass.splits``), each with its own ascent from θ; the
  sub-batches' final gradients are averaged (`PerturbedOptimizer.next_split`) into one update;
- sharpness-sensitive data selection (``opt.select_share() < 1``, `ESAM(gamma=γ)`): after the
  ascent, ``probe(first_result)`` returns the per-example losses at θ and at θ+ε, the rule picks
  the examples whose loss rose most, and the final pass uses only those (``Pass.select``).

Nothing here reads a tensor on the host: a step driven here makes no host–device sync.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatmin.optim.bn import frozen_running_stats


@dataclass(frozen=True)
class Pass:
    """Which pass of a step is being computed."""

    kind: str  # "ascent" or "final"
    index: int  # 0-based position in the step
    fraction: float = 1.0  # share of the batch it uses (sub-batch ascent)
    split: int = 0  # m-sharpness: which of the ``splits`` contiguous sub-batches it uses (split_sizes)
    splits: int = 1
    select: Tensor | None = None  # ESAM's data selection: indices of the examples the final pass uses

    @property
    def ascent(self) -> bool:
        """True for the passes whose gradient feeds the perturbation."""
        return self.kind == "ascent"


GradPass = Callable[[Pass], Any]


def loss_of(result: Any) -> Tensor | float:
    """A pass returns a loss or (outputs, loss): the loss is the last element."""
    return result[-1] if isinstance(result, (tuple, list)) else result


def detached(result: Any) -> Any:
    """What `step` returns: the first pass's result, cut from the graph."""
    if isinstance(result, (tuple, list)):
        return type(result)(x.detach() if isinstance(x, Tensor) else x for x in result)
    return result.detach() if isinstance(result, Tensor) else result


def head_size(batch_size: int, fraction: float) -> int:
    """⌈fraction·B⌉ examples, at least one (the slack absorbs 0.3·10 = 3.0000000000000004)."""
    return min(batch_size, max(1, math.ceil(fraction * batch_size - 1e-9)))


def grad_scale(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """The scaler's current loss scale as a tensor (no host sync), or None without one."""
    return scaler._scale if scaler is not None and scaler.is_enabled() else None


def _bn_guard(model: nn.Module | None, freeze: bool) -> Any:
    """Freeze BatchNorm running statistics for every pass but the step's first."""
    return frozen_running_stats(model) if freeze and model is not None else contextlib.nullcontext()


def drive(opt: Any, grad_pass: GradPass, *, model: nn.Module | None = None,
          scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None,
          on_pass: Callable[[Pass, Any], None] | None = None,
          reduce_flag: Callable[[Tensor], Tensor] | None = None,
          finish: Callable[[Pass], Any] | None = None,
          probe: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
          sub_batches: int | bool = False, given: bool = False) -> list[Any]:
    """One step of a perturbation rule ``opt``; returns every pass's result, in order.

    ``sub_batches``: True when ``grad_pass`` honours ``Pass.split``; a number (the batch size) also
    caps the sub-batches at one example each. ``given``: the caller already put the gradient at θ on
    the whole batch in ``.grad`` (the peers' ``loss.backward(); opt.step(closure)``): it is the step's
    first pass when the rule's first pass is exactly that (its result is then None), and is dropped
    otherwise (the closure's own pass zeroes it).
    """
    splits, share = _needs(opt, finish, probe, sub_batches)
    results: list[Any] = []
    try:
        opt.begin_step()
        for s in range(splits):
            if s:
                opt.next_split()
            n = opt.ascent_passes()
            for i in range(n):
                p = Pass("ascent", len(results), opt.batch_fraction(True), s, splits)
                if i == 0 and s == 0 and given and _takes_given(opt, splits, share):
                    results.append(None)  # the caller's own backward at θ is this pass
                    opt.perturb(grad_scale(scaler))
                    opt.zero_grad(set_to_none=True)
                    continue
                with _bn_guard(model, freeze=i > 0):  # each (sub-)batch's first pass is at θ
                    results.append(grad_pass(p))
                if on_pass is not None:
                    on_pass(p, results[-1])
                opt.perturb(grad_scale(scaler))
                opt.zero_grad(set_to_none=True)
            with _bn_guard(model, freeze=n > 0 or s > 0):
                select = opt.select(*probe(results[0])) if share < 1 else None
                p = Pass("final", len(results), opt.batch_fraction(False), s, splits, select)
                if finish is not None and s == splits - 1:  # the framework's own last pass and update
                    results.append(finish(p))
                    return results
                results.append(grad_pass(p))
            if on_pass is not None:
                on_pass(p, results[-1])
    except BaseException:
        opt.restore()  # θ back whatever happened; the step is abandoned
        raise
    opt.restore_and_step(losses=[loss_of(r) for r in results if r is not None], scaler=scaler,
                         max_grad_norm=max_grad_norm, reduce_flag=reduce_flag)
    return results


def _takes_given(opt: Any, splits: int, share: float) -> bool:
    """The caller's gradient at θ on the whole batch is the rule's first pass: an ascent from θ itself
    (not from a point the rule moved to before any gradient, as bSAM's noise) on the whole batch."""
    return not opt.perturbed and splits == 1 and share == 1 and opt.batch_fraction(True) == 1


def _needs(opt: Any, finish: Any, probe: Any, sub_batches: int | bool) -> tuple[int, float]:
    """The rule's sub-batches and selected share, refused where this caller cannot provide them."""
    splits = opt.ascent_splits() if hasattr(opt, "ascent_splits") else 1
    share = opt.select_share() if hasattr(opt, "select_share") else 1.0
    name = type(opt).__name__
    if splits > 1 and not sub_batches:
        raise ValueError(f"{name}(splits={splits}) takes one ascent per sub-batch (m-sharpness), which this "
                         "caller cannot cut its batch into: use the trainer, step(closure) with a closure "
                         "taking split= and splits=, or drive(..., sub_batches=True)")
    if splits > 1 and sub_batches is not True:
        splits = min(splits, int(sub_batches))
    if share < 1 and probe is None:
        raise ValueError(f"{name}(gamma={share}) selects the examples of its final pass from per-example "
                         "losses, which this caller does not provide: use the trainer, the two-call form "
                         "with opt.select(loss_before, loss_after), or drive(..., probe=...)")
    return splits, share


def closure_pass(closure: Callable[..., Any], opt: Any) -> GradPass:
    """A pass from a ``step(closure)`` closure: gradients are zeroed before each call (so a closure that
    does not zero them itself, the peers' convention, is right too), then it runs forward and backward.

    A rule that uses part of the batch for its ascent calls ``closure(ascent=True/False)``; m-sharpness
    calls ``closure(split=s, splits=G)``: the mean loss of sub-batch s of G (`sub_batch`). A closure
    that cannot take those keywords is refused in one line before any pass, naming what it must take.
    """
    sliced = opt.batch_fraction(True) < 1 or opt.batch_fraction(False) < 1
    needed = (["ascent"] if sliced else []) + (["split", "splits"] if opt.ascent_splits() > 1 else [])
    _check_keywords(closure, needed, opt)

    def run(p: Pass) -> Any:
        kwargs: dict[str, Any] = {"ascent": p.ascent} if sliced else {}
        if p.splits > 1:
            kwargs.update(split=p.split, splits=p.splits)
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            result = closure(**kwargs)
        if result is None:
            name = getattr(closure, "__qualname__", repr(closure))
            raise TypeError(f"the closure {name} returned None; it must return the loss (or (outputs, loss)) "
                            "after calling loss.backward()")
        return result
    return run


def _check_keywords(closure: Callable[..., Any], needed: list[str], opt: Any) -> None:
    """A rule that slices its batch calls the closure with keywords: say so before a pass, not mid-step."""
    if not needed:
        return
    try:
        params = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the call say it
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    if missing := [k for k in needed if k not in params]:
        how = ("def closure(ascent=False): x_ = x[:opt.ascent_size(len(x))] if ascent else x; ..."
               if "ascent" in missing else "def closure(split=0, splits=1): the mean loss of "
               "x[flatmin.optim.driver.sub_batch(len(x), split, splits)]")
        raise ValueError(f"{type(opt).__name__} calls its closure with {', '.join(k + '=' for k in missing)} "
                         f"(it uses part of the batch for a pass), and this closure does not take "
                         f"{'it' if len(missing) == 1 else 'them'}: write it as {how}")


def accumulate(micro_batches: Sequence[Any], loss_fn: Callable[[Any], Any], *,
               weights: Sequence[float] | None = None, params_owner: Any = None,
               scaler: torch.amp.GradScaler | None = None,
               no_sync: Callable[[], Any] | None = None) -> tuple[Tensor, list[Any]]:
    """One pass's gradient summed over micro-batches: Σ_k w_k ∇loss_k (w_k = n_k / n by default).

    ``loss_fn(micro)`` runs the forward pass and returns the mean loss or (outputs, loss);
    ``no_sync`` (DDP) wraps every backward but the last, so gradients are all-reduced once.
    Returns the weighted loss (detached) and each micro-batch's outputs.
    """
    if params_owner is not None:
        params_owner.zero_grad(set_to_none=True)
    k = len(micro_batches)
    if weights is None:
        weights = [1.0 / k] * k
    total, outputs = None, []
    for i, (micro, w) in enumerate(zip(micro_batches, weights)):
        ctx = no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            result = loss_fn(micro)
            loss = loss_of(result)
            scaled = loss * w if k > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        part = loss.detach() * w if k > 1 else loss.detach()
        total = part if total is None else total + part
        outputs.append(result[0] if isinstance(result, (tuple, list)) else None)
    return total, outputs


def split_sizes(n: int, k: int) -> list[int]:
    """K contiguous micro-batch sizes of a batch of n, differing by at most one (empty ones dropped)."""
    k = max(1, min(k, n))
    return [len(c) for c in torch.arange(n).tensor_split(k)]


def sub_batch(n: int, split: int, splits: int) -> slice:
    """The examples of sub-batch ``split`` of ``splits`` (contiguous, as the trainer cuts them)."""
    sizes = split_sizes(n, splits)
    start = sum(sizes[:split])
    return slice(start, start + sizes[split])

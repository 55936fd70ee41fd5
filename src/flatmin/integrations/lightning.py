"""AMP, SAM and RMP in a LightningModule with automatic optimisation, at any precision.

Lightning hands the optimizer one closure (training_step, zero_grad, backward) per batch, and
with ``precision="16-mixed"`` it runs that closure itself, then calls
``scaler.step(optimizer)`` with no closure — a second pass is then impossible from inside
``optimizer.step``, which is where SAM integrations usually break. Here the step is driven by
`flatmin.optim.driver` like everywhere else, from `PerturbedModule.optimizer_step`; the driver
hands the final pass to Lightning (its ``finish`` hook):

    ascent passes:  closure() at θ (and θ+Δ for N > 1), each followed by ``perturb(loss scale)``
    final pass:     Lightning's own ``optimizer.step(closure)`` at θ+Δ — the precision plugin runs
                    the closure, unscales, clips, skips on inf/NaN and updates the scaler as for
                    any optimizer; `PerturbedStep.step` puts θ back (bit for bit) and updates.

θ is restored even when the scaler skips the step (the overflow then leaves θ untouched). The
final pass leaves BatchNorm running statistics alone (they belong to θ, see `flatmin.optim.bn`).

``accumulate_grad_batches=K``: Lightning runs training_step + backward for the window's first K−1
batches itself and calls ``optimizer_step`` on the K-th. Every pass of a perturbed step must cover
all K, so `PerturbedModule` keeps the window's batches (in ``on_train_batch_start``) and, in each
ascent pass and the final pass, re-runs the K−1 earlier ones through `flatmin.optim.driver.accumulate`
(Lightning's own training_step call, its 1/K loss normalisation, the loss scale, DDP sync held back)
before Lightning's closure adds the K-th. The gradient Lightning accumulated for them is reused
where it is the right one: in the step's first pass when the rule has not perturbed θ before it
(AMP, SAM); otherwise it is dropped. Re-run batches never move BatchNorm statistics (they moved in
Lightning's own pass, at θ); ``on_before_backward``/``on_after_backward`` run for Lightning's passes only.
Usage::

    class Net(PerturbedModule, L.LightningModule):
        def configure_optimizers(self):
            return PerturbedStep(flatmin.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1))

``training_step`` runs once per gradient pass and batch (N+1 times for AMP, twice for SAM);
``self.perturbation_pass`` says which one ("ascent" or "final") for logging only once. A module that
overrides ``on_train_batch_start`` calls ``super().on_train_batch_start(batch, batch_idx)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer import call

from flatmin.integrations._step import OptimizerView
from flatmin.optim import Pass, PerturbedOptimizer, accumulate, drive, frozen_running_stats
from flatmin.optim.driver import sub_batch


class PerturbedStep(OptimizerView):
    """The last pass of a perturbed step, shaped as the optimizer Lightning's precision plugins call.

    Shares parameter groups and state with the wrapped AMP/SAM/RMP (schedulers and checkpoints
    see the base optimizer, as with the unwrapped one).
    """

    def __init__(self, perturbed: PerturbedOptimizer) -> None:
        super().__init__(perturbed)
        if perturbed.batch_fraction(True) < 1:
            raise ValueError("sub-batch ascent (ascent_fraction < 1) needs a closure that takes ascent=...; "
                             "Lightning's closure does not")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Final pass (the closure, unless a precision plugin already ran it), θ back, base update."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        losses = [result] if isinstance(result, torch.Tensor) else []
        self.perturbed.restore_and_step(losses=losses)
        return result


def _plus(a: Any, b: Any) -> Any:
    """The window's loss: the re-run batches' part plus the closure's (either may be missing)."""
    return b if a is None else a if b is None else a + b


class PerturbedModule:
    """LightningModule mixin: runs a `PerturbedStep` optimizer's ascent passes before Lightning's step.

    Rules that need the data: with m-sharpness (`SAM(splits=G)`) and ESAM's data selection
    (`ESAM(gamma<1)`), ``training_step`` trains on ``self.perturbed_batch(batch)`` — the sub-batch
    and the selected examples of the current pass (the whole batch otherwise) — and, for ESAM's
    selection, the module defines ``per_example_loss(batch) -> Tensor`` (no reduction): it is
    evaluated at θ and at θ+ε (two gradient-free forwards) to pick the examples.
    """

    perturbation_pass: str = "final"
    perturbation_split: tuple[int, int] = (0, 1)  # (sub-batch, of how many) of the current pass
    perturbation_select: torch.Tensor | None = None  # ESAM: the examples of the current final pass

    def perturbed_batch(self, batch: Any) -> Any:
        """The part of ``batch`` the current pass uses: its sub-batch, then its selected examples."""
        split, splits = self.perturbation_split
        select = self.perturbation_select

        def cut(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                t = t[sub_batch(len(t), split, splits)] if splits > 1 else t
                return t if select is None else t.index_select(0, select.to(t.device))
            if isinstance(t, (tuple, list)):
                return type(t)(cut(v) for v in t)
            if isinstance(t, dict):
                return {k: cut(v) for k, v in t.items()}
            return t
        return cut(batch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """Keep the batches of the accumulation window: every pass of the step re-runs them."""
        self.perturbation_pass = "ascent"  # Lightning's own pass over an accumulated batch is at θ
        window = self.__dict__.setdefault("_perturbed_window", [])
        window.append((batch, batch_idx))
        del window[:-self.trainer.accumulate_grad_batches]  # type: ignore[attr-defined]  # bounded
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def _earlier_batches(self, batch_idx: int) -> list[tuple[Any, int]]:
        """The window's batches before the one Lightning steps on (none when nothing accumulates)."""
        window = self.__dict__.get("_perturbed_window", [])
        self._perturbed_window: list[tuple[Any, int]] = []
        if self.trainer.accumulate_grad_batches == 1:  # type: ignore[attr-defined]
            return []
        if not window or window[-1][1] != batch_idx:
            raise RuntimeError("PerturbedModule keeps the accumulated batches in on_train_batch_start; a "
                               "module that overrides it must call "
                               "super().on_train_batch_start(batch, batch_idx)")
        return window[:-1]

    def _rerun(self, batches: list[tuple[Any, int]], opt: PerturbedOptimizer, scaler: Any) -> Any:
        """One pass's gradient over the kept batches, as Lightning computes it (its 1/K normalisation)."""
        trainer = self.trainer  # type: ignore[attr-defined]

        def loss_fn(item: tuple[Any, int]) -> torch.Tensor:
            out = call._call_strategy_hook(trainer, "training_step", *item)
            loss = ClosureResult.from_training_step_output(out, trainer.accumulate_grad_batches).closure_loss
            if loss is None:
                raise ValueError("training_step returned None for an accumulated batch: a perturbed step "
                                 "cannot skip one micro-batch of its window")
            return loss

        strategy = trainer.strategy
        held = strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) \
            else contextlib.nullcontext()  # the K-th batch's backward all-reduces the sum
        with held, frozen_running_stats(self):  # type: ignore[arg-type]
            loss, _ = accumulate(batches, loss_fn, weights=[1.0] * len(batches), params_owner=opt,
                                 scaler=scaler)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """Ascent passes through Lightning's closure, then Lightning's (precision-aware) final step;
        with accumulation every pass first re-runs the window's earlier batches."""
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> the torch optimizer
        if not isinstance(raw, PerturbedStep) or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        window = self.__dict__.get("_perturbed_window", [])
        current = window[-1][0] if window else None
        earlier = self._earlier_batches(batch_idx)
        opt = raw.perturbed
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        data_rule = opt.ascent_splits() > 1 or opt.select_share() < 1
        if data_rule and earlier:
            raise ValueError(f"{type(opt).__name__}: m-sharpness and data selection with "
                             "accumulate_grad_batches > 1 are not supported in Lightning; use the trainer")
        seen: dict[str, torch.Tensor] = {}

        def window_pass(first: bool) -> Any:
            # Lightning's own passes left the earlier batches' gradient at θ in .grad: it is this
            # pass's only in the step's first pass, and only if the rule has not perturbed θ yet
            if earlier and not (first and not opt.perturbed):
                return self._rerun(earlier, opt, scaler)
            return None

        def at(p: Pass) -> None:
            self.perturbation_pass, self.perturbation_split = p.kind, (p.split, p.splits)
            self.perturbation_select = p.select

        def grad_pass(p: Pass) -> Any:
            at(p)
            if p.index == 0 and opt.select_share() < 1:  # ESAM: per-example losses at θ
                seen["before"] = self._per_example(current)
            if not p.ascent:  # m-sharpness: an earlier sub-batch's final pass
                return optimizer_closure()
            return _plus(window_pass(p.index == 0), optimizer_closure())

        def probe(_: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return seen["before"], self._per_example(current)  # at θ+ε

        def final(p: Pass) -> Any:
            at(p)
            window_pass(opt.ascent_passes() == 0)

            def closure() -> Any:  # the sub-batches' mean before the precision plugin unscales
                result = optimizer_closure()
                opt.fold_splits()
                return result
            return optimizer.step(closure=closure)  # Lightning's precision-aware step

        try:
            drive(opt, grad_pass, model=self, scaler=scaler, finish=final,  # type: ignore[arg-type]
                  probe=probe if opt.select_share() < 1 else None, sub_batches=True)
        finally:
            self.perturbation_split, self.perturbation_select = (0, 1), None
        opt.restore()  # a step skipped by Lightning's scaler (inf/NaN) leaves θ+Δ behind: put θ back
        return None

    @torch.no_grad()
    def _per_example(self, batch: Any) -> torch.Tensor:
        """The module's per-example losses on the whole batch (BatchNorm statistics left alone)."""
        fn = getattr(self, "per_example_loss", None)
        if fn is None:
            raise ValueError("ESAM's data selection (gamma < 1) in Lightning needs the module's "
                             "per_example_loss(batch) -> Tensor (one loss per example, no reduction)")
        with frozen_running_stats(self):  # type: ignore[arg-type]
            return fn(batch).detach().float().reshape(-1)

"""AMP, SAM/ASAM, RMP and the efficient variants in the Hugging Face ``Trainer``.

Install the extra (``pip install flatmin[transformers]``); nothing in flatmin imports this module.
The Trainer's loop makes, per optimizer step, ``training_step`` (forward + backward) for each of
the window's K = ``gradient_accumulation_steps`` micro-batches, then clips, calls
``optimizer.step()`` and steps the LR scheduler. A perturbed step needs *every* pass — each ascent
pass and the final pass — to cover the whole window, so `PerturbedTrainer` moves the passes into
the optimizer step:

- ``training_step`` only keeps the micro-batch (its prepared inputs and ``num_items_in_batch``) and
  returns 0: a gradient taken there, at θ, would be wrong for rules that perturb first (RMP, the
  reusing variants) and is one pass of many anyway;
- ``optimizer.step()`` reaches the flatmin optimizer through `TrainerStep`, which runs
  `flatmin.optim.driver.drive` over the kept window: each pass sums the window's gradient with
  `flatmin.optim.driver.accumulate` (the loss is the Trainer's own ``compute_loss`` with the same
  ``num_items_in_batch`` as ``training_step``; each micro-batch weighs 1/K unless the loss really is
  divided by the window's item count, see `PerturbedTrainer._scaled_for_ga`; DDP all-reduces only
  the last micro-batch's backward); the update from θ clips the *final* gradient to ``max_grad_norm``;
- the Trainer's own clip (``_clip_grad_norm``) does not run — at that point no gradient exists yet;
  the ``grad_norm`` it logs is the final pass's gradient norm before clipping, written by the step;
- the logged training loss is the step's first pass (at θ for AMP/SAM) over the window: the mean
  loss of the window's examples, whatever ``gradient_accumulation_steps`` is.

The Trainer's own rule takes the loss of a model whose ``forward`` accepts ``**kwargs`` to be divided
by ``num_items_in_batch`` already; many such models (``BertForSequenceClassification``) return a plain
mean, so the plain Trainer then adds the K means (a K-fold gradient and logged loss). Here the first
micro-batch that rule applies to is probed once: two gradient-free forwards in eval mode, with the item
count n and 2n; a loss that does not halve is a plain mean and is weighted 1/K
(``trainer.loss_is_scaled_for_ga = True/False`` decides without the probe).

Precision: ``bf16`` is Accelerate's autocast on the model's forward. ``fp16`` uses Accelerate's
GradScaler: its scale multiplies every pass's loss, is divided out of each ascent, and the update
unscales, checks and skips on the device and updates the scale (flatmin's guarded update). The
scaler is detached from Accelerate's optimizer wrapper so that it is not stepped twice; an
overflowing step leaves θ untouched and, as in the plain Trainer, does not advance the LR schedule.
The LR scheduler acts on the flatmin optimizer's groups (shared with its base optimizer);
checkpoints save and restore the base optimizer's state plus the perturbation's, so a resumed run
continues the same trajectory. Multi-process: ``torchrun`` / ``accelerate launch`` (DDP) work as
for the plain Trainer; DeepSpeed and FSDP are refused (they own the optimizer step themselves).

Usage::

    opt = flatmin.AMP(model.parameters(), lr=0.05, epsilon=0.1, inner_lr=1.0, momentum=0.9)
    trainer = PerturbedTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                               optimizers=(opt, None))  # or optimizer_cls_and_kwargs=(flatmin.SAM, {...})
    trainer.train()
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from flatmin.integrations._step import OptimizerView
from flatmin.optim import Pass, PerturbedOptimizer, accumulate, drive
from flatmin.optim.driver import grad_scale, head_size

Micro = tuple[dict[str, Any], Any]  # (prepared inputs, num_items_in_batch)


class TrainerStep(OptimizerView):
    """The optimizer the Trainer and Accelerate hold: its ``step()`` runs a whole perturbed step."""

    def __init__(self, perturbed: PerturbedOptimizer, trainer: PerturbedTrainer) -> None:
        super().__init__(perturbed)
        self.trainer = trainer

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Every pass over the micro-batches kept since the last step, then the update from θ."""
        if closure is not None:
            raise ValueError("PerturbedTrainer's optimizer takes no closure: its passes run the kept "
                             "micro-batches")
        self.trainer.perturbed_step()


def _head(inputs: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The first ⌈fraction·B⌉ examples of a micro-batch (sub-batch ascent); cuts every batch-sized tensor."""
    sizes = [v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0]
    if not sizes:
        raise ValueError("sub-batch ascent needs tensor inputs with a batch dimension")
    n = sizes[0]
    h = head_size(n, fraction)
    cut = {k: v[:h] for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n}
    return {**inputs, **cut}


def _max_over_ranks(flag: Tensor) -> Tensor:
    """Data-parallel ranks agree on skipping a step (a non-finite loss seen by one rank only)."""
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


class PerturbedTrainer(Trainer):
    """A ``Trainer`` whose optimizer is a flatmin `PerturbedOptimizer` (AMP, SAM/ASAM, RMP, variants).

    Give the optimizer as ``optimizers=(opt, scheduler_or_None)`` or build it through
    ``optimizer_cls_and_kwargs=(flatmin.SAM, {"base_optimizer": torch.optim.SGD, "rho": 0.05, "lr": 0.1})``
    (then it gets the Trainer's weight-decay parameter groups). See the module docs for how each
    ``TrainingArguments`` setting is honoured.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._window: list[Micro] = []
        self._grad_norm: Tensor | None = None  # the last step's final-gradient norm (logged as grad_norm)
        self._loss_counts_items: bool | None = None  # the probe's answer, see _scaled_for_ga

    # -- the optimizer ---------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, checked to be a flatmin rule and wrapped in a `TrainerStep`."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("PerturbedTrainer runs on one device or under DDP (torchrun, accelerate "
                             "launch); DeepSpeed and FSDP own the optimizer step and are not supported")
        super().create_optimizer(model)
        inner = self.optimizer
        while not isinstance(inner, (TrainerStep, PerturbedOptimizer)) and hasattr(inner, "optimizer"):
            inner = inner.optimizer  # Accelerate's wrapper on a second train() call
        if isinstance(inner, TrainerStep):
            return self.optimizer
        if not isinstance(inner, PerturbedOptimizer):
            raise ValueError(
                f"PerturbedTrainer needs a flatmin PerturbedOptimizer (AMP, SAM, RMP, ...), got "
                f"{type(inner).__name__}: pass optimizers=(flatmin.AMP(model.parameters(), ...), None) or "
                "optimizer_cls_and_kwargs=(flatmin.SAM, {...})")
        inner.bind_model(self.model)  # Flat-LoRA learns a peft model's LoRA layers
        self.optimizer = TrainerStep(inner, self)
        return self.optimizer

    @property
    def perturbed_optimizer(self) -> PerturbedOptimizer:
        """The flatmin rule behind the Trainer's optimizer."""
        inner = self.optimizer
        while not isinstance(inner, TrainerStep):
            inner = inner.optimizer
        return inner.perturbed

    # -- the Trainer's hooks -----------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Keep the micro-batch for the step's passes; the loss is counted by the step (returns 0)."""
        self._take_scaler()
        model.train()
        micro = (self._prepare_inputs(inputs), num_items_in_batch)
        unknown = self._loss_counts_items is None and getattr(self, "loss_is_scaled_for_ga", None) is None
        if unknown and self.args.gradient_accumulation_steps > 1 and micro[1] is not None \
                and self._trainers_rule(micro):
            self._loss_counts_items = self._divides_by_item_count(micro)
        self._window.append(micro)
        if self._grad_norm is None:
            self._grad_norm = torch.zeros((), device=self.args.device)
        return torch.zeros((), device=self.args.device)

    def _clip_grad_norm(self, model: nn.Module) -> Tensor | None:
        """No clip here (no gradient exists yet): the step clips the final gradient; its norm is logged."""
        return self._grad_norm

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Tensor | None:
        """The final pass's gradient norm before clipping, filled in by the step that follows."""
        return self._grad_norm

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the count of skipped steps; under nonfinite="raise" a non-finite one raises (an fp16
        overflow, which the loss scale expects, never does)."""
        if self.optimizer is not None and "loss" in logs:
            opt = self.perturbed_optimizer
            opt.poll()
            logs["skipped_steps"] = opt.skipped_steps
        super().log(logs, *args, **kwargs)

    def _take_scaler(self) -> None:
        """fp16: the step unscales, skips and updates the scaler itself; Accelerate's wrapper must not."""
        accelerated = self.optimizer
        if getattr(accelerated, "scaler", None) is not None:
            accelerated.scaler = None

    # -- the step ----------------------------------------------------------------------------------

    def _trainers_rule(self, micro: Micro) -> bool:
        """The plain Trainer's guess (``training_step``): the loss is divided by the item count when
        the model's forward accepts loss keywords and a count is given, or a ``compute_loss_func`` is."""
        counts = self.model_accepts_loss_kwargs and micro[1] is not None
        return bool(counts) or self.compute_loss_func is not None

    def _scaled_for_ga(self, window: list[Micro]) -> bool:
        """Whether ``compute_loss`` already divides by the window's item count (then each micro-batch
        weighs 1, else 1/K). ``trainer.loss_is_scaled_for_ga`` decides when set; else the Trainer's
        rule, unless the probe found the loss a plain mean (``BertForSequenceClassification`` accepts
        ``**kwargs`` but ignores the count: the plain Trainer adds its K means, this one does not)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return self._trainers_rule(window[0]) and self._loss_counts_items is not False

    @torch.no_grad()
    def _divides_by_item_count(self, micro: Micro) -> bool:
        """Whether the loss depends on ``num_items_in_batch`` as a sum over it does: the micro-batch's
        loss with the count n and with 2n, gradient-free in eval mode (dropout off, so both forwards
        are the same function). A loss that stays the same is a plain mean; one that halves, or that
        cannot tell (0, non-finite), keeps the Trainer's rule. Once per trainer, outside the step."""
        inputs, n = micro
        model = self.model  # unwrapped: no DDP hooks for a probe
        was = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager():
                one = self.compute_loss(model, dict(inputs), num_items_in_batch=n)
                two = self.compute_loss(model, dict(inputs), num_items_in_batch=n * 2)
        finally:
            model.train(was)
        a, b = float(one.detach().float().mean()), float(two.detach().float().mean())
        if a == 0 or not math.isfinite(a) or not math.isfinite(b):
            return True
        return not math.isclose(a, b, rel_tol=1e-3)

    def perturbed_step(self) -> None:
        """`drive` over the kept micro-batches: ascent passes, final pass, clip, update from θ."""
        window, self._window = self._window, []
        if not window:
            raise RuntimeError("PerturbedTrainer: optimizer.step() with no micro-batch kept; the Trainer "
                               "calls training_step for each micro-batch first")
        opt = self.perturbed_optimizer
        model = self.model_wrapped
        scaler = self.accelerator.scaler if self.accelerator.scaler is not None \
            and self.accelerator.scaler.is_enabled() else None
        weight = 1.0 if self._scaled_for_ga(window) else 1.0 / len(window)
        logged: dict[str, Tensor] = {}

        def loss_fn(micro: Micro) -> Tensor:
            inputs, n = micro
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=n)  # it may pop "labels"
            return loss.mean() if self.args.n_gpu > 1 else loss

        def grad_pass(p: Pass) -> Tensor:
            part = window if p.fraction >= 1 else self._heads(window, p.fraction)
            loss, _ = accumulate(part, loss_fn, weights=[weight] * len(part), params_owner=opt, scaler=scaler,
                                 no_sync=lambda: self.accelerator.no_sync(model))
            return loss

        def on_pass(p: Pass, loss: Tensor) -> None:
            if "loss" not in logged and p.fraction >= 1:
                logged["loss"] = loss
            if not p.ascent:
                grads = [q.grad for q in model.parameters() if q.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
                scale = grad_scale(scaler)
                self._grad_norm.copy_(norm / scale if scale is not None else norm)

        skipped_before = opt.guard.skips() if scaler is not None else None
        reduce = _max_over_ranks if self.accelerator.num_processes > 1 else None
        drive(opt, grad_pass, model=self.model, scaler=scaler, max_grad_norm=self.args.max_grad_norm or None,
              on_pass=on_pass, reduce_flag=reduce)
        if "loss" in logged:
            self._tr_loss += logged["loss"].to(self._tr_loss.device)
        skipped = opt.guard.skips()
        if scaler is not None and skipped is not None:  # the LR schedule waits after a skipped step
            before = skipped_before if skipped_before is not None else 0
            self.optimizer._is_overflow = skipped > before  # read by the Trainer (a host sync there)

    def _heads(self, window: list[Micro], fraction: float) -> list[Micro]:
        """Sub-batch ascent: the head of every micro-batch, with the item count recomputed."""
        heads = [_head(inputs, fraction) for inputs, _ in window]
        n = self._get_num_items_in_batch(heads, self.args.device) if window[0][1] is not None else None
        return [(h, n) for h in heads]


__all__ = ["PerturbedTrainer", "TrainerStep"]

"""The one training loop: the paper's protocol for every method of Table 1.

Per epoch: the learning rate from the step schedule, a seeded permutation of the training set,
and for each batch one `train_step`; then validation and test metrics (error, NLL, ECE), a log
line and an atomic checkpoint. Every random number comes from generators seeded by (seed,
epoch), so a run resumed from any checkpoint retraces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from flatmin.data import Dataset, Split, load_dataset
from flatmin.errors import ConfigError, FlatminError, NonFiniteLossError
from flatmin.models import create_model
from flatmin.optim import Pass, PerturbedOptimizer, accumulate, drive
from flatmin.optim.driver import grad_scale, head_size, split_sizes
from flatmin.optim.sharded import local, norm_reducer
from flatmin.train import checkpoint as ckpt
from flatmin.train import health as run_health
from flatmin.train.config import DEFAULT_LR_SCHEDULE, TrainConfig, resolve
from flatmin.train.distributed import current
from flatmin.train.logging import LOG, RunLogger, read_epochs
from flatmin.train.methods import Batch, Method, get_method
from flatmin.train.metrics import MetricAccumulator, classification_metrics, fit_temperature
from flatmin.train.provenance import device_name, git_commit, versions

AUTOCAST = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
POLL_EVERY = 50  # steps between reads of the non-finite counter (and at the end of each epoch)
CHECKPOINT_SECONDS = 30.0  # the most training a kill can lose (the first and last epochs are always saved)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Independent, reproducible seeds per (run seed, epoch, use)."""
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63 - 1)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The epoch's learning rate: `TrainConfig.lr_at` (warm-up, then step, cosine or constant)."""
    return cfg.lr_at(epoch)


@dataclass
class StepContext:
    """What a step needs besides the model and batch: precision and the data-parallel context."""

    cfg: TrainConfig
    method: Method
    scaler: torch.amp.GradScaler
    device: torch.device
    input_range: float
    dist: Any
    predictor: Any = None  # the method's evaluation (bSAM's MC predictive); None: model(x)

    def autocast(self) -> Any:
        """Mixed-precision forward passes (no-op at 32 bits)."""
        dtype = AUTOCAST[self.cfg.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def _full(logits: Tensor) -> Tensor:
    """Half-precision logits are lifted to float32 for the loss; float32/64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def grad_norm(model: nn.Module, scale: Tensor | None) -> Tensor:
    """‖∇J‖ of the current gradients (Theorem 2's quantity), without a host sync (sharded: one all-reduce)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(local(grads))).float()
    reduce = norm_reducer(grads)
    norm = torch.linalg.vector_norm(norms) if reduce is None else reduce(norms, "global")[0]
    return norm / scale if scale is not None else norm


def train_step(net: nn.Module, model: nn.Module, opt: PerturbedOptimizer, batch: Batch,
               ctx: StepContext, stats: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One step of any method through the step driver (which owns the pass order).

    A pass accumulates its gradient over ``cfg.accumulate`` micro-batches. Returns the loss and
    logits of the step's first full-batch pass (at θ for AMP/SAM) and ‖∇J‖ of its first pass.
    ``stats``, when given, receives Theorem 2's quantities as device tensors: ``delta_norm`` ‖Δ‖
    and, when the step has a full-batch pass at θ before the final one, ``loss_gap`` J(θ+Δ) − J(θ).
    """
    batch = ctx.method.prepare(model, batch, ctx.cfg, ctx.input_range)
    seen: dict[str, Any] = {}

    weight = ctx.dist.grad_weight  # FSDP on an uneven batch: this rank's share·W (else 1)

    def loss_fn(micro: Batch) -> tuple[Tensor, Tensor]:
        with ctx.autocast():
            logits = net(micro.x)
            loss = ctx.method.loss(_full(logits), micro, ctx.cfg)
        return logits.detach(), loss if weight == 1 else loss * weight

    def grad_pass(p: Pass) -> tuple[Tensor, Tensor]:
        part = batch if p.fraction >= 1 else batch.head(head_size(len(batch.x), p.fraction))
        part = part.split(p.splits)[p.split] if p.splits > 1 else part  # m-sharpness: one sub-batch
        part = part.take(p.select) if p.select is not None else part  # ESAM: the selected examples
        micro = part.split(ctx.cfg.accumulate)
        weights = [len(m.x) / len(part.x) for m in micro]
        with ctx.dist.ascent_context(net) if p.ascent else contextlib.nullcontext():
            loss, logits = accumulate(micro, loss_fn, weights=weights, params_owner=opt, scaler=ctx.scaler,
                                      no_sync=ctx.dist.no_sync(net))
        return torch.cat(logits), loss if weight == 1 else loss / weight

    def probe(first: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-example cross-entropy at θ (the first pass's logits) and at θ+ε (a forward, no graph)."""
        with torch.no_grad(), ctx.autocast():
            after = F.cross_entropy(_full(net(batch.x)).float(), batch.y, reduction="none")
        return F.cross_entropy(_full(first[0]).float(), batch.y, reduction="none"), after

    at_theta: list[tuple[Tensor, Tensor]] = []  # m-sharpness: each sub-batch's pass at θ

    def on_pass(p: Pass, result: tuple[Tensor, Tensor]) -> None:
        if p.index == 0:  # ‖∇J‖ of the step's first pass (at θ, unless the rule perturbs first)
            seen["gnorm"] = grad_norm(model, grad_scale(ctx.scaler))
        if p.splits > 1 and p.ascent:
            at_theta.append(result)
        elif p.fraction >= 1 and p.select is None and "reported" not in seen:
            seen["reported"] = result
        if stats is not None and not p.ascent:  # at θ+Δ, before θ is restored
            stats["delta_norm"] = opt.perturbation_norm()
            if "reported" in seen and seen["reported"] is not result and p.select is None:
                stats["loss_gap"] = result[1] - seen["reported"][1]

    drive(opt, grad_pass, model=model, scaler=ctx.scaler, max_grad_norm=ctx.cfg.grad_clip, on_pass=on_pass,
          reduce_flag=ctx.dist.reduce_flag, probe=probe, sub_batches=len(batch.x))
    if at_theta:  # the batch at θ, put together from its sub-batches
        sizes = split_sizes(len(batch.x), len(at_theta))
        seen["reported"] = (torch.cat([r[0] for r in at_theta]),
                            sum(r[1] * (n / len(batch.x)) for r, n in zip(at_theta, sizes)))
    logits, loss = seen["reported"]
    return loss, logits, seen["gnorm"]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, ds: Dataset, ctx: StepContext,
             reliability: bool = False, keep: list[Tensor] | None = None) -> dict[str, Any]:
    """Error (%), NLL and ECE of a split, streamed in batches; optionally the reliability bins, and the
    logits appended to ``keep`` (for temperature scaling)."""
    model.eval()
    acc = MetricAccumulator()
    bs = ctx.cfg.eval_batch_size
    forward = model if ctx.predictor is None else ctx.predictor()
    for start in range(0, len(split), bs):
        x = ds.transform(split.x[start:start + bs], False)
        with ctx.autocast():
            logits = forward(x)
        acc.update(logits.float(), split.y[start:start + bs])
        if keep is not None:
            keep.append(logits.detach().to("cpu", torch.float64))
    out = acc.compute()
    if reliability:
        out["reliability"] = acc.reliability()
    return out


def run_epoch(net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, ds: Dataset,
              epoch: int, ctx: StepContext, progress: bool,
              logger: RunLogger | None = None) -> dict[str, float]:
    """One pass over the training set in a seeded order; returns mean loss, error and ‖∇J‖.

    With a step ``logger`` every step's loss, ‖∇J‖, lr, ‖Δ‖ and loss gap are logged (as device
    tensors: the logger copies them to the host at its flush points, not in the step)."""
    cfg = ctx.cfg
    model.train()
    torch.manual_seed(epoch_seed(cfg.seed, epoch, 1))  # dropout masks, MixUp, RMP
    order = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(
        epoch_seed(cfg.seed, epoch, 2))).to(ctx.device)
    aug = torch.Generator(device=ctx.device).manual_seed(epoch_seed(cfg.seed, epoch, 3))
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss·n, correct, Σ‖∇J‖
    count = 0
    steps = list(order.split(cfg.batch_size))
    bar = _progress(len(steps), f"epoch {epoch + 1}/{cfg.epochs}", progress)
    for i, idx in enumerate(steps):
        idx = ctx.dist.shard(idx)
        batch = Batch(ds.transform(ds.train.x[idx], True, aug), ds.train.y[idx])
        stats: dict[str, Tensor] | None = {} if logger is not None else None
        loss, logits, gnorm = train_step(net, model, opt, batch, ctx, stats)
        if logger is not None:
            logger.log_step(epoch * len(steps) + i, {"loss": loss, "grad_norm": gnorm,
                                                     "lr": opt.param_groups[0]["lr"], **stats})
        sums += torch.stack([loss.double() * len(idx), (logits.argmax(1) == batch.y).sum().double(),
                             gnorm.double()])
        count += len(idx)
        if i % POLL_EVERY == POLL_EVERY - 1 or i == len(steps) - 1:  # the loop's only host reads
            _poll(opt, cfg, epoch, i)
        if bar is not None and (i % 10 == 0 or i == len(steps) - 1):
            bar.update(i + 1 - bar.n)
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(sums[1]) / count * 100:.1f}%")
    if bar is not None:
        bar.close()
    sums = ctx.dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([count])]))
    return {"train_loss": float(sums[0] / sums[3]), "train_error": 100.0 * float(1 - sums[1] / sums[3]),
            "grad_norm": float(sums[2]) / len(steps) / ctx.dist.world_size}


def check_model(model: nn.Module, ds: Dataset, name: str) -> None:
    """Before the first batch: the model takes two training examples and returns one logit per class
    for each (a factory with the wrong head fails here in one line, not mid-training or silently)."""
    was_training = model.training
    model.eval()  # no running statistic moves, no dropout mask is drawn
    try:
        with torch.no_grad():
            out = model(ds.transform(ds.train.x[:2], False))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"model {name} cannot take inputs of shape {tuple(ds.input_shape)} from "
                          f"{ds.name}: {first}") from None
    finally:
        model.train(was_training)
    want = (min(2, len(ds.train)), ds.num_classes)
    if not isinstance(out, Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"model {name} returns {got} for a batch of {want[0]} examples; {ds.name} has "
                          f"{ds.num_classes} classes, so it must return logits of shape {want}")


def _saves(epoch: int, start: int, epochs: int, since: float) -> bool:
    """Checkpoint after this run's first epoch, its last, and then whenever `CHECKPOINT_SECONDS` have passed:
    a kill loses at most that much training, and a run of short epochs is not an fsync'd file per epoch
    (60 of them were ~5 % of a default-compare run)."""
    return epoch == start or epoch + 1 == epochs or since >= CHECKPOINT_SECONDS


def _evaluates(cfg: TrainConfig, epoch: int) -> bool:
    """Val/test every ``eval_every`` epochs and after the last: evaluation changes no weight."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs


def _poll(opt: PerturbedOptimizer, cfg: TrainConfig, epoch: int, i: int) -> None:
    """Read the optimizer's device-side skip counter; a skipped (non-finite) step stops the run."""
    try:
        opt.poll()
    except NonFiniteLossError as err:
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch + 1}, by step {i + 1} (method {cfg.method}, "
            f"lr {lr_at(cfg, epoch):g}): {err}; lower the learning rate or ε") from None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal, nothing in CI or a pipe."""
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _input_range(ds: Dataset) -> float:
    """The dynamic range of the model's inputs (adversarial training's step is 1/255 of it)."""
    x = ds.transform(ds.train.x[:2048], False)
    return float(x.max() - x.min())


def _check_resumable(out: Path, resume: bool) -> dict | None:
    """An existing run is continued only when asked; it is never overwritten."""
    path = out / ckpt.CHECKPOINT
    if not path.exists():
        return None
    if not resume:
        raise FlatminError(f"{out} already holds a run ({path.name}); pass --resume to continue it "
                           "or choose another --out")
    return ckpt.load_checkpoint(path)


def _config_mismatch(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """Fields in which a resumed run would differ from the saved one."""
    a, b = saved.to_dict(), wanted.to_dict()
    a["lr_schedule"] = a["lr_schedule"] or DEFAULT_LR_SCHEDULE  # saved before the field: step, the only one
    a["warmup_epochs"] = a["warmup_epochs"] or 0  # saved before the field: no warm-up
    free = ("device", "tensorboard", "fsdp")  # where and how it runs, what it logs: not the run itself
    return [f"{k}: saved {a[k]!r}, asked {b[k]!r}" for k in a if a[k] != b[k] and k not in free]


def train(cfg: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
          progress: bool | None = None) -> dict[str, Any] | None:
    """Train one model with one method; returns what metrics.json holds (written when ``out``).

    Under torchrun only rank 0 evaluates, writes and returns the result; the other ranks return None.
    """
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    dist = current(device, fsdp=cfg.fsdp, param_dtype=AUTOCAST.get(cfg.precision))  # validated below
    method = get_method(cfg.method)
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      augment=cfg.augment, download=cfg.download, **cfg.dataset_options)
    cfg = resolve(cfg, ds.defaults, ds.default_model)
    out = Path(out) if out is not None else None
    saved = _check_resumable(out, resume) if out is not None else None
    dist.barrier()  # every rank has read the checkpoint before rank 0 writes a new one
    if saved is not None:
        if diff := _config_mismatch(TrainConfig.from_dict(saved["config"]), cfg):
            raise FlatminError(f"cannot resume {out}: the configuration differs ({'; '.join(diff)})")
        if (out / "metrics.json").exists() and saved["epoch"] >= cfg.epochs:
            return json.loads((out / "metrics.json").read_text()) if dist.is_main else None
    if progress is None:
        progress = sys.stderr.isatty() and dist.is_main

    torch.manual_seed(cfg.seed)
    try:
        model = create_model(cfg.model, num_classes=ds.num_classes, in_channels=ds.input_shape[0],
                             input_shape=ds.input_shape, dropout=cfg.dropout if method.dropout else 0.0)
    except ValueError as err:  # a model that cannot take this data's shape (cnn1d on images)
        raise ConfigError(f"model {cfg.model} does not fit {cfg.dataset} (inputs {tuple(ds.input_shape)}, "
                          f"{ds.num_classes} classes): {err}") from None
    model.to(device)
    check_model(model, ds, cfg.model)
    if saved is not None:
        # before wrapping: DDP broadcasts the loaded weights, FSDP shards them
        _resume_part(out, cfg, lambda: model.load_state_dict(saved["model"]))
    net = dist.wrap(model, cfg.ddp_local_ascent, method.unused_params(cfg))
    try:
        opt = method.build_optimizer(model.parameters(), cfg)  # after wrapping: FSDP's sharded parameters
        opt.bind_model(model)  # what a rule learns from the modules (SAM-ON's norm layers, Flat-LoRA's LoRA)
    except ValueError as err:  # an optimizer argument out of range: the user's input
        raise ConfigError(str(err)) from None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    for split in (ds.train, ds.val, ds.test):
        if split is not None:
            split.x, split.y = split.x.to(device), split.y.to(device)
    ctx = StepContext(cfg, method, scaler, device, _input_range(ds), dist, method.predictor(model, opt, cfg))

    history: list[dict[str, Any]] = []
    start, elapsed = 0, 0.0
    if saved is not None:
        own = dist.local_optimizer_state  # FSDP: this rank's shards of the saved full state
        _resume_part(out, cfg, lambda: opt.load_state_dict(own(opt, saved["optimizer"])))
        scaler.load_state_dict(saved["scaler"])
        history, start, elapsed = list(saved["history"]), int(saved["epoch"]), float(saved["time_s"])
    if out is not None and dist.is_main:  # only now: every check of the data and model has passed
        out.mkdir(parents=True, exist_ok=True)
    logger = _logger(out, cfg, history, start, resumed=saved is not None) if dist.is_main else None
    if cfg.compile:
        net = torch.compile(net)

    step_logger = logger if cfg.tensorboard else None
    last_save = time.perf_counter()
    tracker = run_health.Tracker(cfg.epochs, tracker_steps(ds, cfg), math.log(ds.num_classes))
    for past in history:  # a resumed run's epochs: their events are in the log already
        tracker.update(past)
    tracker.start(opt)
    try:
        for epoch in range(start, cfg.epochs):
            te = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch)
            record = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch)}
            record.update(run_epoch(net, model, opt, ds, epoch, ctx, progress, step_logger))
            record.update(tracker.skips(opt))  # skipped steps, if any (counters read at the epoch's end)
            record["epoch_time_s"] = time.perf_counter() - te
            for name, split in (("val", ds.val), ("test", ds.test)) if _evaluates(cfg, epoch) else ():
                if split is not None and dist.evaluates:  # θ is the same on every rank (FSDP: all evaluate)
                    m = evaluate(model, split, ds, ctx)
                    record.update({f"{name}_{k}": m[k] for k in ("error", "nll", "ece")})
            history.append(record)
            events = tracker.update(record)  # loss spikes, a late collapse, skips: run_health
            saves = out is not None and _saves(epoch, start, cfg.epochs, time.perf_counter() - last_save)
            if out is not None and dist.world_size > 1:  # clocks differ: one rank's "due" is every rank's
                saves = bool(dist.all_reduce_sum(torch.tensor([float(saves)], device=device)) > 0)
            state = dist.full_state(model, opt) if saves else None  # FSDP: gathered, collective
            if out is not None and dist.is_main:
                logger.log_epoch(epoch + 1, record)
                logger.log_events(events)
            if saves and dist.is_main:
                last_save = time.perf_counter()
                ckpt.save_checkpoint(out / ckpt.CHECKPOINT, {
                    "config": cfg.to_dict(), "epoch": epoch + 1, "model": state[0],
                    "optimizer": state[1], "scaler": scaler.state_dict(), "history": history,
                    "time_s": elapsed + time.perf_counter() - t0, "num_classes": ds.num_classes,
                    "input_shape": list(ds.input_shape)})
            if progress:
                print(_summary(record), file=sys.stderr)
    except NonFiniteLossError:
        if logger is not None:  # the run stops: its log says where and how many steps were skipped
            logger.log_events(tracker.stopped(epoch + 1, opt))
        raise
    finally:
        if logger is not None:
            logger.close()
    time_s = elapsed + time.perf_counter() - t0
    result = _finish(model, ds, ctx, history, out, time_s) if dist.evaluates else None
    dist.barrier()  # no rank returns before metrics.json is written
    return result if dist.is_main else None


def _resume_part(out: Path | None, cfg: TrainConfig, load: Any) -> None:
    """Load one part of a checkpoint; weights of another model or method are one message."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise FlatminError(f"cannot resume {out}: its checkpoint does not fit {cfg.model}/{cfg.method} "
                           f"({first}); choose another --out") from None


def _logger(out: Path | None, cfg: TrainConfig, history: list[dict[str, Any]], start: int,
            resumed: bool) -> RunLogger | None:
    """The run's log: a resumed run keeps log.jsonl up to its checkpoint (rebuilt from the
    checkpoint's history if the file lost or garbled its epochs) and drops what came after."""
    if out is None:
        return None
    if resumed:
        try:
            intact = read_epochs(out)[:start] == history
        except FlatminError:
            intact = False
        if not intact:
            ckpt.atomic_write_text(out / LOG, "".join(_jsonl(h) for h in history))
    return RunLogger(out, tensorboard=cfg.tensorboard, resume_epoch=start if resumed else None)


def _finish(model: nn.Module, ds: Dataset, ctx: StepContext, history: list[dict[str, Any]],
            out: Path | None, time_s: float) -> dict[str, Any]:
    """Final-epoch metrics on train/val/test, the best epoch chosen on validation, provenance."""
    cfg = ctx.cfg
    test_logits: list[Tensor] = []
    val_logits: list[Tensor] = []
    result: dict[str, Any] = {"test": evaluate(model, ds.test, ds, ctx, reliability=True, keep=test_logits)}
    result["reliability"] = {"test": result["test"].pop("reliability")}
    result["val"] = evaluate(model, ds.val, ds, ctx, keep=val_logits) if ds.val is not None else None
    if ds.val is not None:  # NLL and ECE after temperature scaling fitted on val (error is unchanged)
        t = fit_temperature(torch.cat(val_logits), ds.val.y.cpu())
        scaled = classification_metrics(torch.cat(test_logits) / t, ds.test.y.cpu())
        result["test_ts"] = {"temperature": t, **{k: scaled[k] for k in ("error", "nll", "ece")}}
    result["train"] = evaluate(model, ds.train, ds, ctx)
    if ds.val is not None and history:
        best = min((h for h in history if "val_error" in h), key=lambda h: (h["val_error"], h["val_nll"]))
        result["best_val_epoch"] = {
            "epoch": best["epoch"], "chosen_on": "val",
            "val": {k: best[f"val_{k}"] for k in ("error", "nll", "ece")},
            "test": {k: best[f"test_{k}"] for k in ("error", "nll", "ece")}}
    result.update({
        "config": cfg.to_dict(), "epochs_completed": len(history), "time_s": time_s,
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        "versions": versions(), "git_commit": git_commit(), "device": device_name(ctx.device),
        "world_size": ctx.dist.world_size,
        "health": run_health.assess(history, cfg.epochs, tracker_steps(ds, cfg), math.log(ds.num_classes))})
    if ds.classes is not None:  # class id -> name (image folders, CSV text labels): the mapping of the run
        result["classes"] = list(ds.classes)
    if out is not None and ctx.dist.is_main:
        ckpt.write_json(out / "metrics.json", result)
    return result


def tracker_steps(ds: Dataset, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch (what run health measures overflow skips against)."""
    return run_health.steps_per_epoch(len(ds.train), cfg.batch_size)


def _jsonl(record: dict[str, Any]) -> str:
    """One log line."""
    return json.dumps(record) + "\n"


def _summary(r: dict[str, Any]) -> str:
    """One human line per epoch."""
    test = f" test err {r['test_error']:.2f}% nll {r['test_nll']:.3f}" if "test_error" in r else ""
    return (f"epoch {r['epoch']}: loss {r['train_loss']:.4f} train err {r['train_error']:.2f}%"
            f"{test} ({r['epoch_time_s']:.1f}s)")

"""Everything only a GPU can show, in one command: host syncs, step-cost ratios, memory, fp16 overflow.

    python benchmarks/device_check.py --json device_check.json          # on a GPU: ≈ 5 minutes
    python benchmarks/device_check.py --device cpu --quick              # the reduced CPU version (CI)

1. **Syncs** — each method's step under ``torch.cuda.set_sync_debug_mode("error")`` (on CPU: the
   dispatch counter `flatmin.optim.syncs.count_syncs`): "pass", or the op that synced.
2. **Step cost** — median step time over ``--steps`` steps after warm-up (CUDA events; on CPU the
   clock), every method on its own copy of the model, round-robin so drift hits all alike, for
   fp32, bf16 autocast, fp16 + GradScaler, channels_last and torch.compile; ratio to a plain torch
   SGD loop (``erm_plain``) and the optimizer's share of the step (the step's time outside
   forward/backward). Goal: exact AMP/ERM ≤ 2.02 at fp32 and bf16 on PreActResNet18 b=128.
3. **Memory** — peak allocated memory of each method over ERM's, in parameter sizes (goal ≤ 1
   for AMP/SAM). On CPU: the bytes each optimizer holds across steps instead.
4. **fp16 overflow** — a step whose scaled gradients overflow: skipped, θ bit-identical, the
   scale backed off.
5. **Augmentation** — images/s of crop/flip, Cutout and AutoAugment on the device.

Writes JSON (``--json``) and prints one table per part. The base optimizer is fused SGD where the
device supports it (its skip of a non-finite step costs nothing); ``--unfused`` measures the
snapshot-and-mask fallback instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin.data.augment import build_transform
from flatmin.models import create_model
from flatmin.optim import ERM, RMP, SAM, Pass, build_amp, drive
from flatmin.optim.driver import head_size
from flatmin.optim.syncs import count_syncs

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "channels_last": None,
            "compile": torch.bfloat16}


def rules(fused: bool) -> dict[str, Callable[[Any], Any]]:
    """Every method the check times, on any parameters (ERM through the driver included)."""
    sgd = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
    amp = dict(epsilon=0.5, inner_lr=1.0, **sgd)
    return {
        "erm_driver": lambda p: ERM(p, **sgd),
        "amp": lambda p: build_amp(p, "exact", **amp),
        "sam": lambda p: SAM(p, rho=0.05, **sgd),
        "asam": lambda p: SAM(p, rho=0.5, adaptive=True, **sgd),
        "rmp": lambda p: RMP(p, radius=0.1, **sgd),
        "amp_onepass": lambda p: build_amp(p, "onepass", **amp),
        "amp_reuse": lambda p: build_amp(p, "reuse", reuse_every=5, **amp),
        "amp_subbatch": lambda p: build_amp(p, "subbatch", ascent_fraction=0.5, **amp),
    }


class Timer:
    """Elapsed time of device work: CUDA events (no sync until read) or the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pairs: list[tuple[Any, Any]] = []

    def mark(self) -> Any:
        """A point in the device's stream."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        """Seconds between two marks (reading CUDA events waits for them, outside the timed steps)."""
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


class Contender:
    """One method on its own copy of the model: a step function and its timings."""

    def __init__(self, name: str, model: nn.Module, make: Callable | None, precision: str,
                 x: Tensor, y: Tensor, timer: Timer, fused: bool = True) -> None:
        self.name, self.model, self.x, self.y, self.timer = name, model, x, y, timer
        self.dtype = AUTOCAST[precision]
        self.device = x.device
        self.scaler = torch.amp.GradScaler(x.device.type, enabled=precision == "fp16")
        self.opt = make(model.parameters()) if make else torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
        self.fb: list[tuple[Any, Any]] = []
        self.steps: list[tuple[Any, Any]] = []

    def autocast(self) -> Any:
        """The forward pass's precision."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _pass(self, n: int) -> Tensor:
        """Forward and backward on the first n examples, timed."""
        a = self.timer.mark()
        with self.autocast():
            loss = F.cross_entropy(self.model(self.x[:n]).float(), self.y[:n])
        self.scaler.scale(loss).backward()
        self.fb.append((a, self.timer.mark()))
        return loss.detach()

    def step(self) -> None:
        """One training step: a plain torch loop for ``erm_plain``, the step driver otherwise."""
        a = self.timer.mark()
        if self.name == "erm_plain":
            self.opt.zero_grad(set_to_none=True)
            self._pass(len(self.x))
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            def grad_pass(p: Pass) -> Tensor:
                self.opt.zero_grad(set_to_none=True)
                return self._pass(head_size(len(self.x), p.fraction))
            drive(self.opt, grad_pass, scaler=self.scaler)
        self.steps.append((a, self.timer.mark()))

    def reset(self) -> None:
        """Forget warm-up timings."""
        self.fb.clear()
        self.steps.clear()

    def medians(self) -> tuple[float, float]:
        """Median step seconds and the median share of a step spent outside forward/backward."""
        steps = [self.timer.seconds(a, b) for a, b in self.steps]
        fb = [self.timer.seconds(a, b) for a, b in self.fb]
        per_step = len(fb) // max(1, len(steps))
        fb_per_step = [sum(fb[i * per_step:(i + 1) * per_step]) for i in range(len(steps))]
        share = statistics.median((s - f) / s for s, f in zip(steps, fb_per_step))
        return statistics.median(steps), share


def input_shape(model_name: str) -> tuple[int, ...]:
    """One example's shape: a sequence for the 1-D models, a 32x32 RGB image for the others."""
    return (1, 40) if model_name in ("cnn1d", "mlp") else (3, 32, 32)


def skipped(model_name: str, precision: str) -> str | None:
    """Why a cell cannot run (channels_last is a layout of 4-D NCHW batches only), else None."""
    if precision == "channels_last" and len(input_shape(model_name)) != 3:
        dims = len(input_shape(model_name)) + 1
        return (f"channels_last skipped for {model_name}: its batches are {dims}-D and channels_last "
                "applies to 4-D (image) batches only")
    return None


def batch(args: argparse.Namespace, model_name: str,
          device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    """A model from the registry and one random batch of its input shape."""
    shape = input_shape(model_name)
    torch.manual_seed(0)
    model = create_model(model_name, 10, input_shape=shape).to(device).train()
    x = torch.randn(args.batch_size, *shape, device=device)
    return model, x, torch.randint(0, 10, (args.batch_size,), device=device)


def check_syncs(model: nn.Module, x: Tensor, y: Tensor, fused: bool) -> dict[str, str]:
    """Each method's steps in the strictest mode the device has: "pass", or what synced."""
    out = {}
    for name, make in rules(fused).items():
        c = Contender(name, copy.deepcopy(model), make, "fp32", x, y, Timer(x.device))
        c.step()  # warm-up: state is created
        try:
            if x.is_cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for _ in range(3):
                        c.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                out[name] = "pass"
            else:
                with count_syncs() as log:
                    for _ in range(3):
                        c.step()
                out[name] = "pass" if not len(log) else log.describe().splitlines()[0]
        except RuntimeError as err:
            out[name] = f"synced: {str(err).splitlines()[0]}"
    return out


def step_costs(args: argparse.Namespace, model_name: str, precision: str, methods: list[str],
               device: torch.device, fused: bool) -> dict[str, Any]:
    """Round-robin timing of the methods at one precision; ratios to the plain SGD loop."""
    model, x, y = batch(args, model_name, device)
    if precision == "channels_last":
        cl = torch.channels_last
        model, x = model.to(memory_format=cl), x.contiguous(memory_format=cl)
    timer, table = Timer(device), rules(fused)
    runs = []
    for name in ["erm_plain", *methods]:
        m = copy.deepcopy(model)
        c = Contender(name, m, table.get(name), precision, x, y, timer, fused)
        if precision == "compile":
            c.model = torch.compile(m)
        runs.append(c)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            for c in runs:
                c.reset()
        for c in runs:
            c.step()
    base, _ = runs[0].medians()
    out: dict[str, Any] = {}
    for c in runs:
        sec, share = c.medians()
        out[c.name] = {"s_per_step": sec, "over_erm": sec / base, "optimizer_share": share}
    return out


def memory(args: argparse.Namespace, model_name: str, device: torch.device, fused: bool) -> dict[str, Any]:
    """Peak allocated bytes over ERM's, in parameter sizes (CUDA); bytes held across steps (CPU)."""
    model, x, y = batch(args, model_name, device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out, peaks = {}, {}
    for name in ["erm_plain", *rules(fused)]:
        c = Contender(name, copy.deepcopy(model), rules(fused).get(name), "fp32", x, y, Timer(device), fused)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for _ in range(3):
                c.step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
        else:
            for _ in range(3):
                c.step()
            held = getattr(c.opt, "held_buffers", list)()
            peaks[name] = sum(t.numel() * t.element_size() for t in held)
        del c
    for name, peak in peaks.items():
        out[name] = {"bytes": peak, "over_erm_in_params": (peak - peaks["erm_plain"]) / param_bytes}
    out["param_bytes"] = param_bytes
    out["measure"] = "peak allocated during 3 steps" if device.type == "cuda" else "bytes held across steps"
    return out


def fp16_overflow(model_name: str, device: torch.device, fused: bool) -> dict[str, Any]:
    """A step whose scaled gradients overflow: skipped on the device, θ exact, scale backed off."""
    shape = input_shape(model_name)
    model = create_model(model_name, 10, input_shape=shape).to(device).train()
    x, y = torch.randn(8, *shape, device=device), torch.randint(0, 10, (8,), device=device)
    opt = rules(fused)["amp"](model.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    huge = {"on": False}

    def grad_pass(p: Pass) -> Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss * (1e38 if huge["on"] and p.kind == "final" else 1.0)).backward()
        return loss.detach()

    drive(opt, grad_pass, scaler=scaler)
    theta = [p.detach().clone() for p in model.parameters()]
    scale = float(scaler.get_scale())
    huge["on"] = True
    drive(opt, grad_pass, scaler=scaler)
    same = all(torch.equal(a, p) for a, p in zip(theta, model.parameters()))
    return {"theta_bit_identical": same, "scale_before": scale, "scale_after": float(scaler.get_scale()),
            "backed_off": float(scaler.get_scale()) < scale}


def augmentation(device: torch.device, images: int) -> dict[str, float]:
    """Images/s of each batched augmentation (best of 3 passes, batch 128)."""
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, device=device)
    out = {}
    for augment in ("standard", "cutout", "autoaugment"):
        transform = build_transform("cifar10", augment, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
        g = torch.Generator(device=device).manual_seed(0)
        transform(data[:128], train=True, generator=g)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, images, 128):
                transform(data[i:i + 128], train=True, generator=g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[augment] = images / best
    return out


def plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, list[str]]]:
    """(model, precision, methods) cells: the full matrix on the small model, the core on the big one."""
    everything = list(rules(True))
    if args.quick:
        return [(args.models[0], "fp32", everything), (args.models[0], "bf16", ["amp", "sam"])]
    cells = [(args.models[0], p, everything) for p in ("fp32", "bf16", "fp16", "channels_last")]
    cells.append((args.models[0], "compile", ["erm_driver", "amp", "sam"]))
    for big in args.models[1:]:
        cells += [(big, p, ["erm_driver", "amp", "sam"]) for p in ("fp32", "bf16")]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None, help="first: full matrix; rest: core only")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (median)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="the reduced version (CPU, CI)")
    parser.add_argument("--unfused", action="store_true", help="time the snapshot-and-mask skip path")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    args.models = args.models or (["cnn1d"] if cpu else ["preactresnet18", "wrn28_10"])
    args.batch_size = args.batch_size or (32 if cpu else 128)
    args.steps = args.steps or (5 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    fused = not args.unfused
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if not cpu else "cpu",
                           "torch": torch.__version__, "batch_size": args.batch_size, "fused_base": fused,
                           "steps": args.steps, "warmup": args.warmup}
    model, x, y = batch(args, args.models[0], device)
    out["syncs"] = check_syncs(model, x, y, fused)
    print("syncs:", ", ".join(f"{k} {v}" for k, v in out["syncs"].items()))
    out["step_cost"], out["skipped"] = {}, {}
    for model_name, precision, methods in plan(args, device):
        if why := skipped(model_name, precision):
            out["skipped"][f"{model_name}/{precision}"] = why
            print(f"{model_name:16s} {precision:13s} {why}")
            continue
        cell = step_costs(args, model_name, precision, methods, device, fused)
        out["step_cost"][f"{model_name}/{precision}"] = cell
        print(f"{model_name:16s} {precision:13s} " + "  ".join(
            f"{k} {v['over_erm']:.2f}x ({100 * v['optimizer_share']:.0f}% opt)" for k, v in cell.items()))
    out["memory"] = memory(args, args.models[0], device, fused)
    print("memory over ERM (params):", ", ".join(f"{k} {v['over_erm_in_params']:.2f}" for k, v in
                                                 out["memory"].items() if isinstance(v, dict)))
    out["fp16_overflow"] = fp16_overflow(args.models[0], device, fused)
    print("fp16 overflow:", out["fp16_overflow"])
    out["augment_images_per_s"] = augmentation(device, 512 if args.quick else 20_000)
    print("augmentation img/s:", {k: round(v) for k, v in out["augment_images_per_s"].items()})
    amp = out["step_cost"].get(f"{args.models[0]}/fp32", {}).get("amp", {}).get("over_erm")
    out["goals"] = {"amp_over_erm_fp32<=2.02": amp is not None and amp <= 2.02,
                    "zero_syncs": all(v == "pass" for v in out["syncs"].values()),
                    "amp_sam_extra_memory<=1x_params": all(
                        out["memory"][m]["over_erm_in_params"] <= 1.0 + 1e-9 for m in ("amp", "sam")),
                    "fp16_overflow_skipped": out["fp16_overflow"]["theta_bit_identical"]
                    and out["fp16_overflow"]["backed_off"]}
    print("goals:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in out["goals"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()

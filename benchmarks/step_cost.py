"""Per-step cost of ERM, AMP, SAM, RMP, efficient AMP variants and SAM's family on one model and batch.

    python benchmarks/step_cost.py --model preactresnet18 --batch-size 50 --json OUT.json

Every method trains a copy of the same model on the same synthetic batch, round-robin (one step
of each in turn, so load drift on a shared machine hits all alike). Phase 1 times whole steps
(one synchronisation per step); phase 2 times the optimizer's own work (everything the step
driver does besides forward/backward: perturb, restore, non-finite flag, guarded base step).
``erm`` is a plain torch SGD loop; ``erm_driver`` is ERM through the driver (the guard's cost).
Reuse AMP and LookSAM (k = --reuse-every) are amortised: (refresh + (k−1)·reuse step)/k.
Also timed: ``authors_amp_step``, the authors' per-tensor Python loop whose ``clip_coef < 1``
branch syncs the host once per tensor. Targets are reported, not
asserted: AMP/ERM ≤ 2.05, optimizer arithmetic ≤ 3% of a step, variants ≤ 1.3× ERM.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin.models import create_model
from flatmin.optim import ERM, RMP, SAM, Pass, build_amp, drive
from flatmin.optim.driver import head_size, sub_batch
from flatmin.optim.rules import BSAM, ESAM, GSAM, MSAM, WSAM, FriendlySAM, LookSAM

SHAPES = {"cnn1d": (1, 40), "mlp": (1, 40)}  # others: CIFAR-shaped (3, 32, 32)
SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
AMORTISED = ("amp_reuse", "looksam")  # (exact step + (k−1)·reuse step)/k, k = --reuse-every


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock reading means the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Accumulates optimizer and forward/backward time of one step (phase 2 only)."""

    def __init__(self, device: torch.device, split: bool) -> None:
        self.device, self.split, self.opt, self.fb = device, split, 0.0, 0.0

    def run(self, kind: str, fn: Callable[[], object]) -> None:
        """Run fn; when splitting, time it between two synchronisations."""
        if not self.split:
            fn()
            return
        sync(self.device)
        t = time.perf_counter()
        fn()
        sync(self.device)
        setattr(self, kind, getattr(self, kind) + time.perf_counter() - t)


def fwd_bwd(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One gradient pass (grads are zeroed by the caller)."""
    F.cross_entropy(model(x), y).backward()


def erm_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, clock: Clock) -> int:
    """Plain SGD: one pass, one update."""
    opt.zero_grad(set_to_none=True)
    clock.run("fb", lambda: fwd_bwd(model, x, y))
    clock.run("opt", opt.step)
    return 1


def protocol_step(model: nn.Module, opt, x: Tensor, y: Tensor, clock: Clock) -> int:
    """Any flatmin rule through the one step driver (what the trainer runs); returns the passes."""
    fb_before = clock.fb

    def grad_pass(p: Pass) -> Tensor:
        part = sub_batch(head_size(len(x), p.fraction), p.split, p.splits)
        xs, ys = (x[part], y[part]) if p.select is None else (x[p.select], y[p.select])
        opt.zero_grad(set_to_none=True)
        clock.run("fb", lambda: fwd_bwd(model, xs, ys))
        return torch.zeros(())

    def probe(_: object) -> tuple[Tensor, Tensor]:  # ESAM's selection: a forward at θ+ε (θ's loss reused)
        out: list[Tensor] = []
        clock.run("fb", lambda: out.append(F.cross_entropy(model(x), y, reduction="none").detach()))
        return out[0] * 0, out[0]

    run = lambda: drive(opt, grad_pass, probe=probe, sub_batches=len(x))  # noqa: E731
    if not clock.split:
        return len(run())
    sync(clock.device)
    t = time.perf_counter()
    passes = len(run())
    sync(clock.device)
    clock.opt += time.perf_counter() - t - (clock.fb - fb_before)  # the driver's own work
    return passes


@torch.no_grad()
def authors_amp_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, clock: Clock,
                     epsilon: float = 0.5, inner_lr: float = 1.0, inner_iter: int = 1) -> int:
    """The released AMP step (N = 1), per tensor; ``clip_coef < 1`` reads a GPU value per tensor."""
    params = [p for g in opt.param_groups for p in g["params"]]
    dev: dict[Tensor, Tensor] = {}

    def passes() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            fwd_bwd(model, x, y)

    def ascend(i: int) -> None:
        for p in params:
            if p.grad is not None:
                if i == 0:
                    dev[p] = torch.zeros_like(p.grad)
                d = dev[p] + inner_lr * p.grad
                clip_coef = epsilon / (d.norm() + 1e-12)
                d = clip_coef * d if clip_coef < 1 else d
                p.sub_(dev[p]).add_(d)
                dev[p] = d

    def restore_and_step() -> None:
        for p in params:
            if p.grad is not None:
                p.sub_(dev[p])
        opt.step()

    clock.run("fb", passes)
    for i in range(inner_iter):
        clock.run("opt", lambda i=i: ascend(i))
        clock.run("fb", passes)
    clock.run("opt", restore_and_step)
    return 1 + inner_iter


def methods(model: nn.Module, k: int, f: float) -> dict[str, tuple[Callable, torch.optim.Optimizer]]:
    """Each method's step function and optimizer, each on its own copy of the model."""
    amp = dict(epsilon=0.5, inner_lr=1.0, **SGD)
    build = {
        "erm": (erm_step, lambda p: torch.optim.SGD(p, **SGD)),
        "erm_driver": (protocol_step, lambda p: ERM(p, **SGD)),  # the guarded update, no perturbation
        "amp": (protocol_step, lambda p: build_amp(p, "exact", **amp)),
        "sam": (protocol_step, lambda p: SAM(p, rho=0.05, **SGD)),
        "rmp": (protocol_step, lambda p: RMP(p, radius=0.1, **SGD)),
        "amp_reuse": (protocol_step, lambda p: build_amp(p, "reuse", reuse_every=k, **amp)),
        "amp_subbatch": (protocol_step, lambda p: build_amp(p, "subbatch", ascent_fraction=f, **amp)),
        "amp_onepass": (protocol_step, lambda p: build_amp(p, "onepass", **amp)),
        "authors_amp": (authors_amp_step, lambda p: torch.optim.SGD(p, **SGD)),
        # SAM's family (flatmin.optim.rules); LookSAM's k is --reuse-every (amortised like amp_reuse)
        "gsam": (protocol_step, lambda p: GSAM(p, rho=0.05, **SGD)),
        "fsam": (protocol_step, lambda p: FriendlySAM(p, rho=0.05, **SGD)),
        "looksam": (protocol_step, lambda p: LookSAM(p, rho=0.05, k=k, **SGD)),
        "wsam": (protocol_step, lambda p: WSAM(p, rho=0.05, **SGD)),
        "bsam": (protocol_step, lambda p: BSAM(p, num_data=50000, lr=0.5, weight_decay=SGD["weight_decay"])),
        "esam": (protocol_step, lambda p: ESAM(p, rho=0.05, beta=0.5, **SGD)),  # SWP only (γ = 1)
        "esam_sds": (protocol_step, lambda p: ESAM(p, rho=0.05, beta=0.5, gamma=0.5, **SGD)),  # the authors'
        "sam_m4": (protocol_step, lambda p: SAM(p, rho=0.05, splits=4, **SGD)),  # m-sharpness, m = B/4
        "msam": (protocol_step, lambda p: MSAM(p, rho=0.3, **SGD)),
    }
    out = {}
    for name, (step, make) in build.items():
        m = copy.deepcopy(model)
        out[name] = (m, step, make(m.parameters()))
    return out


def setup(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor, torch.device]:
    """The model (from the registry) and one synthetic batch of the right shape."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    shape = tuple(args.input_shape or SHAPES.get(args.model, (3, 32, 32)))
    model = create_model(args.model, args.num_classes, input_shape=shape).to(device).train()
    x = torch.randn(args.batch_size, *shape, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    return model, x, y, device


def time_steps(runs: dict, x: Tensor, y: Tensor, device: torch.device, args: argparse.Namespace):
    """Phase 1: (seconds, passes) of whole steps; phase 2: (optimizer s, forward/backward s)."""
    times: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
    split: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    n_timed = max(args.steps, args.reuse_every)  # reuse: at least one refresh among the timed steps
    for i in range(args.warmup + n_timed):
        for name, (m, step, opt) in runs.items():
            sync(device)
            t = time.perf_counter()
            passes = step(m, opt, x, y, Clock(device, split=False))
            sync(device)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - t, passes))
    for _ in range(args.steps):
        for name, (m, step, opt) in runs.items():
            clock = Clock(device, split=True)
            step(m, opt, x, y, clock)
            split[name].append((clock.opt, clock.fb))
    return times, split


def measure(args: argparse.Namespace) -> dict:
    """Run both phases and gather the numbers the JSON reports."""
    model, x, y, device = setup(args)
    runs = methods(model, args.reuse_every, args.ascent_fraction)
    times, split = time_steps(runs, x, y, device, args)

    def per_step(name: str) -> float:
        if name not in AMORTISED:
            return statistics.median(t for t, _ in times[name])
        refresh = statistics.median(t for t, p in times[name] if p > 1)
        reuse = statistics.median(t for t, p in times[name] if p == 1)
        return (refresh + (args.reuse_every - 1) * reuse) / args.reuse_every

    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    sec = {name: per_step(name) for name in runs}
    out = {"model": args.model, "batch_size": args.batch_size, "input_shape": list(x.shape[1:]),
           "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "param_tensors": len(params), "param_bytes": param_bytes, "reuse_every": args.reuse_every,
           "ascent_fraction": args.ascent_fraction, "warmup": args.warmup,
           "timed_steps": len(times["erm"]), **sec}
    out.update({f"{name}_over_erm": sec[name] / sec["erm"] for name in runs if name != "erm"})
    best = {name: min(t for t, _ in times[name]) for name in runs}  # a cross-check robust to contention
    out["min_over_erm"] = {name: best[name] / best["erm"] for name in runs
                           if name != "erm" and name not in AMORTISED}
    out["optimizer"], out["memory"] = {}, {}
    sgd_opt = statistics.median(a for a, _ in split["erm"])  # the base update every method pays
    for name, (_, _, opt) in runs.items():
        o, fb = (statistics.median(v) for v in zip(*split[name]))
        out["optimizer"][name] = {"opt_s": o, "fwd_bwd_s": fb, "opt_share": o / (o + fb),
                                  "extra_over_sgd_share": (o - sgd_opt) / (o + fb)}
        held = sum(t.numel() * t.element_size() for t in getattr(opt, "held_buffers", list)())
        out["memory"][name] = {"held_bytes": held, "over_params": held / param_bytes}
    out["memory"]["authors_amp"] = {"held_bytes": param_bytes, "over_params": 1.0}  # 'dev' per tensor
    out["authors_opt_over_ours"] = out["optimizer"]["authors_amp"]["opt_s"] / out["optimizer"]["amp"]["opt_s"]
    amp_opt = out["optimizer"]["amp"]
    out["targets"] = {"amp_over_erm<=2.05": out["amp_over_erm"] <= 2.05,
                      "amp_opt_share<=0.03": amp_opt["opt_share"] <= 0.03,
                      "amp_extra_over_sgd_share<=0.03": amp_opt["extra_over_sgd_share"] <= 0.03,
                      **{f"{v}_over_erm<=1.3": out[f"{v}_over_erm"] <= 1.3
                         for v in ("amp_reuse", "amp_subbatch", "amp_onepass")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--input-shape", type=int, nargs="+", default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method and phase")
    parser.add_argument("--reuse-every", type=int, default=5)
    parser.add_argument("--ascent-fraction", type=float, default=0.5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = measure(args)
    print(f"{out['model']} b={out['batch_size']} on {out['device']} ({out['param_tensors']} tensors)")
    print(f"{'method':14s} {'s/step':>9s} {'×ERM':>6s} {'min ×ERM':>8s} {'opt s':>9s} {'opt %':>6s} "
          f"{'extra %':>7s} {'mem ×params':>11s}")
    for name in out["optimizer"]:
        ratio = 1.0 if name == "erm" else out[f"{name}_over_erm"]
        opt, mem = out["optimizer"][name], out["memory"].get(name, {}).get("over_params", 0.0)
        low = out["min_over_erm"].get(name, 1.0 if name == "erm" else float("nan"))
        print(f"{name:14s} {out[name]:9.4f} {ratio:6.2f} {low:8.2f} {opt['opt_s']:9.5f} "
              f"{100 * opt['opt_share']:5.1f}% {100 * opt['extra_over_sgd_share']:6.1f}% {mem:11.2f}")
    print(f"authors' per-tensor loop, optimizer time / ours: {out['authors_opt_over_ours']:.2f}×")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in out["targets"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()

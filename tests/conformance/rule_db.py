"""The conformance matrix's database, in the style of torch's ``optim_db``: one `RuleCase` per example
setting of every rule in `flatmin.optim.registry`, and the routes that drive one step.

Nothing here names a rule: a rule registered in its own file (with its ``examples`` and ``neutral``
setting) is run through every cell of tests/conformance/ without a line written for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin.optim import registry
from flatmin.optim.driver import Pass, drive, head_size, sub_batch
from flatmin.optim.registry import RuleInfo

BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)  # SGD with momentum and decay: every state exercised
N = 12  # examples per batch (sub-batches, heads and selections all non-trivial)


@dataclass(frozen=True)
class RuleCase:
    """One setting of one rule: what the matrix builds and drives."""

    info: RuleInfo
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        """``gsam[rho=0.05,alpha=0.4]``: readable in pytest's ids."""
        return f"{self.info.name}[{','.join(f'{k}={v}' for k, v in self.kwargs.items())}]"

    def build(self, params: Any, **changes: Any) -> Any:
        """The optimizer around SGD (bSAM: its own update), with this case's keywords and ``changes``."""
        return self.info.build(params, torch.optim.SGD, **{**BASE, **self.kwargs, **changes})

    def neutral(self) -> dict[str, Any] | None:
        """This case with the rule's neutral setting (≡ the base optimizer), None when it has none."""
        return None if self.info.neutral is None else {**self.kwargs, **self.info.neutral}

    @property
    def splits(self) -> int:
        """m-sharpness sub-batches (1: the whole batch)."""
        return int(self.kwargs.get("splits", 1))

    @property
    def selects(self) -> bool:
        """ESAM-style data selection: the final pass needs per-example losses."""
        return float(self.kwargs.get("gamma", 1.0)) < 1 and self.info.name == "esam"

    def routes(self) -> list[str]:
        """The routes that can drive this case (the matrix's columns it applies to)."""
        out = ["drive", "two_call"]
        if not self.selects:
            out += ["closure", "peers"]
        if self.splits == 1 and not self.selects:
            out.append("bare_two_call")
        if self.splits == 1 and not self.selects and hasattr(self.info.cls, "first_step"):
            out.append("first_second")
        return out


CASES = [RuleCase(info, dict(ex)) for info in registry.rules().values() for ex in info.examples]


def model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny MLP: two weight matrices and two biases (groups, norms and kept state all non-trivial)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Batch ``step`` (a fixed sequence, the same for every route)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(N, 4, generator=g).to(dtype), torch.randint(0, 3, (N,), generator=g)


class Poison:
    """Multiplies the loss of chosen passes of a step by a value (NaN, inf, or a huge finite factor)."""

    def __init__(self, value: float | None = None, which: str = "none") -> None:
        self.value, self.which, self.passes = value, which, []

    def __call__(self, loss: Tensor, index: int, last: bool) -> Tensor:
        """The loss of pass ``index`` (``last``: the final pass), poisoned where asked."""
        self.passes.append(index)
        hit = (self.which == "first" and index == 0) or (self.which == "last" and last) or self.which == "all"
        return loss * self.value if hit and self.value is not None else loss


class Step:
    """Drives one step of ``opt`` on (x, y) by a named route; every route computes the same passes."""

    def __init__(self, net: nn.Module, opt: Any, case: RuleCase, scaler: Any = None,
                 autocast: torch.dtype | None = None) -> None:
        self.net, self.opt, self.case, self.scaler, self.autocast = net, opt, case, scaler, autocast

    def loss(self, x: Tensor, y: Tensor, per_example: bool = False) -> Tensor:
        """Cross-entropy (per example when asked), under autocast when the case's precision says so."""
        if self.autocast is None:
            return F.cross_entropy(self.net(x), y, reduction="none" if per_example else "mean")
        with torch.autocast("cpu", dtype=self.autocast):
            out = F.cross_entropy(self.net(x).float(), y, reduction="none" if per_example else "mean")
        return out

    def backward(self, loss: Tensor) -> None:
        """loss.backward(), scaled when a GradScaler is in use."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def run(self, route: str, x: Tensor, y: Tensor, poison: Poison | None = None) -> None:
        """One step by ``route``."""
        getattr(self, route)(x, y, poison or Poison())

    # -- the routes ------------------------------------------------------------------------

    def drive(self, x: Tensor, y: Tensor, poison: Poison) -> None:
        """`flatmin.optim.driver.drive` with sub-batches and a probe: the trainer's own route."""
        def grad_pass(p: Pass) -> Any:
            sl = sub_batch(len(x), p.split, p.splits)
            xs, ys = x[sl], y[sl]
            if p.ascent and p.fraction < 1:
                k = head_size(len(xs), p.fraction)
                xs, ys = xs[:k], ys[:k]
            if p.select is not None:
                xs, ys = xs.index_select(0, p.select), ys.index_select(0, p.select)
            self.opt.zero_grad(set_to_none=True)
            per = self.loss(xs, ys, per_example=True)
            loss = poison(per.mean(), p.index, p.kind == "final" and p.split == p.splits - 1)
            self.backward(loss)
            return per.detach(), loss

        def probe(first: Any) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                return first[0], self.loss(x, y, per_example=True)

        drive(self.opt, grad_pass, scaler=self.scaler, sub_batches=True,
              probe=probe if self.opt.select_share() < 1 else None)

    def closure(self, x: Tensor, y: Tensor, poison: Poison) -> None:
        """``opt.step(closure)`` with a closure that slices as the rule asks (ascent head, sub-batch)."""
        count = [0]
        total = self.case.splits * (1 + self.opt.ascent_passes()) if self.case.splits > 1 else None

        def closure(ascent: bool = False, split: int = 0, splits: int = 1) -> Tensor:
            sl = sub_batch(len(x), split, splits)
            xs, ys = x[sl], y[sl]
            if ascent:
                xs, ys = xs[:self.opt.ascent_size(len(xs))], ys[:self.opt.ascent_size(len(ys))]
            self.opt.zero_grad()
            index = count[0]
            count[0] += 1
            last = (index == total - 1) if total else not ascent and self._last_pass(index)
            loss = poison(self.loss(xs, ys), index, last)
            loss.backward()
            return loss
        self.opt.step(closure)

    def peers(self, x: Tensor, y: Tensor, poison: Poison) -> None:
        """The peers' loop: ``loss.backward(); opt.step(closure)`` with a closure that neither zeroes
        the gradients nor is called for the first pass when the rule can take the caller's gradient."""
        count = [0]

        def closure(ascent: bool = False, split: int = 0, splits: int = 1) -> Tensor:
            sl = sub_batch(len(x), split, splits)
            xs, ys = x[sl], y[sl]
            if ascent:
                xs, ys = xs[:self.opt.ascent_size(len(xs))], ys[:self.opt.ascent_size(len(ys))]
            last = self.opt._ascents >= self.opt.ascent_passes()  # the final pass of the (only) split
            loss = poison(self.loss(xs, ys), count[0], last and split == splits - 1)
            count[0] += 1
            loss.backward()
            return loss
        self.loss(x, y).backward()  # the caller's own first pass (never poisoned: the closure's passes are)
        self.opt.step(closure)
        self.calls = count[0]

    def bare_two_call(self, x: Tensor, y: Tensor, poison: Poison) -> None:
        """The README's no-closure loop copied as written: no ``zero_grad`` before the first backward nor
        after ``restore_and_step`` (a step must leave no gradient to leak into the next)."""
        opt, index = self.opt, 0
        opt.begin_step()
        for _ in range(opt.ascent_passes()):
            k = opt.ascent_size(len(x))
            self.backward(poison(self.loss(x[:k], y[:k]), index, False))
            index += 1
            opt.perturb()
            opt.zero_grad()
        self.backward(poison(self.loss(x, y), index, True))
        opt.restore_and_step()

    def _last_pass(self, index: int) -> bool:
        """Whether pass ``index`` of a one-batch closure step is its final pass."""
        return index == self.opt.ascent_passes()

    def two_call(self, x: Tensor, y: Tensor, poison: Poison) -> None:
        """``begin_step``, ``perturb`` after each ascent backward, ``next_split``, ``restore_and_step``."""
        opt, index, g = self.opt, 0, self.scaler
        scale = None if g is None or not g.is_enabled() else g._scale
        opt.zero_grad(set_to_none=True)
        opt.begin_step()
        for s in range(self.case.splits):
            sl = sub_batch(len(x), s, self.case.splits)
            xs, ys = x[sl], y[sl]
            if s:
                opt.next_split()
            before = None
            for _ in range(opt.ascent_passes()):
                k = opt.ascent_size(len(xs))
                per = self.loss(xs[:k], ys[:k], per_example=True)
                before = per.detach()
                self.backward(poison(per.mean(), index, False))
                index += 1
                opt.perturb(scale)
                opt.zero_grad(set_to_none=True)
            if opt.select_share() < 1:
                with torch.no_grad():
                    idx = opt.select(before, self.loss(xs, ys, per_example=True))
                xs, ys = xs.index_select(0, idx), ys.index_select(0, idx)
            self.backward(poison(self.loss(xs, ys), index, s == self.case.splits - 1))
            index += 1
        opt.restore_and_step(scaler=g)
        opt.zero_grad(set_to_none=True)

    def first_second(self, x: Tensor, y: Tensor, poison: Poison) -> None:
        """The popular collection's ``first_step(zero_grad=True)`` / ``second_step(zero_grad=True)``."""
        self.opt.zero_grad(set_to_none=True)
        poison(self.loss(x, y), 0, False).backward()
        self.opt.first_step(zero_grad=True)
        poison(self.loss(x, y), 1, True).backward()
        self.opt.second_step(zero_grad=True)


def tensors(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in a nested state dict, by path (the guard's counters left out: they count skips)."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "guard":
                out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def snapshot(net: nn.Module, opt: Any) -> dict[str, Tensor]:
    """θ and every tensor the optimizer would checkpoint."""
    return {**{f"θ/{n}": p.detach().clone() for n, p in net.named_parameters()}, **tensors(opt.state_dict())}


def same(a: dict[str, Tensor], b: dict[str, Tensor], skip: Callable[[str], bool] = lambda k: False) -> list:
    """The paths where two snapshots differ (bit for bit), or exist in one only."""
    keys = [k for k in set(a) | set(b) if not skip(k)]
    return sorted(k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k]))

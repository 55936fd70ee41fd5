"""Run health: the instabilities a run records as it trains, so a table never hides a collapsed run.

Fed once per epoch with the values the loop already has (the epoch's mean training loss and the
optimizer's skip counters, read at the epoch's end where the loop polls anyway: no host sync inside a
step), a `Tracker` returns the epoch's events; the loop writes them to log.jsonl, one record each
(``{"event": KIND, "epoch": e, ...values}``), and `assess` turns a run's epoch records into the
``health`` block of metrics.json: ``status`` ("ok", "unstable", "collapsed"), ``events``, ``counts``.

Events:

* ``spike``: the epoch's training loss is at least ``SPIKE_RATIO`` × its running minimum (the
  lowest loss of the epochs before) and at least ``LOSS_FLOOR`` — a collapse; or, when the chance
  loss ln K (K classes) is known, the loss is back at ``CHANCE_SHARE`` × ln K after the run had got
  under ``LEARNED_SHARE`` × ln K (a collapse from a high running minimum, which no ratio catches).
  One episode is one event; ``recovered`` follows at the first epoch back at or under the
  pre-spike minimum.
* ``late_collapse``: the final epoch's training loss is at least ``LATE_RATIO`` × the best of the
  run and at least ``LOSS_FLOOR``: the run ended collapsed (unrecovered); ``at_chance``: the final
  loss is back at ``CHANCE_SHARE`` × ln K after the run had learned (it ended where a uniform guess
  is); ``never_learned``: the final loss is at ``CHANCE_SHARE`` × ln K and the run never got under
  ``LEARNED_SHARE`` × ln K in a run of at least ``MIN_EPOCHS`` epochs (a far too high learning rate
  diverging from the first epochs: at lr 0.2 on
  MNIST-1D, 2 of 10 ERM runs ended at 90 % test error this way; a mean over seeds would hide them
  as surely as a collapse, so they count as collapsed runs).
* ``nonfinite_skips``: steps the optimizer skipped for a NaN/inf loss or gradient (under the
  trainer's "raise" policy the run then stops, with this event as the last line of its log);
  ``overflow_skips``: more than ``OVERFLOW_SHARE`` of an epoch's steps skipped for a loss-scale
  overflow, after the first epoch (where a GradScaler finds its scale: those are expected).

Status: "collapsed" with a spike or a late collapse (a spike that recovered is still a collapse: it
changed the trajectory), else "unstable" with skips, else "ok".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Ordinary epochs of ERM/AMP/SAM on MNIST-1D (lr 0.1) rise at most 2.45× over their running minimum
# (AMP seed 2, epoch 18: 0.431 after 0.176); the collapse of issue 27 rose ~11× (0.17 → 1.86).
SPIKE_RATIO = 4.0
LOSS_FLOOR = 0.1  # nats: at a constant lr, late epochs of ERM/AMP wiggle 3–4.4× at losses 0.009 → 0.038
LATE_RATIO = 2.0  # a step-decayed run ends at its best loss (1.00× in every ordinary run seen)
OVERFLOW_SHARE = 0.1
# ln K is the loss of a uniform guess: 0.9 ln K is "back at chance" (2.07 for 10 classes); having been
# under 0.5 ln K (1.15) the run had learned. ERM lr 0.3 seed 1 on MNIST-1D went 0.94 → 2.40 (2.55×).
CHANCE_SHARE = 0.9
LEARNED_SHARE = 0.5
MIN_EPOCHS = 10  # `never_learned` judges runs of at least this many epochs (a 2-epoch smoke run has not yet)
STATUSES = ("ok", "unstable", "collapsed")
COLLAPSES = ("spike", "late_collapse", "at_chance", "never_learned")
SKIPS = ("nonfinite_skips", "overflow_skips")


@dataclass(frozen=True)
class Thresholds:
    """The detector's settings (recorded in every health block, so a status can be re-checked)."""

    spike_ratio: float = SPIKE_RATIO
    loss_floor: float = LOSS_FLOOR
    late_ratio: float = LATE_RATIO
    overflow_share: float = OVERFLOW_SHARE
    chance_share: float = CHANCE_SHARE
    learned_share: float = LEARNED_SHARE
    min_epochs: int = MIN_EPOCHS


def is_spike(loss: float, running_min: float, t: Thresholds = Thresholds()) -> bool:
    """A k-fold rise over the best loss so far, and high in absolute terms: a collapse, not noise."""
    if not math.isfinite(loss):
        return True  # a NaN/inf epoch mean is the worst collapse there is
    return math.isfinite(running_min) and loss >= t.spike_ratio * running_min and loss >= t.loss_floor


def back_to_chance(loss: float, running_min: float, chance: float | None,
                   t: Thresholds = Thresholds()) -> bool:
    """Back at a uniform guess's loss after having learned: a collapse however high the minimum was."""
    return (chance is not None and running_min <= t.learned_share * chance
            and loss >= t.chance_share * chance)


def never_learned(final: float, best: float, chance: float | None, t: Thresholds = Thresholds()) -> bool:
    """The run ends at chance and never learned: its best loss stayed above ``learned_share`` × ln K."""
    if chance is None:
        return False
    return not final < t.chance_share * chance and not best < t.learned_share * chance


def is_late_collapse(final: float, best: float, t: Thresholds = Thresholds()) -> bool:
    """The run ends well above its best loss: it did not recover from whatever happened."""
    if not math.isfinite(final):
        return True
    return math.isfinite(best) and final >= t.late_ratio * best and final >= t.loss_floor


def overflow_burst(overflows: int, steps: int | None, epoch: int, t: Thresholds = Thresholds()) -> bool:
    """Many loss-scale overflows after the first epoch: fp16 cannot hold this run's gradients."""
    return epoch > 1 and steps is not None and overflows > t.overflow_share * steps


def status(events: Iterable[Mapping[str, Any]]) -> str:
    """collapsed > unstable > ok: the worst thing that happened, in one word."""
    kinds = {e["event"] for e in events}
    if kinds & set(COLLAPSES):
        return "collapsed"
    return "unstable" if kinds & set(SKIPS) else "ok"


@dataclass
class Tracker:
    """Fed every epoch's record, in order; returns that epoch's events (the loop logs them)."""

    epochs: int
    steps_per_epoch: int | None = None
    chance: float | None = None  # ln K, the loss of a uniform guess over K classes (None: not known)
    thresholds: Thresholds = field(default_factory=Thresholds)
    events: list[dict[str, Any]] = field(default_factory=list)
    running_min: float = math.inf
    max_rise: float = 0.0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIPS, 0))  # all, bursts or not
    _open: dict[str, Any] | None = None  # the spike episode not yet recovered
    _seen: tuple[int, int] | None = None  # the optimizer's (non-finite, overflow) counters last read

    def skips(self, opt: Any) -> dict[str, int]:
        """The epoch's skipped steps as record fields (only those that happened), from the optimizer's
        counters (read at the epoch's end, where the loop already syncs)."""
        total, overflow = int(getattr(opt, "skipped_steps", 0)), int(getattr(opt, "overflow_steps", 0))
        now = (total - overflow, overflow)
        before, self._seen = self._seen or (0, 0), now
        out = {"nonfinite_skips": now[0] - before[0], "overflow_skips": now[1] - before[1]}
        return {k: v for k, v in out.items() if v > 0}

    def start(self, opt: Any) -> None:
        """A resumed run: count skips from the optimizer's restored counters on."""
        total, overflow = int(getattr(opt, "skipped_steps", 0)), int(getattr(opt, "overflow_steps", 0))
        self._seen = (total - overflow, overflow)

    def stopped(self, epoch: int, opt: Any) -> list[dict[str, Any]]:
        """A run stopped by a non-finite step (the "raise" policy): the skips of its last epoch."""
        n = self.skips(opt).get("nonfinite_skips", 0)
        new = [{"event": "nonfinite_skips", "epoch": epoch, "steps": n, "stopped": True}] if n else []
        self.skipped["nonfinite_skips"] += n
        self.events += new
        return new

    def update(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One epoch's record (``epoch``, ``train_loss``, skip counts): the events it raises."""
        t, epoch, loss = self.thresholds, int(record["epoch"]), float(record["train_loss"])
        new: list[dict[str, Any]] = []
        for k in SKIPS:
            self.skipped[k] += int(record.get(k, 0))
        if n := record.get("nonfinite_skips", 0):
            new.append({"event": "nonfinite_skips", "epoch": epoch, "steps": int(n)})
        if overflow_burst(n := record.get("overflow_skips", 0), self.steps_per_epoch, epoch, t):
            new.append({"event": "overflow_skips", "epoch": epoch, "steps": int(n),
                        "of_steps": self.steps_per_epoch})
        if math.isfinite(self.running_min) and self.running_min > 0:
            self.max_rise = max(self.max_rise, loss / self.running_min if math.isfinite(loss) else math.inf)
        fall = back_to_chance(loss, self.running_min, self.chance, t)
        if self._open is None and (is_spike(loss, self.running_min, t) or fall):
            self._open = {"event": "spike", "epoch": epoch, "train_loss": _num(loss),
                          "running_min": _num(self.running_min), "ratio": _ratio(loss, self.running_min),
                          **_extra(record), **({"to_chance": True} if fall else {})}
            new.append(self._open)
        elif self._open is not None and loss <= (self._open["running_min"] or math.inf):
            new.append({"event": "recovered", "epoch": epoch, "train_loss": loss,
                        "spike_epoch": self._open["epoch"]})
            self._open = None
        self.running_min = min(self.running_min, loss) if math.isfinite(loss) else self.running_min
        if epoch == self.epochs and is_late_collapse(loss, self.running_min, t):
            new.append({"event": "late_collapse", "epoch": epoch, "train_loss": _num(loss),
                        "best": _num(self.running_min), "ratio": _ratio(loss, self.running_min)})
        if epoch == self.epochs and back_to_chance(loss, self.running_min, self.chance, t):
            new.append({"event": "at_chance", "epoch": epoch, "train_loss": _num(loss),
                        "chance": self.chance})
        if epoch == self.epochs >= t.min_epochs and never_learned(loss, self.running_min, self.chance, t):
            new.append({"event": "never_learned", "epoch": epoch, "train_loss": _num(loss),
                        "best": _num(self.running_min), "chance": self.chance})
        self.events += new
        return new

    def report(self) -> dict[str, Any]:
        """The ``health`` block of metrics.json."""
        counts = {**{k: sum(1 for e in self.events if e["event"] == k) for k in COLLAPSES}, **self.skipped}
        return {"status": status(self.events), "events": list(self.events), "counts": counts,
                "max_rise": self.max_rise if math.isfinite(self.max_rise) else None,
                "thresholds": asdict(self.thresholds)}


def assess(history: Iterable[Mapping[str, Any]], epochs: int, steps_per_epoch: int | None = None,
           chance: float | None = None) -> dict:
    """The health block of a run from its epoch records (a resumed run's, or an old run's log)."""
    tracker = Tracker(epochs, steps_per_epoch, chance)
    for record in history:
        tracker.update(record)
    return tracker.report()


def describe(event: Mapping[str, Any]) -> str:
    """One event in words, for the tables' per-run lines."""
    kind, e = event["event"], event["epoch"]
    if kind == "spike":
        err = f", train error {event['train_error']:.1f}%" if event.get("train_error") is not None else ""
        err += ", back at chance" if event.get("to_chance") else ""
        return (f"loss spike at epoch {e}: {_g(event['train_loss'])} = {_times(event['ratio'])} its "
                f"running minimum {_g(event['running_min'])}{err}")
    if kind == "recovered":
        return f"back under the pre-spike minimum at epoch {e} ({_g(event['train_loss'])})"
    if kind == "late_collapse":
        return (f"ended collapsed: final loss {_g(event['train_loss'])} = {_times(event['ratio'])} the "
                f"best {_g(event['best'])}")
    if kind == "never_learned":
        return (f"never learned: final loss {_g(event['train_loss'])}, best {_g(event['best'])}, chance "
                f"ln K = {event['chance']:.3g}")
    if kind == "at_chance":
        return f"ended at chance: final loss {_g(event['train_loss'])} ≈ ln K = {event['chance']:.3g}"
    if kind == "nonfinite_skips":
        stop = ", the run stopped" if event.get("stopped") else ""
        return f"{event['steps']} non-finite step(s) skipped in epoch {e}{stop}"
    if kind == "overflow_skips":
        return f"{event['steps']} of {event['of_steps']} steps skipped for loss-scale overflow in epoch {e}"
    return f"{kind} at epoch {e}"


def summary(health: Mapping[str, Any]) -> str:
    """A run's events in one line; a spike not followed by its recovery says 'not recovered'."""
    parts, events = [], list(health.get("events") or [])
    for i, ev in enumerate(events):
        text = describe(ev)
        back = any(x["event"] == "recovered" and x.get("spike_epoch") == ev["epoch"] for x in events[i:])
        if ev["event"] == "spike" and not back:
            text += ", not recovered"
        parts.append(text)
    return "; ".join(parts) or "no events"


def _ratio(loss: float, base: float) -> float | None:
    """loss ÷ base, None where undefined (JSON has no inf)."""
    return loss / base if base > 0 and math.isfinite(loss) and math.isfinite(base) else None


def _num(x: float) -> float | None:
    """A float for JSON: None for NaN/inf (metrics.json and log.jsonl stay strict JSON)."""
    return x if math.isfinite(x) else None


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last batch may be short)."""
    return -(-n_train // batch_size)


def _times(ratio: float | None) -> str:
    return f"{ratio:.1f}×" if ratio is not None else "∞×"


def _extra(record: Mapping[str, Any]) -> dict[str, Any]:
    """The epoch's training error, when the record has it (what a reader checks first)."""
    return {"train_error": record["train_error"]} if "train_error" in record else {}

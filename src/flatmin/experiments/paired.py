"""What a `flatmin compare` run supports: paired comparisons with the baseline over seeds, what
the runs cost in CPU time (and whether the machine was oversubscribed), and the summary files.

Runs arrive as ``{label: [result, ...]}`` (one result per seed, each with its ``config``).
"""

from __future__ import annotations

import math
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatmin.experiments import health
from flatmin.results import stats
from flatmin.results.plot import write_json
from flatmin.results.stats import Comparison
from flatmin.train.timing import measure_configs

METRICS = ("error", "nll", "ece")
TS_METRICS = ("nll_ts", "ece_ts")  # after temperature scaling fitted on val (runs that recorded it)
UNITS = {"error": " points", "nll": "", "ece": "", "nll_ts": "", "ece_ts": ""}
DIGITS = {"error": 2, "nll": 3, "ece": 3, "nll_ts": 3, "ece_ts": 3}
BUSY_WAIT = 0.1  # a run that spent more than this share of its wall time waiting for a core


def per_seed(runs: list[dict[str, Any]], metric: str, split: str = "test") -> dict[int, float]:
    """{seed: final-epoch metric}: the pairing key is the seed (``nll_ts``: test NLL after temperature
    scaling, from the ``test_ts`` block)."""
    if metric.endswith("_ts"):
        metric, split = metric[:-3], f"{split}_ts"
    return {r["config"]["seed"]: r[split][metric] for r in runs if r.get(split)}


def metrics_of(groups: dict[str, list[dict[str, Any]]]) -> tuple[str, ...]:
    """The metrics every run has: error, NLL, ECE, and the temperature-scaled pair where all recorded it."""
    scaled = all(r.get("test_ts") for runs in groups.values() for r in runs)
    return METRICS + (TS_METRICS if scaled else ())


def comparisons(groups: dict[str, list[dict[str, Any]]], baseline: str) -> list[Comparison]:
    """Every other label vs ``baseline`` on each metric, Holm-adjusted per metric."""
    base = groups[baseline]
    return stats.adjust([stats.compare(label, baseline, m, per_seed(runs, m), per_seed(base, m))
                         for m in metrics_of(groups) for label, runs in groups.items() if label != baseline])


def method_stats(groups: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per label and metric: mean, std (n − 1) and n over seeds, test split."""
    out = {}
    for label, runs in groups.items():
        out[label] = {}
        for m in metrics_of(groups):
            vals = list(per_seed(runs, m).values())
            mean, sd = stats.mean_std(vals)
            out[label][m] = {"mean": mean, "std": sd, "n": len(vals)}
    return out


def ci_cell(c: Comparison) -> str:
    """'−0.78 [−1.19, −0.37]' (the mean paired difference and its 95% interval)."""
    d = DIGITS[c.metric]
    if c.n < 2:
        return f"{c.diff_mean:+.{d}f} (n={c.n})" if c.n else "—"
    return f"{c.diff_mean:+.{d}f} [{c.ci95[0]:+.{d}f}, {c.ci95[1]:+.{d}f}]"


def verdict_line(c: Comparison, holm_family: int, notes: dict[str, str] | None = None) -> str:
    """One sentence a reviewer can check: difference, interval, both p-values, the verdict, and how many
    runs of either side collapsed (``notes``: label -> '1 of 10 amp runs collapsed: seed 23')."""
    d = DIGITS[c.metric]
    line = (f"{c.method} vs {c.baseline}, test {c.metric}: {ci_cell(c)}{UNITS[c.metric]} (95% CI), "
            f"p_t={_p(c.p_t)}, p_perm={_p(c.p_perm)} -> {c.verdict}")
    if c.verdict.startswith("no detectable") and math.isfinite(c.detectable):
        line += f" (this run could detect about ±{c.detectable:.{d}f}{UNITS[c.metric]})"
    elif holm_family > 1 and not c.p_holm < stats.ALPHA:
        line += f" (not after Holm over {holm_family} methods: p={_p(c.p_holm)})"
    return line + health.verdict_note(c.method, c.baseline, notes or {})


def verdict_lines(comps: list[Comparison], notes: dict[str, str] | None = None) -> str:
    """Verdict lines for every comparison, and the conventions behind them."""
    family = len({c.method for c in comps})
    n = sorted({c.n for c in comps})
    lines = [verdict_line(c, family, notes) for c in comps]
    lines.append(f"paired by seed (n={', '.join(map(str, n))}); 'better'/'worse' only where the 95% CI "
                 "of the paired difference excludes 0; detectable = 80% power, two-sided α=0.05")
    if n and n[0] <= 5:
        lines.append(f"sign-flip p-values are exact over 2^n patterns; at n={n[0]} the smallest possible is "
                     f"{2 / 2 ** n[0]:.4g}")
    if family > 1:
        lines.append(f"{family} methods compared with {comps[0].baseline}: Holm-adjusted p_t per metric in "
                     "summary.json; a verdict that does not survive Holm says so")
    return "\n".join(lines)


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3g}"


def run_cost(groups: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per label: mean CPU seconds per run (process time of the worker around training, evaluation
    included), its ratio to the baseline's, and the mean CPU/wall share (1 = a core of its own)."""
    out: dict[str, dict[str, Any]] = {}
    for label, runs in groups.items():
        costs = [r["cost"] for r in runs if r.get("cost") and not r["cost"].get("resumed")]
        cpu = statistics.fmean(c["cpu_s"] for c in costs) if costs else math.nan
        share = statistics.fmean(c["cpu_s"] / c["wall_s"] for c in costs) if costs else math.nan
        waits = [c["wait_s"] / c["wall_s"] for c in costs if c.get("wait_s") is not None]
        out[label] = {"runs_timed": len(costs), "cpu_s": cpu, "cpu_over_wall": share,
                      "wait_over_wall_max": max(waits, default=math.nan),
                      "load_max": max((c.get("load_end") or 0.0 for c in costs), default=math.nan),
                      "cores": costs[0]["cores"] if costs else None}
    base = out.get(baseline, {}).get("cpu_s", math.nan)
    for v in out.values():
        v["cpu_over_baseline"] = v["cpu_s"] / base if base and math.isfinite(base) else math.nan
    return out


def oversubscribed(cost: dict[str, dict[str, Any]]) -> str | None:
    """A warning when runs waited for a core (Linux run-queue delay) or the load exceeded the cores."""
    waits = [v["wait_over_wall_max"] for v in cost.values() if math.isfinite(v["wait_over_wall_max"])]
    loads = [(v["load_max"], v["cores"]) for v in cost.values() if v["cores"]]
    worst = max(waits, default=0.0)
    load, cores = max(loads, default=(0.0, 1))
    if worst <= BUSY_WAIT and load <= cores:
        return None
    waited = f"a run spent {worst:.0%} of its wall time waiting for a core; " if waits else ""
    return (f"warning: the machine was oversubscribed during the runs ({waited}load average up to "
            f"{load:.1f} on {cores} cores): wall times measure the machine, not the methods; the cost "
            "columns use CPU time")


def step_cost(configs: dict[str, Any], epochs: int,
              stop: threading.Event | None = None) -> dict[str, dict[str, float]]:
    """A dedicated measurement: every label's training epochs interleaved in this one thread (drift
    hits all alike), CPU seconds per optimizer step, median over ``epochs`` timed epochs."""
    labels, threads = list(configs), torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        contenders = measure_configs([configs[k] for k in labels], epochs, stop)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for label, c in zip(labels, contenders):
        out[label] = {"cpu_s_per_step": statistics.median(c.cpu_times) / c.steps,
                      "wall_s_per_step": statistics.median(c.times) / c.steps,
                      "passes_per_step": statistics.fmean(c.passes), "epochs_timed": len(c.times),
                      "cpu_epochs_s": c.cpu_times}
    return out


def step_ratios(cost: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, float]]:
    """Per label: CPU per step ÷ the baseline's (median) and the spread of the per-epoch ratios."""
    base = cost[baseline]["cpu_epochs_s"]
    out = {}
    for label, v in cost.items():
        ratios = [a / b for a, b in zip(v["cpu_epochs_s"], base)]
        out[label] = {"ratio": v["cpu_s_per_step"] / cost[baseline]["cpu_s_per_step"],
                      "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def write_summary(out: Path, payload: dict[str, Any], markdown: str) -> list[Path]:
    """summary.json (for tools; NaN as null) and summary.md (for people)."""
    (out / "summary.md").write_text(markdown)
    return [write_json(out / "summary.json", payload), out / "summary.md"]


@dataclass
class Evidence:
    """Everything `flatmin compare` says beyond mean ± std: paired verdicts, cost, seed rounds."""

    baseline: str
    comps: list[Comparison]
    methods: dict[str, dict[str, dict[str, float]]]
    runs: dict[str, dict[str, Any]]
    steps: dict[str, dict[str, Any]]
    rounds: list[dict[str, Any]]
    cap: int | None
    health: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # the runs, for run health

    @classmethod
    def gather(cls, groups: dict[str, list[dict[str, Any]]], baseline: str, configs: dict[str, Any],
               cost_epochs: int, rounds: list[dict[str, Any]], cap: int | None,
               steps: dict[str, dict[str, float]] | None = None) -> Evidence:
        """Comparisons from the runs; the step cost (``steps``, else measured now: ``cost_epochs`` epochs
        per spec)."""
        comps = comparisons(groups, baseline) if len(groups) > 1 else []
        if steps is None:
            steps = step_cost(configs, cost_epochs) if cost_epochs > 0 else {}
        return cls(baseline, comps, method_stats(groups), run_cost(groups, baseline), steps, rounds, cap,
                   groups)

    def columns(self) -> dict[str, dict[str, str]]:
        """Extra table columns: Δ error vs the baseline with its CI, step CPU and run CPU ratios."""
        b = self.baseline
        cols = {f"Δ error vs {b} [95% CI]": {c.method: ci_cell(c) for c in self.comps if c.metric == "error"}}
        if self.steps:
            cols[f"step CPU / {b}"] = {k: f"{v['ratio']:.2f}× ({v['ratio_min']:.2f}–{v['ratio_max']:.2f})"
                                       for k, v in step_ratios(self.steps, b).items()}
        cols[f"run CPU / {b}"] = {k: f"{v['cpu_over_baseline']:.2f}×" for k, v in self.runs.items()
                                  if math.isfinite(v["cpu_over_baseline"])}
        return {**cols, **health.columns(self.health)}  # threads per run, collapsed runs

    def text(self) -> str:
        """Verdict lines, how cost was measured, any oversubscription warning, the seed rounds."""
        notes = {k: health.collapsed_note(k, v) for k, v in self.health.items()}
        lines = [verdict_lines(self.comps, notes)] if self.comps else []
        if self.steps:
            some = next(iter(self.steps.values()))
            lines.append("step CPU: CPU time per optimizer step, every spec's epochs interleaved in one "
                         f"thread (torch on 1 thread), median of {some['epochs_timed']} timed epochs after a "
                         "warm-up (range: per-epoch ratios); run CPU: worker CPU time per run, evaluation "
                         "included")
        if warning := oversubscribed(self.runs):
            lines.append(warning)
        if self.rounds:
            last = self.rounds[-1]
            how = ("the CI excludes 0" if last["verdict"] in ("better", "worse")
                   else f"the cap of {self.cap} seeds was reached with the CI still including 0")
            path = " -> ".join(str(r["seeds"]) for r in self.rounds)
            lines.append(f"seeds auto: {path} seeds; stopped because {how}. Looking after every batch "
                         "makes the 95% level optimistic (optional stopping): confirm on fresh seeds")
        return "\n".join(lines)

    def payload(self, configs: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
        """summary.json: per method/metric mean, std, n; per comparison the issue's fields; the rest."""
        first = next(iter(configs.values()))
        return {
            "dataset": first.dataset, "model": first.model, "baseline": self.baseline, "seeds": seeds,
            "split": "test", "epoch": "final", "methods": self.methods,
            "comparisons": [c.summary() for c in self.comps],
            "details": [{"method": c.method, "metric": c.metric, "n": c.n, "detectable": c.detectable,
                         "p_holm": c.p_holm} for c in self.comps],
            "conventions": {
                "ci95": "Student t on the per-seed paired differences (method − baseline)",
                "p_t": "two-sided paired t-test", "p_holm": "Holm over the methods, per metric",
                "p_perm": f"two-sided sign-flip of the mean difference: exact over 2^n patterns for n <= "
                          f"{stats.EXACT_MAX_N}, else {stats.MC_SAMPLES} seeded Monte Carlo draws",
                "detectable": f"{stats.POWER:.0%} power, two-sided alpha {stats.ALPHA}, observed spread",
                "verdict": "better/worse only when ci95 excludes 0; lower error, NLL, ECE is better"},
            "cost": {"runs": self.runs, "steps": self.steps,
                     "step_over_baseline": step_ratios(self.steps, self.baseline) if self.steps else {},
                     "oversubscribed": oversubscribed(self.runs)},
            "health": health.payload(self.health),
            "auto_seeds": {"cap": self.cap, "rounds": self.rounds} if self.cap is not None else None}

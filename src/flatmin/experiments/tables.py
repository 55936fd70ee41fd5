"""Paper-style tables (mean ± std over seeds) in Markdown, from finished runs of the store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flatmin.experiments import health
from flatmin.experiments.paired import ci_cell
from flatmin.experiments.runner import ALL_METHOD_FIELDS, METHOD_FIELDS
from flatmin.results import stats
from flatmin.results.stats import Comparison, mean_std

# Fields that name a table cell, not a setting (seeds are averaged over).
IDENTITY = ("seed", "dataset", "model", "augment", "method", "device", "data_dir", "download",
            "eval_batch_size", "eval_every")
PAPER_ORDER = ("erm", "dropout", "label_smoothing", "flooding", "mixup", "adv_training", "rmp", "amp",
               "sam", "asam")
NAMES = {"erm": "ERM", "dropout": "Dropout", "label_smoothing": "Label smoothing", "flooding": "Flooding",
         "mixup": "MixUp", "adv_training": "Adv. training", "rmp": "RMP", "amp": "AMP", "sam": "SAM",
         "asam": "ASAM"}


def pm(values: list[float], digits: int) -> str:
    """'mean ± std' with a fixed number of decimals ('—' when there is nothing)."""
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """What distinguishes a run from its seed-mates: config less identity and other methods' fields."""
    own = METHOD_FIELDS.get(config["method"], ())
    return {k: v for k, v in config.items()
            if k not in IDENTITY and (k not in ALL_METHOD_FIELDS or k in own)}


@dataclass
class Group:
    """The runs of one (dataset, model, augment, method, settings) cell, one per seed."""

    dataset: str
    model: str
    augment: str
    method: str
    settings: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    tuned: bool = False

    def values(self, split: str, metric: str) -> list[float]:
        return [r["metrics"][split][metric] for r in self.runs if r["metrics"].get(split)]

    def by_seed(self, split: str, metric: str) -> dict[int, float]:
        return {r["seed"]: r["metrics"][split][metric] for r in self.runs if r["metrics"].get(split)}


def versus(group: Group, erm: Group, metric: str) -> Comparison:
    """``group`` vs ``erm`` on a test metric: paired on the common seeds when at least two match,
    else Welch's unpaired interval."""
    a, b = group.by_seed("test", metric), erm.by_seed("test", metric)
    if len(set(a) & set(b)) >= 2:
        return stats.compare(group.label, erm.label, metric, a, b)
    return stats.compare_unpaired(group.label, erm.label, metric, list(a.values()), list(b.values()))


def versus_erm(groups: list[Group], metric: str) -> dict[int, Comparison]:
    """id(group) -> its comparison with the ERM group of its column, Holm-adjusted per column."""
    out: dict[int, Comparison] = {}
    for col in {(g.dataset, g.model, g.augment) for g in groups}:
        here = [g for g in groups if (g.dataset, g.model, g.augment) == col]
        erm = next((g for g in here if g.method == "erm"), None)
        if erm is not None:
            others = [g for g in here if g is not erm]
            for g, c in zip(others, stats.adjust([versus(g, erm, metric) for g in others])):
                out[id(g)] = c
    return out


def mark(c: Comparison | None) -> str:
    """' better' / ' worse' (with '*' when Holm over the column's methods does not keep it), or ''."""
    if c is None or c.verdict not in ("better", "worse"):
        return ""
    return f" {c.verdict}" + ("" if c.p_holm < stats.ALPHA else "*")


MARK_LEGEND = ("'better'/'worse': the 95% CI of the difference to ERM in the same column excludes 0 "
               "(paired by seed on the common seeds; Welch where fewer than two seeds match); * not "
               "significant after Holm's adjustment over the column's methods; unmarked: no detectable "
               "difference at n seeds.\n")


def group_runs(rows: list[dict[str, Any]], selections: list[dict[str, Any]] = ()) -> tuple[list[Group],
                                                                                           list[Group]]:
    """(reported groups, tuning candidates not chosen); labels name what varies between groups."""
    groups: dict[tuple, Group] = {}
    for r in rows:
        s = settings(r["config"])
        key = (r["dataset"], r["model"], r["augment"], r["method"], json.dumps(s, sort_keys=True))
        groups.setdefault(key, Group(*key[:4], s)).runs.append(r)
    chosen = {(s["method"], s["dataset"], s["model"], s["augment"]): s["chosen"] for s in selections}
    kept, dropped = [], []
    for g in groups.values():
        pick = chosen.get((g.method, g.dataset, g.model, g.augment))
        if pick is not None:
            g.tuned = True
            (kept if all(g.settings.get(k) == v for k, v in pick.items()) else dropped).append(g)
        else:
            kept.append(g)
    for g in kept + dropped:
        same = [h for h in kept + dropped if h.method == g.method and h.tuned == g.tuned]
        varying = sorted(k for k in g.settings if len({json.dumps(h.settings.get(k)) for h in same}) > 1)
        extra = ", ".join(f"{k}={g.settings[k]}" for k in varying if not (g.tuned and g in kept))
        g.label = NAMES.get(g.method, g.method) + (" (tuned on val)" if g.tuned and g in kept else "") + (
            f" ({extra})" if extra else "")
    order = {m: i for i, m in enumerate(PAPER_ORDER)}
    kept.sort(key=lambda g: (order.get(g.method, 99), g.label))
    return kept, dropped


def compare_table(groups: dict[str, list[dict[str, Any]]],
                  extra: dict[str, dict[str, str]] | None = None) -> str:
    """One row per method spec: test error, NLL, ECE (mean ± std over seeds), then ``extra``
    columns ({header: {label: cell}}: differences to the baseline, cost), then val error."""
    extra = extra or {}
    rows = []
    for label, runs in groups.items():
        rows.append([label, len(runs), pm([r["test"]["error"] for r in runs], 2),
                     pm([r["test"]["nll"] for r in runs], 3), pm([r["test"]["ece"] for r in runs], 3),
                     *(col.get(label, "—") for col in extra.values()),
                     pm([r["val"]["error"] for r in runs if r.get("val")], 2)])
    return markdown(["method", "seeds", "test error (%)", "test NLL", "test ECE", *extra, "val error (%)"],
                    rows)


def health_groups(groups: list[Group]) -> dict[str, list[dict[str, Any]]]:
    """{row label and its cell: runs}, what the run-health lines name."""
    return {f"{g.label} on {g.dataset}/{g.model}" + (f"/{g.augment}" if g.augment not in ("standard", "none")
                                                     else ""): g.runs for g in groups}


def _columns(groups: list[Group]) -> list[tuple[str, str, str]]:
    return sorted({(g.dataset, g.model, g.augment) for g in groups})


def _col_name(col: tuple[str, str, str], cols: list[tuple[str, str, str]]) -> str:
    name = col[0]
    if len({c[1] for c in cols if c[0] == col[0]}) > 1 or len({c[1] for c in cols}) > 1:
        name += f" / {col[1]}"
    if col[2] not in ("standard", "none") or len({c[2] for c in cols if c[:2] == col[:2]}) > 1:
        name += f" / {col[2]}"
    return name


def table1(groups: list[Group], metric: str, digits: int) -> str:
    """Table 1: methods × datasets, test ``metric`` mean ± std over seeds (n = seeds)."""
    cols = _columns(groups)
    labels = list(dict.fromkeys(g.label for g in groups))
    cell = {(g.label, (g.dataset, g.model, g.augment)): g for g in groups}
    vs = versus_erm(groups, metric)

    def fmt(g: Group | None) -> str:
        if g is None:
            return "—"
        down = sum(health.status(r) == "collapsed" for r in g.runs)  # kept in the mean, said here
        n = f"n={len(g.runs)}" + (f", {down} collapsed" if down else "")
        return f"{pm(g.values('test', metric), digits)} ({n}){mark(vs.get(id(g)))}"

    rows = [[label] + [fmt(cell.get((label, c))) for c in cols] for label in labels]
    return markdown(["method"] + [_col_name(c, cols) for c in cols], rows)


def erm_amp_pairs(groups: list[Group]) -> list[tuple[tuple[str, str, str], Group, Group]]:
    """(dataset/augment/model cell, ERM group, AMP group) for every AMP setting beside an ERM one."""
    cells = sorted({(g.dataset, g.augment, g.model) for g in groups})
    at = {c: [g for g in groups if (g.dataset, g.augment, g.model) == c] for c in cells}
    return [(c, e, a) for c in cells for e in at[c] if e.method == "erm" for a in at[c] if a.method == "amp"]


def table2(groups: list[Group]) -> str:
    """Table 2: augmentation × model, ERM vs AMP test error and NLL (empty without both methods)."""
    def diff(e: Group, a: Group, metric: str) -> str:
        c = versus(a, e, metric)
        return f"{ci_cell(c)} {c.verdict}"

    rows = [[*c, e.label, a.label, pm(e.values("test", "error"), 2), pm(a.values("test", "error"), 2),
             diff(e, a, "error"), pm(e.values("test", "nll"), 3), pm(a.values("test", "nll"), 3),
             diff(e, a, "nll")] for c, e, a in erm_amp_pairs(groups)]
    headers = ["dataset", "augmentation", "model", "ERM row", "AMP row", "ERM error (%)", "AMP error (%)",
               "error diff [95% CI]", "ERM NLL", "AMP NLL", "NLL diff [95% CI]"]
    return markdown(headers, rows) if rows else ""


def tuning_table(selections: list[dict[str, Any]]) -> str:
    """What tuning chose, on which split and metric, and every candidate's validation score."""
    rows = []
    for s in selections:
        cands = "; ".join(f"{_kv(c['values'])}: {c['score']:.4g}" for c in s["scores"])
        rows.append([s["method"], s["dataset"], s["model"], s["augment"], _kv(s["chosen"]),
                     f"{s['split']} {s['metric']}", cands])
    return markdown(["method", "dataset", "model", "augment", "chosen", "chosen on", "candidates (mean val)"],
                    rows) if rows else ""


def _kv(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())

"""Reports of a results database: Table 1 (methods × datasets) and Table 2 (augmentation × model, ERM
vs AMP) in Markdown, what tuning chose and on which split, the AMP-vs-ERM verdicts and the figures;
`flatmin report` (`flatmin.cli.report`) prints them."""

from __future__ import annotations

from pathlib import Path

from flatmin.checks import out_dir
from flatmin.experiments import figures, health
from flatmin.experiments.paired import ci_cell
from flatmin.experiments.tables import (
    MARK_LEGEND,
    erm_amp_pairs,
    group_runs,
    health_groups,
    table1,
    table2,
    tuning_table,
    versus,
)
from flatmin.results.store import Store


def render(store: Store, figures_dir: Path | None = None) -> str:
    """The report as Markdown (and, given a folder, the per-dataset figures written there)."""
    rows = store.rows()
    if not rows:
        return f"{store.path}: no finished runs yet\n"
    sels = store.selections()
    groups, candidates = group_runs(rows, sels)
    parts = [f"# Results from {store.path} ({len(rows)} runs)\n",
             "Final-epoch test metrics, mean ± std over seeds (n = seeds).\n",
             "## Table 1: test error (%)\n", table1(groups, "error", 2),
             "\n## Table 1: test NLL\n", table1(groups, "nll", 3), "\n" + MARK_LEGEND,
             "\n## Run health\n", health.overview(health_groups(groups)) + "\n"]
    if t2 := table2(groups):
        parts += ["\n## Table 2: ERM vs AMP per augmentation and model\n", t2]
    if sels:
        parts += ["\n## Tuning (chosen on the validation split, never on test)\n", tuning_table(sels),
                  f"\n{len(candidates)} candidate settings not chosen are left out of the tables above.\n"]
    parts += ["\n## AMP vs ERM\n", verdicts(groups)]
    commits = sorted({r["git_commit"] or "?" for r in rows})
    devices = sorted({r["device"] or "?" for r in rows})
    parts.append(f"\ngit commit(s): {', '.join(commits)}; device(s): {', '.join(devices)}\n"
                 f"{health.build_line({'': rows})}\n")
    if figures_dir is not None:
        parts.append(write_figures(groups, figures_dir))
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


def verdicts(groups: list) -> str:
    """Per cell: AMP − ERM on test error and NLL with its 95% CI; 'better' only when it excludes 0."""
    lines = []
    for cell, erm, amp in erm_amp_pairs(groups):
        c = {m: versus(amp, erm, m) for m in ("error", "nll")}
        notes = {g.label: health.collapsed_note(g.label, g.runs) for g in (amp, erm)}
        lines.append(f"- {' / '.join(cell)}, {amp.label} vs {erm.label}: test error {ci_cell(c['error'])} "
                     f"points ({c['error'].verdict}), NLL {ci_cell(c['nll'])} ({c['nll'].verdict})"
                     + health.verdict_note(amp.label, erm.label, notes))
    return "\n".join(lines) + "\n" if lines else "(no cell with both ERM and AMP)\n"


def write_figures(groups: list, folder: Path) -> str:
    """Per dataset/model/augment cell: metric spread and every method's reliability diagram."""
    folder = out_dir(folder)
    written = []
    for cell in sorted({(g.dataset, g.model, g.augment) for g in groups}):
        here = {g.label: [r["metrics"] for r in g.runs] for g in groups
                if (g.dataset, g.model, g.augment) == cell}
        name = "_".join(cell)
        written.append(figures.metric_spread(here, folder / f"metrics_{name}.png"))
        written.append(figures.reliability(here, folder / f"reliability_{name}.png"))
    return "\nfigures: " + ", ".join(str(p) for p in written) + "\n"

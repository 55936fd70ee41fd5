"""flatmin compare / report and tuning: specs, selection on validation only, outputs, tables."""

import csv
import math

import pytest

from flatmin.checks import parse_seeds
from flatmin.cli import main
from flatmin.errors import FlatminError
from flatmin.experiments.compare import parse_specs
from flatmin.experiments.tables import group_runs, table1
from flatmin.experiments.tuning import Plan, candidates, choose, parse_sweep, shown_fields
from flatmin.results.store import Store
from flatmin.train import TrainConfig

FAST = ["--dataset", "spiral", "--epochs", "2", "--workers", "1", "--no-figures"]


def test_method_specs_with_fields_and_variants():
    specs = parse_specs("erm,amp:variant=reuse,reuse_every=5,sam:rho=0.1", "onepass")
    assert [(s.label, s.method, s.fields) for s in specs] == [
        ("erm", "erm", {}),
        ("amp:variant=reuse,reuse_every=5", "amp", {"amp_variant": "reuse", "reuse_every": 5}),
        ("sam:rho=0.1", "sam", {"rho": 0.1}), ("amp:variant=onepass", "amp", {"amp_variant": "onepass"})]
    with pytest.raises(FlatminError, match="unknown config field 'bogus'"):
        parse_specs("amp:bogus=1")
    with pytest.raises(FlatminError, match="twice"):
        parse_specs("erm,erm")
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7]
    with pytest.raises(FlatminError):
        parse_seeds("1,1")


def test_sweep_candidates_only_for_the_fields_a_method_uses():
    sweep = parse_sweep(["epsilon=0.1,0.5", "zeta=1", "rho=0.02,0.05"])
    assert sweep == {"epsilon": [0.1, 0.5], "inner_lr": [1.0], "rho": [0.02, 0.05]}
    assert candidates("amp", sweep) == [{"epsilon": 0.1, "inner_lr": 1.0}, {"epsilon": 0.5, "inner_lr": 1.0}]
    assert candidates("erm", sweep) == [{}]
    assert "reuse_every" not in shown_fields({**TrainConfig(method="amp").to_dict(), "amp_variant": "exact"})


def _fake_row(store: Store, key: str, eps: float, val: float, test: float) -> None:
    cfg = {**TrainConfig(method="amp", dataset="spiral", model="mlp", epsilon=eps).to_dict()}
    result = {"config": cfg, "val": {"error": val, "nll": val, "ece": 0.0},
              "test": {"error": test, "nll": test, "ece": 0.0}, "time_s": 1.0}
    store.insert(key, "amp", result, None)


def test_choose_looks_at_validation_never_at_test(tmp_path):
    store = Store(tmp_path / "r.db")
    _fake_row(store, "a", 0.1, val=10.0, test=1.0)  # best on test, worse on val
    _fake_row(store, "b", 0.5, val=5.0, test=9.0)
    task = lambda key: type("T", (), {"key": key, "config": TrainConfig(model="mlp")})()  # noqa: E731
    base = TrainConfig(method="amp", dataset="spiral")
    plan = Plan([base], [[{"epsilon": 0.1}, {"epsilon": 0.5}]], [[[task("a")], [task("b")]]], [0])
    assert choose(plan, store, "error", log=lambda s: None) == [{"epsilon": 0.5}]
    (sel,) = store.selections()
    assert sel["split"] == "val" and sel["chosen"] == {"epsilon": 0.5}
    assert [s["score"] for s in sel["scores"]] == [10.0, 5.0]
    groups, dropped = group_runs(store.rows(), store.selections())
    assert [g.label for g in groups] == ["AMP (tuned on val)"] and len(dropped) == 1
    assert "9.00 ± 0.00 (n=1)" in table1(groups, "error", 2)


def test_failed_candidates_are_never_chosen():
    from flatmin.experiments.tuning import score, select

    assert math.isinf(score([None, {"val": {"error": 1.0}}], "error"))
    assert select([{"values": 1, "score": math.inf}, {"values": 2, "score": 3.0}])["values"] == 2


def test_compare_end_to_end_with_tuning_then_rerun_trains_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", *FAST, "--methods", "erm,amp", "--seeds", "2", "--out", str(out),
            "--tune", "epsilon=0.05,0.5", "--tune-seeds", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| erm | 2 |" in text and "| amp | 2 |" in text
    assert "epsilon chosen on the validation split" in text and "amp vs erm, test error:" in text
    assert "amp vs erm, test nll_ts:" in text  # NLL after temperature scaling on val, paired like the rest
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], int(r["seed"])) for r in rows] == [("erm", 0), ("erm", 1), ("amp", 0), ("amp", 1)]
    assert {"test_error", "test_nll", "test_ece", "time_s"} <= set(rows[0])
    assert (out / "table.md").read_text().startswith("| method |")
    sel = Store(out / "results.db").selections()
    assert sel[0]["method"] == "amp" and sel[0]["split"] == "val"
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    assert main(args) == 0  # same arguments: everything is read back, nothing retrained
    assert "runs already in" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}


def test_compare_figures_and_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    assert main(["compare", *FAST[:-1], "--methods", "erm,amp", "--variants", "onepass", "--seeds", "2",
                 "--out", str(out)]) == 0
    for name in ("metrics.png", "curves.png", "reliability.png", "verdicts.png"):
        assert (out / name).stat().st_size > 1000
    assert "| amp:variant=onepass | 2 |" in capsys.readouterr().out
    before = (out / "results.db").read_bytes()
    assert main(["report", str(out / "results.db"), "--out", str(tmp_path / "rep")]) == 0
    assert (out / "results.db").read_bytes() == before  # opened read-only
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Table 1: test error (%)" in text and "AMP (amp_variant=onepass)" in text
    assert "## Table 2" in text and "AMP − ERM" not in text and "vs ERM: test error" in text
    assert (tmp_path / "rep" / "metrics_spiral_mlp_standard.png").exists()
    assert (tmp_path / "rep" / "reliability_spiral_mlp_standard.png").exists()


def _run(seed, ece, counts):
    """A finished run's metrics as the figures read them (10 reliability bins)."""
    bins = [i / 10 for i in range(11)]
    return {"config": {"seed": seed}, "test": {"error": 10.0 + seed, "nll": 0.3, "ece": ece},
            "reliability": {"test": {"lower": bins[:-1], "upper": bins[1:], "count": counts,
                                     "confidence": [b + 0.05 for b in bins[:-1]], "accuracy": [0.5] * 10}}}


def test_figures_draw_every_method_grey_sparse_bins_and_the_forest_plot(tmp_path, monkeypatch):
    """All methods in the reliability figure (a bin of one example drawn grey, counts written), bars from
    0 with a labelled error bar, and one forest plot of the paired differences from the baseline."""
    pytest.importorskip("matplotlib")
    from flatmin.experiments import figures, paired
    from flatmin.results import plot

    groups = {m: [_run(s, 0.05 * (i + 1), [0] * 9 + [1] if m == "sam" else [50] * 10) for s in range(3)]
              for i, m in enumerate(("erm", "amp", "sam", "rmp", "gsam"))}
    drawn = {}
    real = plot.save_figure

    def keep(fig, path):
        drawn[path.name] = fig
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    figures.reliability(groups, tmp_path / "reliability.png")
    panels = [ax for ax in drawn["reliability.png"].axes if ax.get_visible()]
    assert [ax.get_title().split(":")[0] for ax in panels] == list(groups)
    sam = panels[2]
    assert sam.patches[9].get_facecolor()[:3] == pytest.approx((0.75, 0.75, 0.75))  # 3 examples: grey
    assert [t.get_text() for t in sam.texts] == ["3"]  # one example per seed, pooled
    figures.metric_spread(groups, tmp_path / "metrics.png")
    axes = drawn["metrics.png"].axes
    assert all(ax.get_ylim()[0] == 0 for ax in axes)
    assert "mean ± std over seeds" in [t.get_text() for t in axes[0].get_legend().get_texts()]
    comps = paired.comparisons(groups, "erm")
    figures.forest(comps, tmp_path / "verdicts.png")
    forest = drawn["verdicts.png"].axes
    assert [ax.get_title() for ax in forest] == [f"test {m}: method − erm" for m in ("error", "nll", "ece")]
    assert [t.get_text() for t in forest[0].get_yticklabels()] == ["gsam", "rmp", "sam", "amp"]


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["compare", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.db")]) == 2
    assert main(["grid", str(tmp_path / "missing.toml")]) == 2


def test_one_progress_bar_counts_runs_and_names_what_trains_on_a_terminal_only(tmp_path):
    from flatmin.experiments.runner import Progress, make_task

    logs: list[str] = []
    bar = Progress(2, logs.append, enabled=True)
    t = make_task(TrainConfig(dataset="spiral", method="amp"), "amp", tmp_path)
    bar.started(t)
    assert "0/2" in str(bar.bar) and "training amp s0" in str(bar.bar)
    bar.ended(t, "amp seed 0: done")
    assert logs == ["amp seed 0: done"] and bar.bar.n == 1 and "training" not in str(bar.bar)
    bar.close()
    assert Progress(2, logs.append).bar is None  # stderr is not a terminal here (a pipe, CI)
    assert Progress(2, logs.append, enabled=False).bar is None  # --quiet


@pytest.mark.parametrize("chosen, said", [
    ({"rho": 0.05}, []), ({"rho": 0.01}, ["rho=0.01 is the grid's lowest"]),
    ({"rho": 0.5}, ["rho=0.5 is the grid's highest"]),
])
def test_a_choice_at_the_grid_edge_is_named(chosen, said):
    from flatmin.experiments.tuning import edges
    grid = [{"rho": r} for r in (0.01, 0.05, 0.5)]
    assert edges(grid, chosen) == said
    assert edges(grid[:2], {"rho": 0.01}) == []  # two values have no inside: nothing to flag


def test_a_spec_may_train_on_more_data_as_a_positive_control():
    """``erm:train_size=N``: the same method on another training-set size (the data option joins the
    command's own), so a known improvement can be put through the same paired statistics."""
    from flatmin.experiments.compare import parse_specs
    specs = parse_specs("erm,erm:train_size=300,lr=0.1")
    assert specs[1].fields == {"dataset_options": {"train_size": 300}, "lr": 0.1}


def test_a_single_threaded_driver_forks_its_workers_and_a_threaded_one_spawns_them(monkeypatch):
    """Fork and threads do not mix, nor fork and CUDA: the CLI (one thread) forks; a driver with another
    thread, or one that has initialised CUDA, spawns."""
    import subprocess
    import sys
    import threading

    from flatmin.experiments.backends.local import start_method

    code = "from flatmin.experiments.backends.local import start_method; print(start_method())"
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == ("fork" if sys.platform == "linux" else "spawn")
    hold = threading.Event()
    other = threading.Thread(target=hold.wait)
    other.start()
    try:
        assert start_method() == "spawn"
    finally:
        hold.set()
        other.join()
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert start_method() == alone.stdout.strip()
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: True)
    assert start_method() == "spawn"


def test_a_forked_pool_trains_what_this_process_trains_and_measures_the_step_cost(tmp_path):
    """`compare --workers 2` from the command line (a forked pool, the step cost measured in the driver once
    a core is free) gives every run's numbers of `--workers 1` (this very process), and the step cost."""
    import json
    import subprocess
    import sys

    args = ["compare", "--dataset", "spiral", "--epochs", "2", "--seeds", "3", "--methods", "erm,sam",
            "--no-figures", "--cost-epochs", "1"]
    pool = [sys.executable, "-m", "flatmin", *args, "--workers", "2", "--out", str(tmp_path / "pool")]
    subprocess.run(pool, check=True, capture_output=True, text=True)
    assert main([*args, "--workers", "1", "--out", str(tmp_path / "inline")]) == 0

    def rows(name: str) -> dict:
        with open(tmp_path / name / "results.csv") as f:
            return {(r["method"], r["seed"]): (r["test_error"], r["test_nll"], r["val_nll"])
                    for r in csv.DictReader(f)}
    assert rows("pool") == rows("inline") and len(rows("pool")) == 6
    steps = json.loads((tmp_path / "pool" / "summary.json").read_text())["cost"]["steps"]
    assert set(steps) == {"erm", "sam"} and all(v["cpu_s_per_step"] > 0 for v in steps.values())


def test_background_work_waits_for_a_free_core_and_hands_back_its_value_or_its_error():
    import threading

    from flatmin.experiments.background import Background

    started = threading.Event()

    def work(stop: threading.Event) -> int:
        started.set()
        return 7
    job = Background(work)
    assert not started.wait(0.2)  # nothing runs before `go`
    job.go()
    assert started.wait(5) and job.result() == 7
    assert Background(lambda stop: 8).result() == 8  # `result` starts it when no core was ever free

    def broken(stop: threading.Event) -> None:
        raise ValueError("measured nothing")
    with pytest.raises(ValueError, match="measured nothing"):
        Background(broken).result()

    ran = threading.Event()
    cancelled = Background(lambda stop: ran.set())
    cancelled.cancel()
    assert not ran.is_set()  # cancelled before it started: it never runs

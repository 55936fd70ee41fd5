"""flatmin.results.stats against scipy and brute force on fixed numbers; the compare summary files; the
verdict wording follows the interval; the report marks only cells whose interval excludes 0."""

import csv
import itertools
import json
import math
import time

import numpy as np
import pytest

from flatmin.cli import main
from flatmin.experiments import paired
from flatmin.experiments.runner import measured
from flatmin.experiments.tables import group_runs, table1
from flatmin.results import stats
from flatmin.results.store import Store
from flatmin.train import TrainConfig

sp = pytest.importorskip("scipy.stats")

# Paired differences of test error (points) over seeds, fixed: small n, mixed signs, one tie in size.
DIFFS = [-0.4, -1.1, 0.3, -0.9, -0.5]
DIFFS6 = [-0.4, -1.1, 0.3, -0.9, -0.5, -0.4]


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 250])
def test_student_t_matches_scipy(df):
    for q in (0.01, 0.2, 0.5, 0.8, 0.9, 0.975, 0.995, 0.99999):
        assert stats.t_ppf(q, df) == pytest.approx(sp.t.ppf(q, df), rel=1e-10, abs=1e-12)
    for t in (-4.0, -0.3, 0.0, 0.7, 2.5, 40.0):
        assert stats.t_sf(t, df) == pytest.approx(sp.t.sf(t, df), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("d", [DIFFS, DIFFS6, [0.02, 0.05, 0.01], [3.0, -1.0]])
def test_t_interval_and_paired_t_test_match_scipy(d):
    res = sp.ttest_1samp(d, 0.0)
    lo, hi = res.confidence_interval(0.95)
    assert stats.t_interval(d) == pytest.approx((lo, hi), rel=1e-10)
    assert stats.t_test_p(d) == pytest.approx(res.pvalue, rel=1e-9)
    a = [5.0 + x for x in range(len(d))]  # paired: the same numbers as a difference of two columns
    assert stats.paired_differences(dict(enumerate(np.add(a, d))), dict(enumerate(a))) == pytest.approx(d)


def _brute_sign_flip(d: list[float]) -> float:
    """Every one of the 2^n sign patterns, in plain Python: share with |Σ s·d| ≥ |Σ d|."""
    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("d", [DIFFS, DIFFS6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [0.5, -0.5, 0.25, 2.0]])
def test_exact_sign_flip_p_is_the_brute_force_count_and_scipys(d):
    p = stats.sign_flip_p(d)
    assert p == pytest.approx(_brute_sign_flip(d), abs=1e-12)
    ref = sp.permutation_test((np.array(d),), np.mean, permutation_type="samples", n_resamples=10**6)
    assert p == pytest.approx(ref.pvalue, abs=1e-12)
    assert p >= 2 / 2 ** len(d) - 1e-12  # the floor the verdict notes quote


def test_sign_flip_p_above_the_exact_limit_is_seeded_monte_carlo():
    d = list(np.random.default_rng(3).normal(0.25, 1.0, 17))
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=17)))
    exact = float(np.mean(np.abs(signs @ np.array(d)) >= abs(sum(d)) * (1 - 1e-12)))
    p = stats.sign_flip_p(d)
    assert p == stats.sign_flip_p(d)  # the generator is seeded
    assert abs(p - exact) < 5 * math.sqrt(exact * (1 - exact) / stats.MC_SAMPLES)


def test_holm_step_down_and_welch_match_their_definitions():
    # sorted 0.01·4 = 0.04; 0.03·3 = 0.09; 0.04·2 = 0.08 -> 0.09 (monotone); 0.2·1 = 0.2
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    a, b = [5.1, 4.2, 6.0, 5.5], [4.0, 4.4, 3.9, 4.8, 4.1]
    c, ref = stats.compare_unpaired("x", "y", "error", a, b), sp.ttest_ind(a, b, equal_var=False)
    assert c.ci95 == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-10)
    assert c.p_t == pytest.approx(ref.pvalue, rel=1e-9) and math.isnan(c.p_perm)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_detectable_difference_has_about_80_percent_power(n):
    mdd = stats.detectable_difference(1.0, n)
    crit, nc = sp.t.ppf(0.975, n - 1), mdd * math.sqrt(n)
    power = sp.nct.sf(crit, n - 1, nc) + sp.nct.cdf(-crit, n - 1, nc)
    assert 0.75 < power < 0.81  # the (t + t)·s/√n convention: exact power 0.77 (n=3) to 0.80


def test_verdict_follows_the_interval_and_the_metric_direction():
    assert stats.verdict((-1.2, -0.1), "error", 5) == "better"
    assert stats.verdict((0.1, 1.2), "nll", 5) == "worse"
    assert stats.verdict((0.1, 1.2), "accuracy", 5) == "better"
    assert stats.verdict((-1.2, 0.3), "error", 5) == "no detectable difference at 5 seeds"
    assert stats.verdict((math.nan, math.nan), "error", 1) == "no detectable difference at 1 seeds"
    erm = dict.fromkeys(range(6), 5.0)
    c = stats.compare("amp", "erm", "error", {s: 5.0 + d for s, d in enumerate(DIFFS)}, erm)
    assert c.ci95[0] < 0 < c.ci95[1] and c.verdict == "no detectable difference at 5 seeds" and c.n == 5
    c = stats.compare("amp", "erm", "error", {s: 4.5 + d for s, d in enumerate(DIFFS6)}, erm)
    assert c.ci95[1] < 0 and c.verdict == "better" and c.n == 6


def test_oversubscription_warning_and_cpu_time_of_a_run():
    quiet = {"erm": {"wait_over_wall_max": 0.01, "load_max": 1.2, "cores": 2}}
    busy = {"erm": {"wait_over_wall_max": 0.45, "load_max": 1.2, "cores": 2}}
    loaded = {"erm": {"wait_over_wall_max": math.nan, "load_max": 7.5, "cores": 2}}
    assert paired.oversubscribed(quiet) is None
    assert "45% of its wall time waiting" in paired.oversubscribed(busy)
    assert "load average up to 7.5 on 2 cores" in paired.oversubscribed(loaded)

    def burn() -> dict:
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
        return {}

    cost = measured(burn)["cost"]
    # process CPU counts every thread (a pool thread left by an earlier test may add to it): only the floor
    assert cost["cpu_s"] >= 0.05 and cost["wall_s"] > 0 and cost["cores"] >= 1


def test_compare_writes_summary_files_whose_verdicts_follow_the_ci(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "spiral", "--epochs", "1", "--workers", "1", "--no-figures",
                 "--methods", "erm,amp,sam", "--seeds", "3", "--cost-epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"erm", "amp", "sam"}
    assert set(summary["methods"]["amp"]["nll"]) == {"mean", "std", "n"}
    assert summary["methods"]["amp"]["error"]["n"] == 3
    assert len(summary["comparisons"]) == 10  # 2 methods × error, NLL, ECE, and NLL, ECE after temperature
    for c in summary["comparisons"]:
        assert set(c) == {"method", "baseline", "metric", "diff_mean", "ci95", "p_t", "p_perm", "verdict"}
        lo, hi = c["ci95"]
        want = "better" if hi < 0 else "worse" if lo > 0 else "no detectable difference at 3 seeds"
        assert c["baseline"] == "erm" and c["verdict"] == want
        assert f"{c['method']} vs erm, test {c['metric']}: " in text and f"-> {want}" in text
    assert "Holm" in text and "(better)" not in text
    assert (out / "summary.md").read_text().startswith("spiral / mlp, 3 seeds")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["method"], int(r["seed"])) for r in rows) == sorted(
        (m, s) for m in ("erm", "amp", "sam") for s in range(3))
    assert all(float(r["cpu_s"]) > 0 for r in rows)
    assert set(summary["cost"]["step_over_baseline"]) == {"erm", "amp", "sam"}
    assert "| step CPU / erm | run CPU / erm |" in text


def test_compare_baseline_and_seeds_auto(tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["compare", "--dataset", "spiral", "--epochs", "1", "--workers", "1", "--no-figures",
                 "--methods", "erm,amp", "--baseline", "amp", "--seeds", "auto:6", "--cost-epochs", "0",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    auto = json.loads((out / "summary.json").read_text())["auto_seeds"]
    sizes = [r["seeds"] for r in auto["rounds"]]
    assert auto["cap"] == 6 and sizes in ([5], [5, 6])
    decided = [r["verdict"] in ("better", "worse") for r in auto["rounds"]]
    assert decided[-1] or sizes[-1] == 6  # stops at the first decided round or at the cap
    assert not any(decided[:-1]) and "seeds auto: " in text
    assert all(r["method"] == "erm" and r["baseline"] == "amp" for r in auto["rounds"])
    assert main(["compare", "--methods", "erm,amp", "--baseline", "sam", "--out", str(out)]) == 2
    assert "--baseline 'sam' is not one of the compared specs" in capsys.readouterr().err
    assert main(["compare", "--seeds", "auto:x", "--out", str(out)]) == 2


def _row(store: Store, key: str, method: str, seed: int, err: float) -> None:
    cfg = TrainConfig(method=method, dataset="spiral", model="mlp", seed=seed).to_dict()
    result = {"config": cfg, "val": None, "test": {"error": err, "nll": err / 10, "ece": 0.0}, "time_s": 1.0}
    store.insert(key, method, result, None)


def test_report_marks_only_cells_whose_interval_excludes_zero(tmp_path):
    store = Store(tmp_path / "r.db")
    for s in range(5):
        _row(store, f"e{s}", "erm", s, 5.0 + 0.3 * s)
        _row(store, f"a{s}", "amp", s, 4.0 + 0.3 * s + 0.05 * (s % 2))  # 1 point lower on every seed
        _row(store, f"r{s}", "rmp", s, 5.0 + 0.3 * s + (0.2 if s % 2 else -0.2))  # no consistent shift
        _row(store, f"d{s}", "dropout", s + 10, 4.5 + 0.3 * s)  # other seeds: Welch, not paired
    groups, _ = group_runs(store.rows())
    table = table1(groups, "error", 2)
    amp = next(line for line in table.splitlines() if line.startswith("| AMP"))
    assert amp.endswith("(n=5) better |")  # paired CI excludes 0, and survives Holm over 3 methods
    rmp = next(line for line in table.splitlines() if line.startswith("| RMP"))
    assert "better" not in rmp and "worse" not in rmp
    dropout = next(line for line in table.splitlines() if line.startswith("| Dropout"))
    # 0.5 points lower, but unpaired against a 0.47 seed-to-seed spread (Welch CI includes 0)
    assert "(n=5)" in dropout and "better" not in dropout
    assert main(["report", str(tmp_path / "r.db"), "--no-figures"]) == 0

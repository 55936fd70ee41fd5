"""The training-based analyses (radius, gradnorm, spiral, calibration, cost) on tiny spiral runs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from flatmin.analysis._runs import read_run_dir
from flatmin.analysis.calibration import pool_bins, pooled_ece
from flatmin.analysis.gradnorm import omega
from flatmin.analysis.spiral import decision_grid
from flatmin.cli import main
from flatmin.errors import FlatminError
from flatmin.train import TrainConfig, train

TINY = dict(dataset="spiral", epochs=3, batch_size=20, dataset_options={"n_samples": 200})
FAST = ["--epochs", "2", "--batch-size", "20"]  # CLI runs on the default 600-point spiral


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ERM with two seeds and AMP with one, as `flatmin train --out` leaves them."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, method, seed in (("erm0", "erm", 0), ("erm1", "erm", 1), ("amp0", "amp", 0)):
        dirs[name] = root / name
        train(TrainConfig(method=method, seed=seed, **TINY), dirs[name], progress=False)
    return dirs


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


# --- spiral ---------------------------------------------------------------------------------------


def test_decision_grid_is_the_models_class1_probability_in_contour_layout():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
        model.bias.zero_()
    xs, ys = torch.linspace(-1, 1, 5).numpy(), torch.linspace(0, 1, 3).numpy()
    grid = decision_grid(model, xs, ys)
    assert grid.shape == (3, 5)  # rows follow y, as contourf(xs, ys, grid) expects
    expected = torch.sigmoid(torch.tensor(xs)[None, :] + 2 * torch.tensor(ys)[:, None])
    assert torch.allclose(torch.from_numpy(grid), expected.double(), atol=1e-6)


def test_spiral_cli_writes_figure_grid_and_test_errors(tmp_path, capsys):
    out = tmp_path / "spiral"
    assert main(["spiral", "--out", str(out), "--n-samples", "200", "--grid-points", "15", *FAST]) == 0
    numbers = json.loads((out / "spiral.json").read_text())
    assert numbers["grid_shape"] == [15, 15] and (out / "spiral.png").stat().st_size > 1000
    rows = read_csv(out / "spiral_grid.csv")
    assert len(rows) == 15 * 15
    probs = [float(r[k]) for r in rows for k in ("p_erm", "p_amp")]
    assert all(0.0 <= p <= 1.0 for p in probs) and len(set(probs)) > 10
    for method in ("erm", "amp"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert numbers["methods"][method]["test_error"] == metrics["test"]["error"]
        assert metrics["config"]["dataset_options"] == {"n_samples": 200}
    assert "erm: test error" in capsys.readouterr().out


# --- radius -----------------------------------------------------------------------------------


def test_radius_sweep_eps0_is_erm_and_a_longer_sweep_resumes(tmp_path):
    out = tmp_path / "radius"
    assert main(["radius", "--out", str(out), "--epsilons", "0.05,0", "--dataset", "spiral", *FAST]) == 0
    rows = json.loads((out / "radius.json").read_text())["rows"]
    assert [(r["epsilon"], r["method"]) for r in rows] == [(0.0, "erm"), (0.05, "amp")]
    cfg = json.loads((out / "eps_0.05" / "metrics.json").read_text())["config"]
    assert (cfg["epsilon"], cfg["inner_iter"], cfg["inner_lr"]) == (0.05, 2, 2.0)  # paper's Fig. 8 N, ζ
    erm = train(TrainConfig(dataset="spiral", method="erm", epochs=2, batch_size=20), progress=False)
    assert rows[0]["test_nll"] == erm["test"]["nll"] and rows[0]["train_nll"] == erm["train"]["nll"]
    assert rows[1]["test_nll"] != rows[0]["test_nll"]
    assert (out / "radius.png").exists() and len(read_csv(out / "radius.csv")) == 2

    stamp = (out / "eps_0.05" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["radius", "--out", str(out), "--epsilons", "0,0.05,0.1", "--dataset", "spiral", *FAST]) == 0
    again = json.loads((out / "radius.json").read_text())["rows"]
    assert (out / "eps_0.05" / "checkpoint.pt").stat().st_mtime_ns == stamp  # reused, not retrained
    assert again[:2] == rows and again[2]["epsilon"] == 0.1


def test_radius_rejects_bad_epsilons(tmp_path, capsys):
    assert main(["radius", "--out", str(tmp_path), "--epsilons", "0,-1"]) == 2
    assert "--epsilons" in capsys.readouterr().err


# --- gradnorm (Theorem 2) ----------------------------------------------------------------------


def test_omega_regimes_follow_theorem_2():
    om, gap, regime = omega(2.0, epsilon=0.5, zeta=0.1)  # ζ‖g‖ = 0.2 <= ε
    assert regime == "unclipped" and math.isclose(om, 0.5 * 0.1 * 4) and math.isclose(gap, 2 * om)
    om, gap, regime = omega(20.0, epsilon=0.5, zeta=0.1)  # ζ‖g‖ = 2 > ε
    assert regime == "clipped" and om == gap == 0.5 * 20.0


def test_gradnorm_reads_the_logged_norms_and_uses_amps_radius(runs, tmp_path):
    out = tmp_path / "gn"
    assert main(["gradnorm", str(runs["erm0"]), str(runs["amp0"]), "--out", str(out)]) == 0
    data = json.loads((out / "gradnorm.json").read_text())
    amp_cfg = json.loads((runs["amp0"] / "metrics.json").read_text())["config"]
    assert (data["epsilon"], data["inner_lr"]) == (amp_cfg["epsilon"], amp_cfg["inner_lr"])
    rows = read_csv(out / "gradnorm.csv")
    assert len(rows) == 2 * TINY["epochs"]
    for name, method in (("erm0", "erm"), ("amp0", "amp")):
        log = [json.loads(line) for line in (runs[name] / "log.jsonl").read_text().splitlines()]
        mine = [r for r in rows if r["method"] == method]
        assert [float(r["grad_norm"]) for r in mine] == [rec["grad_norm"] for rec in log]
        for r in mine:
            assert math.isclose(float(r["omega"]), omega(float(r["grad_norm"]), data["epsilon"],
                                                         data["inner_lr"])[0])
    assert (out / "gradnorm.png").stat().st_size > 1000


def test_gradnorm_train_mode_trains_erm_and_amp(tmp_path):
    out = tmp_path / "gn"
    assert main(["gradnorm", "--train", "--out", str(out), "--dataset", "spiral", "--epochs", "1",
                 "--batch-size", "50"]) == 0
    assert {r["method"] for r in read_csv(out / "gradnorm.csv")} == {"erm", "amp"}
    assert (out / "erm" / "log.jsonl").exists() and (out / "amp" / "log.jsonl").exists()


# --- calibration ---------------------------------------------------------------------------------


def test_calibration_ece_bars_are_the_runs_metrics(runs, tmp_path):
    out = tmp_path / "cal"
    assert main(["calibration", *(str(p) for p in runs.values()), "--out", str(out)]) == 0
    summary = json.loads((out / "calibration.json").read_text())["methods"]
    ece = {k: json.loads((p / "metrics.json").read_text())["test"]["ece"] for k, p in runs.items()}
    assert summary["amp"]["ece_mean"] == ece["amp0"] and summary["amp"]["ece_std"] == 0.0
    assert math.isclose(summary["erm"]["ece_mean"], (ece["erm0"] + ece["erm1"]) / 2)
    assert math.isclose(summary["erm"]["ece_std"], abs(ece["erm0"] - ece["erm1"]) / math.sqrt(2))
    assert math.isclose(summary["amp"]["pooled_ece"], ece["amp0"], abs_tol=1e-12)  # bins agree with ECE
    assert sum(summary["erm"]["reliability"]["count"]) == 2 * 200
    assert (out / "calibration.png").stat().st_size > 1000 and len(read_csv(out / "calibration.csv")) == 3


def test_calibration_from_a_results_db_matches_the_run_folders(runs, tmp_path):
    store = pytest.importorskip("flatmin.results.store")
    db = store.Store(tmp_path / "results.db")
    for key, path in runs.items():
        db.insert(key, key[:3], json.loads((path / "metrics.json").read_text()), str(path))
    db.close()
    assert main(["calibration", "--db", str(tmp_path / "results.db"), "--out", str(tmp_path / "db")]) == 0
    assert main(["calibration", *(str(p) for p in runs.values()), "--out", str(tmp_path / "dirs")]) == 0
    from_db, from_dirs = (json.loads((tmp_path / d / "calibration.json").read_text())["methods"]
                          for d in ("db", "dirs"))
    for method in ("erm", "amp"):
        for key in ("ece_mean", "ece_std", "n", "reliability"):
            assert from_db[method][key] == from_dirs[method][key]
    assert main(["calibration", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "x")]) == 2


def test_pooled_bins_are_the_bins_of_the_union():
    a = dict(lower=[0, 0.5], upper=[0.5, 1], confidence=[0.4, 0.9], accuracy=[0.5, 1.0], count=[2, 1])
    b = dict(lower=[0, 0.5], upper=[0.5, 1], confidence=[0.0, 0.6], accuracy=[0.0, 0.5], count=[0, 2])
    pooled = pool_bins([a, b])
    assert pooled["count"] == [2, 3] and pooled["accuracy"] == [0.5, 2 / 3]
    assert math.isclose(pooled["confidence"][1], (0.9 + 1.2) / 3)
    assert math.isclose(pooled_ece(pooled), (2 * 0.1 + 3 * abs(0.7 - 2 / 3)) / 5)


# --- cost -------------------------------------------------------------------------------------


def test_cost_ratios_and_passes(tmp_path, capsys):
    out = tmp_path / "cost"
    assert main(["cost", "--dataset", "spiral", "--methods", "amp,sam,rmp", "--epochs", "1",
                 "--batch-size", "50", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "cost.json").read_text())["rows"]}
    assert list(rows) == ["erm", "amp", "sam", "rmp"]  # ERM, the baseline, always measured
    assert rows["erm"]["ratio_to_erm"] == 1.0 and all(r["ratio_to_erm"] > 0 for r in rows.values())
    passes = {m: r["passes_per_step"] for m, r in rows.items()}
    assert passes == {"erm": 1.0, "amp": 2.0, "sam": 2.0, "rmp": 1.0}
    assert (out / "cost.png").exists() and len(read_csv(out / "cost.csv")) == 4
    assert "amp" in capsys.readouterr().out


def test_cost_unknown_method_is_a_one_line_error(tmp_path, capsys):
    assert main(["cost", "--methods", "amp,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


# --- bad input -----------------------------------------------------------------------------------


def test_folders_that_are_not_flatmin_runs_are_clear_errors(runs, tmp_path, capsys):
    with pytest.raises(FlatminError, match="not a flatmin run folder"):
        read_run_dir(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(FlatminError, match="not a flatmin checkpoint"):
        read_run_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    metrics = json.loads((runs["erm0"] / "metrics.json").read_text())
    metrics["config"]["model"] = "resnet9000"
    (bad / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(FlatminError, match="unknown model 'resnet9000'; valid models: .*cnn1d"):
        read_run_dir(bad)
    (bad / "metrics.json").write_text("{not json")
    assert main(["calibration", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert main(["gradnorm", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no run folder" in capsys.readouterr().err
    assert main(["calibration", "--out", str(tmp_path / "o")]) == 2

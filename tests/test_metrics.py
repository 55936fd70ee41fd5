"""flatmin.train.metrics: ECE against an obvious loop and a hand-computed case; streaming == one-shot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatmin.train.metrics import (
    MetricAccumulator,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def ece_loop(probs: torch.Tensor, targets: torch.Tensor, n_bins: int) -> float:
    """Guo et al.'s reference ECE, one bin at a time, one sample at a time: obviously right."""
    edges = torch.linspace(0, 1, n_bins + 1)
    conf, pred = probs.max(dim=1)
    n, ece = len(targets), 0.0
    for b in range(n_bins):
        lo, hi = edges[b].item(), edges[b + 1].item()
        members = []
        for i in range(n):
            c = conf[i].item()
            if (lo < c <= hi) or (b == 0 and c == 0.0):
                members.append(i)
        if members:
            acc = sum(float(pred[i] == targets[i]) for i in members) / len(members)
            avg_conf = sum(conf[i].item() for i in members) / len(members)
            ece += len(members) / n * abs(acc - avg_conf)
    return ece


def random_case(seed: int, n: int = 300, k: int = 10, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, k, generator=g)
    targets = torch.randint(0, k, (n,), generator=g)
    # make about half the predictions right, so accuracy and confidence both vary over bins
    right = torch.rand(n, generator=g) < 0.5
    targets = torch.where(right, logits.argmax(1), targets)
    return logits, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_loop_on_random_data(seed: int, n_bins: int) -> None:
    logits, targets = random_case(seed)
    probs = logits.softmax(dim=1)
    assert expected_calibration_error(probs, targets, n_bins) == pytest.approx(
        ece_loop(probs, targets, n_bins), abs=1e-6
    )


def test_ece_hand_computed() -> None:
    # 5 bins: (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]
    # sample  conf  correct  bin
    #   0     0.90  yes      4
    #   1     0.70  no       3
    #   2     0.55  yes      2
    #   3     0.85  no       4
    # bin 4: acc 1/2, conf 0.875 -> 2/4 * 0.375 = 0.1875
    # bin 3: acc 0,   conf 0.70  -> 1/4 * 0.70  = 0.1750
    # bin 2: acc 1,   conf 0.55  -> 1/4 * 0.45  = 0.1125
    # ECE = 0.475
    probs = torch.tensor(
        [[0.90, 0.05, 0.05], [0.70, 0.20, 0.10], [0.15, 0.30, 0.55], [0.85, 0.10, 0.05]]
    )
    targets = torch.tensor([0, 1, 2, 1])
    assert expected_calibration_error(probs, targets, n_bins=5) == pytest.approx(0.475, abs=1e-6)
    bins = reliability_bins(probs, targets, n_bins=5)
    assert bins["count"] == [0, 0, 1, 1, 2]
    assert bins["accuracy"][2:] == pytest.approx([1.0, 0.0, 0.5])
    assert bins["confidence"][2:] == pytest.approx([0.55, 0.70, 0.875])
    assert bins["lower"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert bins["upper"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_boundary_confidences_go_to_the_lower_bin() -> None:
    # 4 bins have exact binary edges 0.25, 0.5, 0.75: (lower, upper] puts 0.5 in bin 1, 1.0 in bin 3
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.25, 0.25, 0.5]])
    targets = torch.tensor([0, 0, 1, 2])
    bins = reliability_bins(probs, targets, n_bins=4)
    assert bins["count"] == [0, 2, 1, 1]
    assert expected_calibration_error(probs, targets, 4) == pytest.approx(
        ece_loop(probs, targets, 4)
    )


def test_perfect_and_overconfident() -> None:
    targets = torch.arange(4)
    assert expected_calibration_error(torch.eye(4), targets) == 0.0
    wrong = torch.eye(4)[[1, 2, 3, 0]]  # certain and always wrong
    assert expected_calibration_error(wrong, targets) == pytest.approx(1.0)


def test_reliability_bins_match_loop_and_cover_all_samples() -> None:
    logits, targets = random_case(3)
    probs = logits.softmax(dim=1)
    bins = reliability_bins(probs, targets, n_bins=15)
    assert sum(bins["count"]) == len(targets)
    assert len(bins["lower"]) == 15 and bins["lower"][0] == 0.0 and bins["upper"][-1] == 1.0
    n = len(targets)
    gap = sum(
        c / n * abs(a - f)
        for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"])
    )
    assert gap == pytest.approx(ece_loop(probs, targets, 15), abs=1e-6)


def test_classification_metrics_against_direct_formulas() -> None:
    logits, targets = random_case(4, n=257)
    m = classification_metrics(logits, targets)
    acc = (logits.argmax(1) == targets).float().mean().item() * 100
    assert m["n"] == 257
    assert m["accuracy"] == pytest.approx(acc)
    assert m["error"] == pytest.approx(100 - acc)
    assert m["nll"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert m["ece"] == pytest.approx(
        expected_calibration_error(logits.softmax(1), targets), abs=1e-6
    )


def test_accumulator_equals_one_shot() -> None:
    logits, targets = random_case(5, n=1000, k=100, scale=5.0)
    acc = MetricAccumulator(n_bins=15)
    for chunk in torch.split(torch.arange(1000), 128):  # uneven last batch
        acc.update(logits[chunk], targets[chunk])
    streamed, whole = acc.compute(), classification_metrics(logits, targets)
    assert streamed["n"] == whole["n"] == 1000
    for key in ("error", "accuracy", "nll", "ece"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12)
    streamed_bins, whole_bins = acc.reliability(), reliability_bins(logits.softmax(1), targets)
    assert streamed_bins["count"] == whole_bins["count"]
    assert streamed_bins["accuracy"] == pytest.approx(whole_bins["accuracy"])
    assert streamed_bins["confidence"] == pytest.approx(whole_bins["confidence"], rel=1e-6)
    acc.reset()
    with pytest.raises(ValueError, match="no predictions"):
        acc.compute()


def test_metrics_do_not_track_gradients() -> None:
    logits, targets = random_case(6, n=20)
    logits.requires_grad_(True)
    m = classification_metrics(logits, targets)
    assert isinstance(m["nll"], float) and isinstance(m["ece"], float)
    assert logits.grad is None


@pytest.mark.parametrize(
    "probs, targets, match",
    [
        (torch.full((4, 3), 1 / 3), torch.zeros(5, dtype=torch.long), "4 rows but targets has 5"),
        (torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), "probs must be 2-D"),
        (torch.full((2, 2, 2), 0.5), torch.zeros(2, dtype=torch.long), "probs must be 2-D"),
        (torch.full((4, 3), 1 / 3), torch.zeros(4, 1, dtype=torch.long), "targets must be 1-D"),
        (torch.full((4, 3), 1 / 3), torch.zeros(4), "integer class indices"),
        (torch.full((4, 3), 1 / 3), torch.tensor([0, 1, 2, 3]), r"lie in \[0, 3\)"),
        (torch.full((4, 3), 2.0), torch.zeros(4, dtype=torch.long), "pass logits"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "zero predictions"),
    ],
)
def test_input_validation(probs: torch.Tensor, targets: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, targets)


def test_bad_n_bins_and_bad_logits() -> None:
    probs, targets = torch.full((4, 3), 1 / 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, targets, n_bins=0)
    with pytest.raises(ValueError, match="n_bins"):
        MetricAccumulator(n_bins=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logits must be 2-D"):
        classification_metrics(torch.zeros(4), targets)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fitted_temperature_is_the_nll_minimiser(true_t: float) -> None:
    """Logits drawn so that softmax(z / T*) is calibrated: the fit recovers T* (up to sampling) and its NLL
    is the lowest of a fine brute-force grid of T (the plain version the search must agree with)."""
    g = torch.Generator().manual_seed(0)
    base = 3 * torch.randn(4000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial(F.softmax(base, dim=1), 1, generator=g).squeeze(1)
    z = base * true_t  # overconfident when T* > 1
    t = fit_temperature(z, y)
    grid = torch.linspace(0.05, 10, 4000, dtype=torch.float64)
    nlls = torch.stack([F.cross_entropy(z / s, y) for s in grid])
    assert float(F.cross_entropy(z / t, y)) <= float(nlls.min()) + 1e-6
    assert abs(t - true_t) / true_t < 0.1
    scaled = classification_metrics(z / t, y)
    assert scaled["error"] == classification_metrics(z, y)["error"]  # a temperature changes no argmax

"""Test metrics of the paper: top-1 error, NLL (Table 1) and expected calibration error (Fig. 7).

ECE follows Guo et al. (2017) and their reference code: the confidence of a prediction is its
largest softmax probability; bin b (0-based, of `n_bins` equal-width bins) holds the confidences in
(b/n_bins, (b+1)/n_bins], so a confidence exactly on a boundary goes to the lower bin and a
confidence of exactly 1 to the last one. A confidence of exactly 0 (impossible for a max-softmax,
which is at least 1/K) is counted in the first bin rather than dropped. Then

    ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|.

Everything is accumulated as per-bin sums (count, summed confidence, summed correctness), so the
one-shot functions and the streaming `MetricAccumulator` share one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MetricAccumulator",
    "classification_metrics",
    "expected_calibration_error",
    "reliability_bins",
]


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _check_inputs(scores: Tensor, targets: Tensor, what: str) -> None:
    """Shape checks with messages that say which input is wrong."""
    if not isinstance(scores, Tensor) or not isinstance(targets, Tensor):
        raise ValueError(f"{what} and targets must be torch tensors")
    if scores.dim() != 2:
        raise ValueError(f"{what} must be 2-D (n_samples, n_classes), got shape {tuple(scores.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D (n_samples,), got shape {tuple(targets.shape)}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{what} has {scores.shape[0]} rows but targets has {targets.shape[0]} entries"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]}) for {scores.shape[1]} classes")


def _bin_sums(confidence: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """(3, n_bins) float64 [count, sum of confidence, sum of correct] per confidence bin."""
    conf = confidence.detach().to(torch.float64)
    # Inner edges 1/n .. (n-1)/n; bucketize(right=False) gives #edges < conf, i.e. the bin of
    # (lower, upper] — Guo et al.'s `bin_lower < conf <= bin_upper`. Edges are made exactly as
    # their code does (linspace in float32), so boundary values bin identically.
    edges = torch.linspace(0, 1, n_bins + 1, device=conf.device)[1:-1].to(torch.float64)
    idx = torch.bucketize(conf, edges, right=False)
    values = torch.stack([torch.ones_like(conf), conf, correct.detach().to(torch.float64)])
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=conf.device)
    return out.index_add_(1, idx, values)


def _ece(bins: Tensor) -> float:
    """ECE from per-bin sums: the count-weighted gap |sum conf - sum correct| / n."""
    n = bins[0].sum()
    if n == 0:
        raise ValueError("ECE of zero predictions is undefined")
    return float((bins[1] - bins[2]).abs().sum() / n)


def _reliability(bins: Tensor, n_bins: int) -> dict[str, list[float]]:
    """Per-bin means for reliability diagrams; empty bins report 0.0 with count 0."""
    count = bins[0]
    safe = count.clamp(min=1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "confidence": (bins[1] / safe).tolist(),
        "accuracy": (bins[2] / safe).tolist(),
        "count": [int(c) for c in count.tolist()],
    }


def _prob_bins(probs: Tensor, targets: Tensor, n_bins: int) -> Tensor:
    _check_n_bins(n_bins)
    _check_inputs(probs, targets, "probs")
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("probs must lie in [0, 1] (pass logits to classification_metrics)")
    confidence, prediction = probs.max(dim=1)
    return _bin_sums(confidence, prediction == targets, n_bins)


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017) of predicted class probabilities: how far confidence is from accuracy."""
    return _ece(_prob_bins(probs, targets, n_bins))


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, list]:
    """Per-bin lower/upper edge, mean confidence, accuracy and count, to draw reliability diagrams."""
    return _reliability(_prob_bins(probs, targets, n_bins), n_bins)


class MetricAccumulator:
    """Streams error/NLL/ECE over batches of logits, so a big test set needs no concatenation."""

    def __init__(self, n_bins: int = 15) -> None:
        _check_n_bins(n_bins)
        self.n_bins = n_bins
        self.reset()

    def reset(self) -> None:
        """Forget all batches (e.g. between evaluation epochs)."""
        self.n = 0
        self.correct = 0
        self.nll_sum = 0.0
        self.bins = torch.zeros(3, self.n_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch; logits are unnormalised scores of shape (batch, n_classes)."""
        _check_inputs(logits, targets, "logits")
        logp = F.log_softmax(logits.detach().to(torch.float64), dim=1)
        targets = targets.to(logp.device)
        confidence, prediction = logp.max(dim=1)
        correct = prediction == targets
        self.n += targets.numel()
        self.correct += int(correct.sum())
        self.nll_sum += float(F.nll_loss(logp, targets, reduction="sum"))
        self.bins += _bin_sums(confidence.exp(), correct, self.n_bins).cpu()

    def compute(self) -> dict[str, float | int]:
        """Table 1 numbers: error and accuracy in %, mean NLL in nats, ECE as a fraction."""
        if self.n == 0:
            raise ValueError("no predictions accumulated; call update() first")
        accuracy = 100.0 * self.correct / self.n
        return {
            "error": 100.0 - accuracy,
            "nll": self.nll_sum / self.n,
            "ece": _ece(self.bins),
            "accuracy": accuracy,
            "n": self.n,
        }

    def reliability(self) -> dict[str, list]:
        """Reliability-diagram bins of everything accumulated so far."""
        return _reliability(self.bins, self.n_bins)


@torch.no_grad()
def fit_temperature(logits: Tensor, targets: Tensor, log_range: float = 4.0, iters: int = 60) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) (Guo et al., 2017), fitted on a held-out
    split: a calibration gain that vanishes once T is fitted was a gain in scale, not in ranking. NLL is
    convex in 1/T, so a golden-section search over log T in ±``log_range`` is exact to ~1e-12 and
    deterministic (no optimizer state, no learning rate)."""
    z, y = logits.detach().to(torch.float64), targets.to(logits.device)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    lo, hi, ratio = -log_range, log_range, (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def classification_metrics(logits: Tensor, targets: Tensor, n_bins: int = 15) -> dict:
    """One-shot error (%), NLL (nats), ECE and accuracy (%) of a set of logits."""
    acc = MetricAccumulator(n_bins)
    acc.update(logits, targets)
    return acc.compute()

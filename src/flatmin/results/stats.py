"""Paired statistics over seeds: what `flatmin compare` and `flatmin report` may call a difference.

Runs of two methods with the same seed share data order and initialisation, so they are compared
per seed: the mean paired difference, its Student-t 95% interval, the paired t-test p-value and,
needing no normality, the sign-flip (permutation) p-value. A method is called "better" or "worse"
only when the interval excludes 0. Pure `math` + numpy (no scipy in the core install: the Student-t
distribution is the regularised incomplete beta function below; tests hold it to scipy).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LOWER_IS_BETTER = {"error": True, "nll": True, "ece": True, "nll_ts": True, "ece_ts": True, "accuracy": False}
ALPHA, POWER = 0.05, 0.8  # two-sided 95% intervals; detectable difference at 80% power
EXACT_MAX_N = 16  # up to 2**16 sign patterns enumerated; Monte Carlo above
MC_SAMPLES, MC_SEED = 100_000, 0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value): the spread seeds show."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a − b over the seeds both have, in seed order: each seed is its own control."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the CDF: slow, exact to double precision)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def t_interval(diffs: Sequence[float], level: float = 1 - ALPHA) -> tuple[float, float]:
    """Student-t confidence interval of the mean; (nan, nan) below two values."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    m, s = mean_std(diffs)
    half = t_ppf(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return m - half, m + half


def t_test_p(diffs: Sequence[float]) -> float:
    """Two-sided one-sample (= paired) t-test of mean 0; 0 when all differences agree exactly."""
    n = len(diffs)
    if n < 2:
        return math.nan
    m, s = mean_std(diffs)
    if s == 0.0:
        return 1.0 if m == 0.0 else 0.0
    return min(1.0, 2.0 * t_sf(abs(m) / (s / math.sqrt(n)), n - 1))


def sign_flip_p(diffs: Sequence[float], samples: int = MC_SAMPLES, seed: int = MC_SEED) -> float:
    """Two-sided sign-flip p-value of |mean|: exact over all 2**n sign patterns for n <= 16,
    else Monte Carlo with a seeded generator ((1 + hits) / (1 + samples)). At n seeds the exact
    p-value is never below 2 / 2**n (0.0625 at n = 5): fewer than 6 seeds cannot reach p < 0.05."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.sum()) * (1 - 1e-12)  # ties within rounding count as "as extreme"
    if n <= EXACT_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d) >= observed))
    rng = np.random.default_rng(seed)
    hits = sum(int(np.sum(np.abs(rng.choice((1.0, -1.0), size=(chunk, n)) @ d) >= observed))
               for chunk in _chunks(samples, 10_000))
    return (1 + hits) / (1 + samples)


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control for several comparisons)."""
    order = sorted(range(len(pvalues)), key=lambda i: (math.isnan(pvalues[i]), pvalues[i]))
    m, out, running = len(pvalues), [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        if math.isnan(pvalues[i]):
            continue
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a paired t-test at ``alpha`` (two-sided) finds with ``power``,
    given the observed spread ``sd`` of the differences over ``n`` seeds: (t₁₋α/₂ + t_power)·sd/√n."""
    if n < 2:
        return math.nan
    return (t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def verdict(ci: tuple[float, float], metric: str, n: int) -> str:
    """'better' / 'worse' only when the interval excludes 0, in the metric's direction."""
    lo, hi = ci
    if not (lo > 0 or hi < 0):  # includes 0, or nan (fewer than two seeds)
        return f"no detectable difference at {n} seeds"
    lower = lo < 0 and hi < 0
    return "better" if lower == LOWER_IS_BETTER.get(metric, True) else "worse"


@dataclass
class Comparison:
    """One method vs the baseline on one metric, paired by seed."""

    method: str
    baseline: str
    metric: str
    n: int
    diff_mean: float
    ci95: tuple[float, float]
    p_t: float
    p_perm: float
    verdict: str
    detectable: float  # smallest difference this many seeds could detect (80% power, α = 0.05)
    p_holm: float = math.nan

    def summary(self) -> dict[str, object]:
        """The fields `summary.json` names, NaN as null."""
        return {"method": self.method, "baseline": self.baseline, "metric": self.metric,
                "diff_mean": _num(self.diff_mean), "ci95": [_num(v) for v in self.ci95],
                "p_t": _num(self.p_t), "p_perm": _num(self.p_perm), "verdict": self.verdict}


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def compare(method: str, baseline: str, metric: str, a: dict[int, float], b: dict[int, float]) -> Comparison:
    """``a`` (method) vs ``b`` (baseline), both {seed: value}, paired on their common seeds."""
    d = paired_differences(a, b)
    ci = t_interval(d)
    n = len(d)
    mean, sd = mean_std(d) if d else (math.nan, math.nan)
    return Comparison(method, baseline, metric, n, mean, ci, t_test_p(d), sign_flip_p(d),
                      verdict(ci, metric, n), detectable_difference(sd, n))


def compare_unpaired(method: str, baseline: str, metric: str, a: Sequence[float],
                     b: Sequence[float]) -> Comparison:
    """Welch's interval and t-test when the seeds do not match (no pairing, no sign-flip p)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    n = min(len(a), len(b))
    if n < 2:
        return Comparison(method, baseline, metric, n, ma - mb, (math.nan, math.nan), math.nan, math.nan,
                          verdict((math.nan, math.nan), metric, n), math.nan)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se, d = math.sqrt(va + vb), ma - mb
    if se == 0.0:
        return Comparison(method, baseline, metric, n, d, (d, d), 1.0 if d == 0 else 0.0, math.nan,
                          verdict((d, d), metric, n), 0.0)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_ppf(1 - ALPHA / 2, df) * se
    ci = (d - half, d + half)
    return Comparison(method, baseline, metric, n, d, ci, min(1.0, 2 * t_sf(abs(d) / se, df)), math.nan,
                      verdict(ci, metric, n), (t_ppf(1 - ALPHA / 2, df) + t_ppf(POWER, df)) * se)


def adjust(comparisons: list[Comparison]) -> list[Comparison]:
    """Fill ``p_holm`` per metric across the methods compared (the family a reader scans at once)."""
    for metric in {c.metric for c in comparisons}:
        family = [c for c in comparisons if c.metric == metric]
        for c, p in zip(family, holm([c.p_t for c in family])):
            c.p_holm = p
    return comparisons

"""The statistics the tables and ``bench compare`` use, small enough to check by hand.

- :func:`wilson`: the Wilson score interval of a proportion, k successes of n (an attack unlocked a protector in k
  of n trainings). Unlike the normal ("Wald") interval it stays inside [0, 1] and is not empty at k = 0 or k = n,
  which is where bimodal outcomes put most rows.
- :func:`welch`: Welch's two-sample t-test of the per-training values of two runs (means compared, variances not
  assumed equal). The choice over Mann–Whitney U, for this suite's data:

  * what the tables report, and what a drift would move, is the *mean* over trainings; Welch tests exactly that;
  * it has power at the small numbers of trainings a reference may hold: with 3 trainings a side, the smallest
    two-sided p Mann–Whitney (or any rank or permutation test) can reach is 0.1, which no correction over hundreds
    of rows would ever call significant, so a 0.3 shift of a whole protector would pass unseen. Welch gives
    p ~ 1e-5 for such a shift when the trainings agree with each other;
  * ties and bimodal values (a lock holds in some trainings and falls in others: 0.10 and 0.97) are no special case:
    a bimodal sample simply has a large variance, so a change in how often the lock falls moves the mean by less
    than its standard error unless it is large, which is the behaviour wanted. The t approximation of a mean of a
    bounded variable is good with equal or similar sample sizes (the design of every run), and the false-alarm
    correction (Holm) on top of it is conservative;
  * a row whose values are constant on both sides (a deterministic value, or chance accuracy in every training) has
    no variance: its p is 1 when the two constants agree and 0 when they differ (the floor on the difference of means
    that :mod:`bench.compare` applies decides whether such a difference matters).

  The p value comes from Student's t distribution (``scipy.stats``; scipy is a dependency of scikit-learn, which the
  suite requires).
- :func:`fisher_exact`: the two-sided Fisher exact test of two proportions (k1 of n1 against k2 of n2), for the
  verdicts: is a change in how many trainings a protector falls in more than chance?
- :func:`holm` and :func:`benjamini_hochberg`: adjusted p values controlling the family-wise error rate (Holm) or the
  false discovery rate (Benjamini–Hochberg) over many tests; an adjusted p below alpha rejects at level alpha.
  ``bench compare`` uses Holm: a reproduction check should raise a false alarm on a correct run at most 5% of the
  time, whatever the number of rows, which is the family-wise guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: z for a two-sided 95% interval
Z95 = 1.959963984540054


def wilson(k: int | float, n: int | float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of the proportion ``k / n`` (95% by default); NaNs when ``n`` is 0
    or not a number."""
    if n is None or k is None or (isinstance(n, float) and math.isnan(n)) or n <= 0 \
            or (isinstance(k, float) and math.isnan(k)):
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _clean(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return a[~np.isnan(a)]


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sided p value of Welch's t-test that samples ``a`` and ``b`` have the same mean.

    NaN when either sample has fewer than 2 values (no variance to test with); with no variance on both sides, 1
    when the two means agree (to 1e-12) and 0 when they differ."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    ma, mb = float(a.mean()), float(b.mean())
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    se2 = va + vb
    if se2 <= 1e-24:
        return 1.0 if abs(ma - mb) <= 1e-12 else 0.0
    t = (ma - mb) / math.sqrt(se2)
    df = se2 * se2 / ((va * va) / (len(a) - 1) + (vb * vb) / (len(b) - 1))
    return float(min(1.0, 2 * stats.t.sf(abs(t), df)))


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """The two-sided p value of Fisher's exact test that k1 of n1 and k2 of n2 come from one proportion (the sum of
    the probabilities of every table with the same margins that is no more likely than the one observed)."""
    if min(n1, n2) <= 0:
        return math.nan
    if not (0 <= k1 <= n1 and 0 <= k2 <= n2):
        raise ValueError(f"fisher_exact: need 0 <= k <= n, got {k1}/{n1}, {k2}/{n2}")
    k, n = k1 + k2, n1 + n2
    total = math.comb(n, k)

    def prob(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, k - x) / total

    observed = prob(k1)
    p = sum(prob(x) for x in range(max(0, k - n2), min(k, n1) + 1) if prob(x) <= observed * (1 + 1e-7))
    return float(min(1.0, p))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p values (family-wise error), in the input's order; NaNs stay NaN and do not count
    as tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p values (false discovery rate), in the input's order; NaNs stay NaN and do not
    count as tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out[order] = np.minimum(adj, 1.0)
    return out

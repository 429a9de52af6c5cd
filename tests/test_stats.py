"""bench/stats.py against values computed by hand or published."""

import math

import numpy as np
import pytest

from bench import stats


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.2775),       # the rule of three's neighbour: Wilson at k = 0 is not empty
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (3, 3, 0.4385, 1.0),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), the worked example's Wilson interval
])
def test_wilson_known_values(k, n, lo, hi):
    got = stats.wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_edges():
    assert all(math.isnan(v) for v in stats.wilson(0, 0))
    assert all(math.isnan(v) for v in stats.wilson(float("nan"), 3))
    with pytest.raises(ValueError):
        stats.wilson(4, 3)


def test_welch_matches_a_hand_computation():
    a, b = [0.10, 0.12, 0.14], [0.30, 0.33, 0.36, 0.39]
    # by hand: means 0.12 and 0.345, variances 0.0004 and 0.00150, se^2 = 0.0004/3 + 0.0015/4
    se2 = 0.0004 / 3 + 0.0015 / 4
    t = (0.12 - 0.345) / math.sqrt(se2)
    df = se2 ** 2 / ((0.0004 / 3) ** 2 / 2 + (0.0015 / 4) ** 2 / 3)
    from scipy import stats as sst

    assert stats.welch(a, b) == pytest.approx(2 * sst.t.sf(abs(t), df), rel=1e-9)
    assert stats.welch(a, b) == pytest.approx(sst.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert stats.welch(a, b) < 0.001


def test_welch_edges():
    assert math.isnan(stats.welch([0.5], [0.5, 0.6]))          # one value: nothing to test with
    assert stats.welch([0.1, 0.1, 0.1], [0.1, 0.1]) == 1.0      # constants that agree
    assert stats.welch([0.1, 0.1, 0.1], [0.2, 0.2]) == 0.0      # constants that differ
    assert stats.welch([0.1, None, float("nan"), 0.1], [0.1, 0.1]) == 1.0  # missing values are left out
    bimodal = [0.1, 0.95, 0.1, 0.95, 0.96, 0.1]
    assert stats.welch(bimodal, bimodal[::-1]) == pytest.approx(1.0)


def test_fisher_exact_known_values():
    # the tea-tasting experiment: 3 of 4 against 1 of 4, two-sided p = 34/70
    assert stats.fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70)
    assert stats.fisher_exact(10, 10, 0, 10) == pytest.approx(2 / math.comb(20, 10))
    assert stats.fisher_exact(5, 10, 5, 10) == pytest.approx(1.0)
    from scipy import stats as sst

    for k1, n1, k2, n2 in [(1, 9, 11, 14), (7, 10, 2, 10), (0, 3, 3, 3), (2, 3, 9, 10)]:
        ref = sst.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
        assert stats.fisher_exact(k1, n1, k2, n2) == pytest.approx(ref, rel=1e-9)


def test_holm_known_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, then running maximum
    got = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, never below a smaller p's
    nan = stats.holm([np.nan, 0.01, 0.02])
    assert math.isnan(nan[0]) and nan[1:] == pytest.approx([0.02, 0.02])  # a NaN is not a test
    assert len(stats.holm([])) == 0


def test_benjamini_hochberg_known_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04, then the running minimum
    got = stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.02, 0.04, 0.04, 0.02])
    got = stats.benjamini_hochberg([0.01, 0.02, 0.03, 0.04, 0.05])
    assert got == pytest.approx([0.05] * 5)
    assert math.isnan(stats.benjamini_hochberg([np.nan])[0])

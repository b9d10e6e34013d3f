"""Known answers for mechvit.analysis.statistics: formulas, exact p-values, coverage on synthetic data."""

import math

import numpy as np
import pytest
from scipy import stats

from mechvit.analysis.statistics import (
    Estimate,
    mcnemar,
    mean_ci,
    paired_difference_ci,
    pairwise_label_permutation_test,
    permutation_test,
    proportion_ci,
    ratio_ci,
)


def test_wilson_interval_matches_the_formula():
    k, n, z = 37, 120, stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    ci = proportion_ci(k, n)
    assert ci.estimate == pytest.approx(p)
    assert (ci.low, ci.high) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert ci.method == "wilson" and ci.n == n


def test_clopper_pearson_matches_beta_quantiles():
    k, n = 7, 40
    ci = proportion_ci(k, n, method="clopper-pearson")
    assert ci.low == pytest.approx(stats.beta.ppf(0.025, k, n - k + 1))
    assert ci.high == pytest.approx(stats.beta.ppf(0.975, k + 1, n - k))


def test_wilson_coverage_on_a_synthetic_binomial():
    rng = np.random.default_rng(0)
    p, n, reps = 0.3, 60, 1000
    hits = sum(proportion_ci(int(k), n).contains(p) for k in rng.binomial(n, p, size=reps))
    # Wilson's coverage at n=60, p=0.3 is ~0.95; 1000 draws give a binomial sd of 0.007
    assert 0.92 <= hits / reps <= 0.98


@pytest.mark.parametrize("n", [8, 40])  # t interval (n < 20) and bootstrap BCa (n >= 20)
def test_mean_ci_coverage_on_synthetic_normal_data(n):
    rng = np.random.default_rng(n)
    reps = 300
    hits = 0
    for r in range(reps):
        ci = mean_ci(rng.normal(1.0, 2.0, size=n), n_resamples=999, seed=r)
        hits += ci.contains(1.0)
    # BCa under-covers slightly at n=40 (~0.93); 300 draws give a sd of ~0.013
    assert 0.89 <= hits / reps <= 0.99
    assert ci.method == ("student-t" if n < 20 else "bootstrap-bca")


def test_mean_ci_degenerate_cases_and_errors():
    assert mean_ci([2.0, 2.0, 2.0]).as_tuple() == (2.0, 2.0, 2.0)
    one = mean_ci([3.0])
    assert one.estimate == 3.0 and math.isnan(one.low)
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])
    with pytest.raises(ValueError, match="method must be"):
        mean_ci([1.0, 2.0], method="jackknife")


def test_estimate_formats_itself():
    e = Estimate(0.5543, 0.5121, 0.5962, 8, "student-t")
    assert str(e) == "0.554 [0.512, 0.596]"
    assert e.format(1, scale=100, unit=" %") == "55.4 % [51.2, 59.6]"
    assert e.to_dict()["method"] == "student-t"


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(1)
    item = rng.normal(0, 5, size=200)  # large per-item effect shared by both measurements
    a = item + 0.3 + rng.normal(0, 0.1, size=200)
    b = item + rng.normal(0, 0.1, size=200)
    paired = paired_difference_ci(a, b)
    assert paired.contains(0.3) and not paired.contains(0.0)
    assert paired.high - paired.low < 0.1  # the unpaired spread (sd 5) would give ~1.9
    with pytest.raises(ValueError, match="same length"):
        paired_difference_ci(a, b[:-1])


def test_mcnemar_exact_p_value_and_difference():
    # a right and b wrong on 10 items, the reverse on none, 90 concordant
    a = np.array([1] * 10 + [1] * 50 + [0] * 40)
    b = np.array([0] * 10 + [1] * 50 + [0] * 40)
    res = mcnemar(a, b)
    assert (res.a_only, res.b_only, res.n) == (10, 0, 100)
    assert res.p_value == pytest.approx(2 * 0.5**10)
    assert res.difference.estimate == pytest.approx(0.1)
    assert mcnemar(a, a).p_value == 1.0
    with pytest.raises(ValueError, match="booleans"):
        mcnemar([0, 2], [1, 1])


def test_permutation_test_exact_on_groups_known_to_differ_and_known_equal():
    res = permutation_test([10, 11, 12, 13], [0, 1, 2, 3])
    assert res.exact and res.n_permutations == 70
    assert res.statistic == pytest.approx(10.0)
    assert res.p_value == pytest.approx(2 / 70)  # the observed split and its mirror
    assert permutation_test([10, 11, 12, 13], [0, 1, 2, 3], alternative="greater").p_value == pytest.approx(
        1 / 70
    )
    rng = np.random.default_rng(3)
    same = permutation_test(rng.normal(size=6), rng.normal(size=6))
    assert same.exact and same.p_value > 0.05


def test_permutation_test_switches_to_monte_carlo():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 40), rng.normal(1.5, 1, 40)
    res = permutation_test(a, b, max_exact=1000, n_resamples=1999)
    assert not res.exact and res.n_permutations == 1999
    assert res.p_value <= 2 / 2000 + 1e-12


def test_pairwise_label_permutation_test_known_answers():
    labels = ["base"] * 4 + ["ft"] * 4
    same = np.array([[1.0 if (i < 4) == (j < 4) else 0.0 for j in range(8)] for i in range(8)])
    res = pairwise_label_permutation_test(same, labels)
    assert res.statistic == pytest.approx(1.0)
    assert res.exact and res.n_permutations == 70 and res.p_value == pytest.approx(2 / 70)
    assert res.alternative == "greater"
    two_sided = pairwise_label_permutation_test(same, labels, alternative="two-sided")
    assert two_sided.p_value == pytest.approx(4 / 70)  # scipy doubles the one-sided p
    # exchangeable units: every pair scores from one distribution
    rng = np.random.default_rng(5)
    noise = rng.normal(0.6, 0.02, size=(8, 8))
    assert pairwise_label_permutation_test(noise, labels).p_value > 0.05
    with pytest.raises(ValueError, match="exactly two groups"):
        pairwise_label_permutation_test(same, ["a"] * 8)
    with pytest.raises(ValueError, match="one label per unit"):
        pairwise_label_permutation_test(same, labels[:-1])


def test_ratio_ci_contains_the_true_ratio():
    rng = np.random.default_rng(6)
    den = rng.normal(0.6, 0.02, size=12)
    num = rng.normal(0.54, 0.02, size=12)
    r = ratio_ci(num, den, n_resamples=1999)
    assert r.estimate == pytest.approx(num.mean() / den.mean())
    assert r.contains(0.9) and r.high < 1.0
    with pytest.raises(ValueError, match="denominator"):
        ratio_ci([1.0, 2.0], [0.0, 0.0])


def test_holm_on_a_textbook_example():
    from mechvit.analysis.statistics import holm

    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.02]), [0.02])  # a family of one is unadjusted
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_weighted_bootstrap_ci_of_a_mean_covers_the_true_value():
    from mechvit.analysis.statistics import bootstrap_weights, weighted_bootstrap_ci

    w = bootstrap_weights(50, 20, seed=1)
    assert w.shape == (20, 50) and (w.sum(1) == 50).all()
    rng = np.random.default_rng(0)
    hits = 0
    for r in range(200):
        x = (rng.random(300) < 0.3).astype(float)
        ci = weighted_bootstrap_ci(lambda w, x=x: w @ x / w.sum(1), len(x), n_resamples=1000, seed=r)
        assert ci.estimate == pytest.approx(x.mean())
        hits += ci.contains(0.3)
    assert 0.90 <= hits / 200 <= 0.99  # 95% nominal; 200 draws give a sd of ~0.015
    # the same interval as scipy's percentile bootstrap, up to resampling noise
    x = rng.normal(size=400)
    ref = stats.bootstrap(
        (x,), np.mean, method="percentile", n_resamples=4000, random_state=0
    ).confidence_interval
    ci = weighted_bootstrap_ci(lambda w: w @ x / w.sum(1), len(x), n_resamples=4000)
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), abs=0.02)


def _scipy_bootstrap_ci(x, seed, n_resamples):
    """The CI of mean_ci's bootstrap straight from scipy (BCa, percentile where BCa is undefined)."""
    import warnings

    kw = dict(confidence_level=0.95, n_resamples=n_resamples, vectorized=True)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ci = stats.bootstrap(
                (x,), np.mean, random_state=np.random.default_rng(seed), **kw
            ).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        except (ValueError, FloatingPointError):
            lo = hi = math.nan
        if not (math.isfinite(lo) and math.isfinite(hi)):
            ci = stats.bootstrap(
                (x,), np.mean, method="percentile", random_state=np.random.default_rng(seed), **kw
            ).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
    return lo, hi


@pytest.mark.parametrize("n", [20, 57, 600])
def test_mean_ci_bootstrap_equals_scipys_bit_for_bit(n):
    """mean_ci computes the bootstrap distribution itself (cached indices, a block of resamples at a time)
    and lets scipy finish the interval: the CI is scipy's own, exactly, on fractions whose sums round
    (k/3, k/18 and their paired differences), 0/1 data, normal data and near-constant data; twice with the
    same seed (the cached indices) and with another."""
    from mechvit.analysis import statistics as S

    rng = np.random.default_rng(n)
    data = [
        rng.integers(0, 4, n) / 3,
        rng.integers(0, 19, n) / 18 - rng.integers(0, 19, n) / 18,
        (rng.random(n) < 0.6).astype(float),
        rng.normal(size=n),
        np.r_[np.ones(n - 1), 0.0],  # one odd value: BCa's jackknife is nearly degenerate
    ]
    for seed in (7, 7, 11):
        for x in data:
            ci = mean_ci(x, seed=seed, n_resamples=999)
            assert (ci.low, ci.high) == _scipy_bootstrap_ci(x, seed, 999)
            assert ci.estimate == float(x.mean())
            assert (
                paired_difference_ci(x, x[::-1], seed=seed, n_resamples=999).low
                == _scipy_bootstrap_ci(x - x[::-1], seed, 999)[0]
            )
    assert list(S._INDEX_CACHE) == [(11, n, 999)]  # one matrix of indices kept, the last one asked for

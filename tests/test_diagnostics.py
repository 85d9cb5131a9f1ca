"""Diagnostics against known answers: an exact, an over-confident and an under-confident posterior.

The model is theta ~ N(0, I_D), x ~ N(theta, I_D), whose exact posterior is N(x / 2, I_D / 2). A
posterior whose standard deviation is scaled by ``s`` is over-confident for s < 1 and
under-confident for s > 1. Tolerances on coverage curves come from the DKW inequality: for n
pairs, P(sup_l |coverage(l) - expected(l)| > eps) <= 2 exp(-2 n eps^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from pipeline.diagnostics import (
    DEFAULT_LEVELS,
    c2st,
    c2st_batched,
    hpd_coverage,
    max_coverage_deviation,
    sbc_histogram,
    sbc_ranks,
    sbc_uniformity_pvalues,
    tarp_coverage,
)

NUM_PAIRS = 500
NUM_SAMPLES = 500
DIM = 2
# DKW with n = 500 and eps = 0.08 bounds the chance of a larger deviation by 2 exp(-6.4) = 0.003;
# 0.02 more absorbs the Monte Carlo error of each alpha_i from M = 500 samples (sd <= 0.022,
# which only smooths the curve). Seeds are fixed, so the tests are deterministic anyway.
CALIBRATED_TOLERANCE = 0.1
SCALES = {"exact": 1.0, "over-confident": 0.5, "under-confident": 2.0}


@dataclass
class Pairs:
    theta: np.ndarray  # (n, D)
    samples: np.ndarray  # (n, M, D)
    log_prob_samples: np.ndarray  # (n, M)
    log_prob_true: np.ndarray  # (n,)


def gaussian_pairs(scale: float, seed: int = 0) -> Pairs:
    """Test pairs and samples of the posterior N(x / 2, scale^2 / 2) of the Gaussian model."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(NUM_PAIRS, DIM))
    x = theta + rng.normal(size=(NUM_PAIRS, DIM))
    loc, std = x / 2, scale * np.sqrt(0.5)
    samples = loc[:, None, :] + std * rng.normal(size=(NUM_PAIRS, NUM_SAMPLES, DIM))
    log_prob_samples = stats.norm.logpdf(samples, loc[:, None, :], std).sum(axis=-1)
    log_prob_true = stats.norm.logpdf(theta, loc, std).sum(axis=-1)
    return Pairs(theta, samples, log_prob_samples, log_prob_true)


@pytest.fixture(scope="module", params=list(SCALES))
def case(request: pytest.FixtureRequest) -> tuple[str, float, Pairs]:
    name = request.param
    return name, SCALES[name], gaussian_pairs(SCALES[name])


def expected_hpd_coverage(levels: np.ndarray, scale: float) -> np.ndarray:
    """Exact HPD coverage of N(mu, s^2 Sigma) when the truth follows N(mu, Sigma).

    The truth lies in the level-l region iff its squared Mahalanobis distance, chi2_D under
    the true posterior, is below s^2 F^-1(l), where F is the chi2_D CDF.
    """
    chi2 = stats.chi2(DIM)
    return chi2.cdf(scale**2 * chi2.ppf(levels))


# Coverage


def test_hpd_coverage_matches_analytic_curve(case: tuple[str, float, Pairs]) -> None:
    _, scale, pairs = case
    coverage = hpd_coverage(pairs.log_prob_samples, pairs.log_prob_true)
    expected = expected_hpd_coverage(DEFAULT_LEVELS, scale)
    assert coverage.shape == DEFAULT_LEVELS.shape
    np.testing.assert_allclose(coverage, expected, atol=CALIBRATED_TOLERANCE)


@pytest.mark.parametrize("box", [False, True], ids=["zscore", "prior-box"])
def test_tarp_coverage_direction(case: tuple[str, float, Pairs], box: bool) -> None:
    name, _, pairs = case
    # The prior is Gaussian; any box serves, as TARP is exact for any reference distribution.
    bounds = {"low": np.full(DIM, -4.0), "high": np.full(DIM, 4.0)} if box else {}
    rng = np.random.default_rng(1)
    coverage = tarp_coverage(pairs.samples, pairs.theta, rng=rng, **bounds)
    deviation = coverage - DEFAULT_LEVELS
    upper = deviation[DEFAULT_LEVELS > 0.5]
    assert coverage.shape == DEFAULT_LEVELS.shape
    # With references spread over the prior, a TARP ball around a distant reference cuts the
    # posterior almost like a half-space, so alpha_i behaves like a 1-D rank: a wrong width
    # gives an S-shaped curve that crosses the diagonal near 0.5 (measured: +0.12 at l = 0.05
    # and -0.19 at l = 0.95 when over-confident). The upper half reads like HPD coverage.
    # A mean over levels exceeds 0.1 only if the sup deviation does, which DKW makes rare
    # for a calibrated posterior.
    if name == "exact":
        assert max_coverage_deviation(DEFAULT_LEVELS, coverage) < CALIBRATED_TOLERANCE
    elif name == "over-confident":
        assert upper.mean() < -0.1  # measured -0.13 and -0.12
        assert np.all(upper < 0)
    else:
        assert upper.mean() > 0.1  # measured +0.17 and +0.16
        assert np.all(upper > 0)


def test_hpd_coverage_direction(case: tuple[str, float, Pairs]) -> None:
    name, _, pairs = case
    deviation = hpd_coverage(pairs.log_prob_samples, pairs.log_prob_true) - DEFAULT_LEVELS
    # Analytic mean deviations: -0.31 (over-confident) and +0.31 (under-confident).
    if name == "over-confident":
        assert deviation.mean() < -0.2
    elif name == "under-confident":
        assert deviation.mean() > 0.2


def test_hpd_coverage_convention() -> None:
    # Two of four samples are denser than the truth: alpha = 0.5, covered only for l > 0.5.
    coverage = hpd_coverage(np.array([[0.0, 1.0, 2.0, 3.0]]), np.array([1.5]), [0.25, 0.5, 0.75])
    np.testing.assert_array_equal(coverage, [0.0, 0.0, 1.0])


def test_hpd_coverage_allows_zero_density() -> None:
    # A truth of zero density lies in no credible region of DEFAULT_LEVELS (alpha = 40.5 / 41,
    # above 0.95); a truth denser than every sample, some of zero density, lies in all of them
    # (alpha = 0.5 / 41, below 0.05).
    samples = np.array([np.linspace(0.0, 1.0, 40), np.r_[np.zeros(20), np.full(20, -np.inf)]])
    coverage = hpd_coverage(samples, np.array([-np.inf, 2.0]))
    assert np.all(coverage == 0.5)


def test_hpd_coverage_of_an_exact_posterior_is_on_the_diagonal_with_few_draws() -> None:
    # For an exact posterior the truth's rank among M draws is uniform on {0, ..., M}: with
    # M = 10 a rank of k / M put the curve ceil(l M) / (M + 1) below the diagonal by up to
    # 0.082, read as over-confidence; the mid-rank keeps it within 1 / (2 (M + 1)) = 0.045.
    # 20000 pairs: the binomial standard error is at most 0.0036, so 0.045 + 0.015 holds.
    rng = np.random.default_rng(0)
    log_prob = rng.normal(size=(20000, 11))
    coverage = hpd_coverage(log_prob[:, 1:], log_prob[:, 0])
    assert max_coverage_deviation(DEFAULT_LEVELS, coverage) < 0.045 + 0.015
    assert abs(np.mean(coverage - DEFAULT_LEVELS)) < 0.01  # no lean to either side


def test_tarp_coverage_is_reproducible() -> None:
    pairs = gaussian_pairs(1.0)
    a = tarp_coverage(pairs.samples, pairs.theta, rng=np.random.default_rng(3))
    b = tarp_coverage(pairs.samples, pairs.theta, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_max_coverage_deviation() -> None:
    levels = np.array([0.1, 0.5, 0.9])
    assert max_coverage_deviation(levels, np.array([0.1, 0.3, 0.95])) == pytest.approx(0.2)


# SBC


def test_sbc_ranks_known_answer() -> None:
    samples = np.array([[[0.0, 5.0], [1.0, 4.0], [2.0, 3.0]]])  # (1, 3, 2)
    ranks = sbc_ranks(samples, np.array([[1.5, 10.0]]))
    np.testing.assert_array_equal(ranks, [[2, 3]])
    assert np.issubdtype(ranks.dtype, np.integer)


def test_sbc_detects_miscalibration(case: tuple[str, float, Pairs]) -> None:
    name, _, pairs = case
    ranks = sbc_ranks(pairs.samples, pairs.theta)
    assert ranks.shape == (NUM_PAIRS, DIM)
    assert ranks.min() >= 0 and ranks.max() <= NUM_SAMPLES
    pvalues = sbc_uniformity_pvalues(ranks, NUM_SAMPLES)
    assert pvalues.shape == (DIM,)
    if name == "exact":
        # Under uniformity p ~ U(0, 1): P(min of 2 p-values < 0.001) = 0.002.
        assert pvalues.min() > 1e-3
    else:
        # Both miscalibrations pile ranks at the ends or the middle; chi2 with 50 bins and
        # n = 500 rejects them overwhelmingly (measured p < 1e-40).
        assert pvalues.max() < 1e-6


def test_sbc_histogram_uneven_bins() -> None:
    # M + 1 = 5 ranks in 2 bins: ranks 0, 1, 2 -> bin 0; 3, 4 -> bin 1.
    ranks = np.array([[0], [2], [3], [4]])
    counts, probs = sbc_histogram(ranks, num_samples=4, num_bins=2)
    np.testing.assert_array_equal(counts[:, 0], [2, 2])
    np.testing.assert_allclose(probs, [0.6, 0.4])


def test_sbc_default_bins_aim_at_ten_per_bin() -> None:
    counts, probs = sbc_histogram(np.zeros((500, 3), dtype=int), num_samples=500)
    assert counts.shape == (50, 3) and probs.shape == (50,)
    assert probs.sum() == pytest.approx(1.0)


# Validation of inputs


def test_hpd_coverage_rejects_bad_input() -> None:
    log_prob_samples, log_prob_true = np.zeros((4, 10)), np.zeros(4)
    bad = log_prob_samples.copy()
    bad[0, 0], bad[1, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"log_prob_samples holds 2 NaN or \+inf entries"):
        hpd_coverage(bad, log_prob_true)
    with pytest.raises(ValueError, match=r"log_prob_true holds 1 NaN"):
        hpd_coverage(log_prob_samples, np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(5,\)"):
        hpd_coverage(log_prob_samples, np.zeros(5))
    with pytest.raises(ValueError, match=r"2 samples per pair"):
        hpd_coverage(np.zeros((4, 1)), log_prob_true)
    with pytest.raises(ValueError, match=r"levels must be .* in \[0, 1\]"):
        hpd_coverage(log_prob_samples, log_prob_true, levels=np.array([0.5, 1.5]))


def test_tarp_coverage_rejects_bad_input() -> None:
    samples, theta = np.zeros((4, 10, 2)), np.zeros((4, 2))
    rng = np.random.default_rng(0)
    bad = samples.copy()
    bad[0, :3, 0] = np.nan
    with pytest.raises(ValueError, match=r"samples holds 3 NaN or inf entries out of 80"):
        tarp_coverage(bad, theta, rng=rng)
    with pytest.raises(ValueError, match=r"theta holds 1 NaN or inf"):
        tarp_coverage(samples, np.array([[0.0, np.inf], [0, 0], [0, 0], [0, 0]]), rng=rng)
    with pytest.raises(ValueError, match=r"\(4, 10, 2\).*\(4, 3\)"):
        tarp_coverage(samples, np.zeros((4, 3)), rng=rng)
    with pytest.raises(ValueError, match=r"\(4, 10, 2\).*\(5, 2\)"):
        tarp_coverage(samples, np.zeros((5, 2)), rng=rng)
    with pytest.raises(ValueError, match=r"2 samples"):
        tarp_coverage(np.zeros((4, 1, 2)), theta, rng=rng)
    with pytest.raises(ValueError, match=r"both low and high"):
        tarp_coverage(samples, theta, low=np.zeros(2), rng=rng)
    with pytest.raises(ValueError, match=r"high > low"):
        tarp_coverage(samples, theta, low=np.zeros(2), high=np.array([1.0, 0.0]), rng=rng)


def test_sbc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"samples holds 1 NaN"):
        sbc_ranks(np.array([[[np.nan], [0.0]]]), np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"\(1, 2, 1\).*\(1, 2\)"):
        sbc_ranks(np.zeros((1, 2, 1)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, num_samples=10\]"):
        sbc_uniformity_pvalues(np.array([[11], [0]]), num_samples=10)
    with pytest.raises(ValueError, match=r"ranks must be integers"):
        sbc_uniformity_pvalues(np.array([[0.5], [1.0]]), num_samples=10)
    with pytest.raises(ValueError, match=r"num_bins must lie in \[2, num_samples \+ 1\]"):
        sbc_uniformity_pvalues(np.zeros((20, 1), dtype=int), num_samples=10, num_bins=12)


def test_max_coverage_deviation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        max_coverage_deviation(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match=r"coverage holds 1 NaN"):
        max_coverage_deviation(np.zeros(2), np.array([0.0, np.nan]))


# C2ST

C2ST_SAMPLES = 1000  # per set: 2000 held-out predictions, accuracy standard error 0.011


def gaussian_sets(shift: float, dim: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples of N(0, I) and N(shift, I): Bayes-optimal accuracy Phi(|shift| sqrt(D) / 2)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(C2ST_SAMPLES, dim)), shift + rng.normal(size=(C2ST_SAMPLES, dim))


@pytest.fixture(scope="module")
def c2st_by_shift() -> dict[float, float]:
    return {shift: c2st(*gaussian_sets(shift)) for shift in (0.0, 0.5, 4.0)}


def test_c2st_identical_is_chance(c2st_by_shift: dict[float, float]) -> None:
    # 0.05 is over 4 standard errors of the held-out accuracy (0.011).
    assert abs(c2st_by_shift[0.0] - 0.5) < 0.05


def test_c2st_separable_is_one(c2st_by_shift: dict[float, float]) -> None:
    # Bayes-optimal accuracy Phi(4 sqrt(2) / 2) = 0.998.
    assert c2st_by_shift[4.0] > 0.97


def test_c2st_intermediate_shift(c2st_by_shift: dict[float, float]) -> None:
    # Bayes-optimal accuracy Phi(0.5 sqrt(2) / 2) = 0.638; a trained classifier reaches at
    # most that, up to 3 standard errors (0.03) of noise, and far more than chance.
    assert 0.57 < c2st_by_shift[0.5] < 0.638 + 0.035
    assert c2st_by_shift[0.0] < c2st_by_shift[0.5] < c2st_by_shift[4.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_c2st_learns_a_difference_of_width_from_a_few_hundred_samples(seed: int) -> None:
    """N(0, I) against N(0, diag(1/4, 1)) in 2-D, 300 samples per set: the classifier must learn
    the curved boundary (Bayes accuracy 0.662). One stopped after 10 epochs of a few Adam steps
    each scores 0.577 and 0.578 here: a pass for a posterior of the wrong width."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) * np.array([0.5, 1.0])
    # 600 held-out predictions: standard error 0.02; 0.6 is 3 of them below the 0.662 reached.
    assert c2st(p, q, seed=5) > 0.6


def test_c2st_waits_as_many_steps_at_any_size() -> None:
    from pipeline.diagnostics.c2st import _patience

    # sbibm's 10^4 samples per set and 5 folds: sklearn's 10 epochs, its figures unchanged.
    assert _patience(10_000, 5) == 10 and _patience(100_000, 5) == 10
    assert _patience(300, 5) == 240 and _patience(1000, 5) == 90


def test_c2st_without_early_stopping() -> None:
    # The sbibm setting; small sets keep the 10000-iteration training short.
    p, q = gaussian_sets(4.0)
    assert c2st(p[:200], q[:200], early_stopping=False) > 0.95


def test_c2st_max_samples_and_unequal_sizes() -> None:
    p, q = gaussian_sets(4.0)
    assert c2st(p, q[:300], max_samples=200) > 0.95
    # max_samples at or above the set size changes nothing.
    assert c2st(p[:200], q[:200], max_samples=500) == c2st(p[:200], q[:200])


def test_c2st_batched_matches_c2st() -> None:
    rng = np.random.default_rng(2)
    p = rng.normal(size=(3, 100, 2))
    q = rng.normal(size=(3, 100, 2)) + np.array([0.0, 1.0, 4.0])[:, None, None]
    serial = c2st_batched(p, q)
    assert serial.shape == (3,)
    np.testing.assert_array_equal(serial, [c2st(p_i, q_i) for p_i, q_i in zip(p, q, strict=True)])
    np.testing.assert_array_equal(c2st_batched(p, q, n_jobs=2), serial)


def test_c2st_rejects_bad_input() -> None:
    p, q = gaussian_sets(0.0)
    bad = p.copy()
    bad[:2, 0] = np.nan
    with pytest.raises(ValueError, match=r"p holds 2 NaN or inf"):
        c2st(bad, q)
    bad = q.copy()
    bad[0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"q holds 1 NaN or inf"):
        c2st(p, bad)
    with pytest.raises(ValueError, match=r"D=2 .*D=3"):
        c2st(p, np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"needs at least 20 samples .* got 15"):
        c2st(p, q, max_samples=15)
    with pytest.raises(ValueError, match=r"needs at least 10 samples .* got 9"):
        c2st(p[:9], q, early_stopping=False)
    with pytest.raises(ValueError, match=r"num_folds must be >= 2"):
        c2st(p, q, num_folds=1)
    with pytest.raises(ValueError, match=r"max_samples must be >= 1"):
        c2st(p, q, max_samples=0)
    with pytest.raises(ValueError, match=r"shape \(M, D\)"):
        c2st(p[None], q)


def test_c2st_batched_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"observations.*\(2, 50, 2\).*\(3, 50, 2\)"):
        c2st_batched(np.zeros((2, 50, 2)), np.zeros((3, 50, 2)))
    with pytest.raises(ValueError, match=r"p must have shape \(n, M, D\)"):
        c2st_batched(np.zeros((50, 2)), np.zeros((50, 2)))
    with pytest.raises(ValueError, match=r"needs at least 20 samples .* got 19"):
        c2st_batched(np.zeros((2, 19, 2)), np.zeros((2, 50, 2)))
    q = np.zeros((2, 50, 2))
    q[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"q holds 1 NaN"):
        c2st_batched(np.zeros((2, 50, 2)), q)

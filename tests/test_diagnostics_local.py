"""Local C2ST and posterior predictive checks against known answers.

The model is conjugate: theta ~ N(0, I_D), x | theta ~ N(theta, sigma^2 I_D), with exact
posterior N(x / (1 + sigma^2), sigma^2 / (1 + sigma^2) I_D). The estimator under test is that
posterior with its standard deviation scaled by ``s``: exact for s = 1, over-confident for
s = 0.5 and under-confident for s = 2. Tolerances on coverage curves come from the DKW
inequality: for n pairs, P(sup_l |coverage(l) - expected(l)| > eps) <= 2 exp(-2 n eps^2).
Seeds are fixed, so every test is deterministic; the bounds say why the values are not luck.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy import stats

from pipeline.diagnostics import (
    DEFAULT_LEVELS,
    LocalC2ST,
    local_c2st,
    max_coverage_deviation,
    predictive_coverage,
    predictive_intervals,
    predictive_pvalues,
)

DIM = 2
SIGMA = 0.5
POSTERIOR_VAR = SIGMA**2 / (1 + SIGMA**2)  # 0.2
SCALES = {"exact": 1.0, "over-confident": 0.5, "under-confident": 2.0}


def simulate(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return theta + SIGMA * rng.normal(size=theta.shape)


def posterior_draws(
    x: np.ndarray, scale: float, num: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Draws of the scaled posterior: shape (n, D) if num is None, else (n, num, D)."""
    loc = x / (1 + SIGMA**2)
    if num is not None:
        loc = np.repeat(loc[:, None, :], num, axis=1)
    return loc + scale * np.sqrt(POSTERIOR_VAR) * rng.normal(size=loc.shape)


def chi2_coverage(levels: np.ndarray, ratio: float) -> np.ndarray:
    """P(x in the central level-l region of N(m, v_pred I)) when x ~ N(m, v_true I).

    The squared distance |x - m|^2 / v_pred is (v_true / v_pred) chi2_D, and the region is
    where it is below F^-1(l), F the chi2_D CDF; ``ratio`` is v_pred / v_true.
    """
    chi2 = stats.chi2(DIM)
    return chi2.cdf(ratio * chi2.ppf(levels))


def predictive_variance(scale: float) -> float:
    """Per-dimension variance of x_pred = theta_s + noise, theta_s from the scaled posterior."""
    return scale**2 * POSTERIOR_VAR + SIGMA**2


# Local C2ST

LC2ST_PAIRS = 1000
LC2ST_DRAWS = 500
LC2ST_OBS = 10
# 19 null fits (the minimum) make the smallest p-value 1/20 = 0.05 and keep each case near
# 20 fits of about 0.2 s; the default of 100 is in the slow test below.
LC2ST_NULL = 19


def lc2st_inputs(
    scale: float, num_pairs: int = LC2ST_PAIRS, num_obs: int = LC2ST_OBS, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    theta_cal = rng.normal(size=(num_pairs, DIM))
    x_cal = simulate(theta_cal, rng)
    x_obs = simulate(rng.normal(size=(num_obs, DIM)), rng)
    return {
        "theta_cal": theta_cal,
        "x_cal": x_cal,
        "theta_q_cal": posterior_draws(x_cal, scale, None, rng),
        "theta_q_obs": posterior_draws(x_obs, scale, LC2ST_DRAWS, rng),
        "x_obs": x_obs,
    }


@functools.cache
def lc2st_result(name: str) -> LocalC2ST:
    """One local C2ST per estimator, computed once (about 20 fits of 0.3 s each)."""
    return local_c2st(**lc2st_inputs(SCALES[name]), num_null=LC2ST_NULL, seed=0)


@pytest.mark.parametrize("name", list(SCALES))
def test_local_c2st_shapes(name: str) -> None:
    result = lc2st_result(name)
    assert result.statistic.shape == (LC2ST_OBS,)
    assert result.pvalue.shape == (LC2ST_OBS,)
    assert result.dispersion_correlation.shape == (LC2ST_OBS,)
    assert result.null_statistic.shape == (LC2ST_NULL, LC2ST_OBS)
    assert result.probability.shape == (LC2ST_OBS, LC2ST_DRAWS)
    assert np.all((result.pvalue >= 1 / (LC2ST_NULL + 1)) & (result.pvalue <= 1))
    assert np.all((result.statistic >= 0) & (result.statistic <= 0.25))
    assert np.all(np.abs(result.dispersion_correlation) <= 1)


def test_local_c2st_exact_posterior_passes() -> None:
    result = lc2st_result("exact")
    # Under the null each p-value is super-uniform, P(p <= 0.05) <= 0.05: on average at most
    # 0.5 of 10 observations, so 3 or more would be suspicious (Markov: probability <= 1/6
    # however dependent the observations; they share one classifier). Half of 10
    # super-uniform p-values below 0.2 is as unlikely. Measured: none below 0.15, median 0.38.
    assert np.sum(result.pvalue <= 0.05) <= 2
    assert np.median(result.pvalue) > 0.2


@pytest.mark.parametrize("name", ["over-confident", "under-confident"])
def test_local_c2st_detects_miscalibration_and_direction(name: str) -> None:
    result = lc2st_result(name)
    # A width off by a factor of 2 is far outside the null: every p-value is the smallest
    # possible, 1/20, i.e. T beats all 19 null classifiers at every observation (measured:
    # T of 0.025 to 0.088 against null statistics of at most 0.011).
    np.testing.assert_array_equal(result.pvalue, 1 / (LC2ST_NULL + 1))
    # The classifier flags the centre of an over-confident estimator (d falls with the
    # distance from the draws' mean) and the tails of an under-confident one (d rises).
    # Measured: -0.99 to -0.93 and +0.93 to +0.99 (the exact posterior: -0.01 to +0.42, a
    # sign without meaning where nothing is rejected).
    if name == "over-confident":
        assert np.all(result.dispersion_correlation < -0.5)
    else:
        assert np.all(result.dispersion_correlation > 0.5)


def test_local_c2st_flattens_data_and_ignores_n_jobs() -> None:
    # A small calibration set: this checks bookkeeping, not power.
    inputs = lc2st_inputs(2.0, num_pairs=100, num_obs=3)
    serial = local_c2st(**inputs, num_null=LC2ST_NULL, seed=1)
    # x of shape (N, 2, 1) is flattened to (N, 2): the same features, the same result.
    shaped = dict(inputs, x_cal=inputs["x_cal"][:, :, None], x_obs=inputs["x_obs"][:, :, None])
    fits: list[int] = []
    parallel = local_c2st(**shaped, num_null=LC2ST_NULL, seed=1, n_jobs=2, progress=fits.append)
    assert fits == [1] * LC2ST_NULL  # one progress call per null fit, also from workers
    for field in ("statistic", "pvalue", "dispersion_correlation", "null_statistic"):
        np.testing.assert_array_equal(getattr(parallel, field), getattr(serial, field))
    # Another seed gives other classifiers.
    other = local_c2st(**inputs, num_null=LC2ST_NULL, seed=2)
    assert not np.array_equal(other.null_statistic, serial.null_statistic)


def test_local_c2st_constant_features() -> None:
    # A constant data feature and draws that collapse onto one point in one parameter
    # dimension: no division by zero, finite results.
    inputs = lc2st_inputs(1.0, num_pairs=100, num_obs=2)
    inputs["x_cal"] = np.concatenate([inputs["x_cal"], np.ones((100, 1))], axis=1)
    inputs["x_obs"] = np.concatenate([inputs["x_obs"], np.ones((2, 1))], axis=1)
    inputs["theta_q_obs"][:, :, 1] = 0.3
    result = local_c2st(**inputs, num_null=LC2ST_NULL)
    for field in ("statistic", "pvalue", "dispersion_correlation", "null_statistic"):
        assert np.all(np.isfinite(getattr(result, field)))


@pytest.mark.slow
def test_local_c2st_default_settings() -> None:
    # The validate stage's default size: N = 1000 pairs, D = 2, M = 1000 draws, 5 observations
    # and the default 100 null fits.
    inputs = lc2st_inputs(0.5, num_obs=5)
    rng = np.random.default_rng(5)
    inputs["theta_q_obs"] = posterior_draws(inputs["x_obs"], 0.5, 1000, rng)
    result = local_c2st(**inputs)
    np.testing.assert_array_equal(result.pvalue, 1 / 101)
    assert np.all(result.dispersion_correlation < -0.5)


def test_local_c2st_rejects_bad_input() -> None:
    good = lc2st_inputs(1.0, num_pairs=30, num_obs=2)

    def call(**changes: object) -> None:
        options = {key: changes.pop(key) for key in ("num_null", "hidden_units") if key in changes}
        local_c2st(**dict(good, **changes), **options)

    for name in ("theta_cal", "x_cal", "theta_q_cal", "theta_q_obs", "x_obs"):
        bad = good[name].copy()
        bad.flat[[0, 3]] = [np.nan, np.inf]
        with pytest.raises(ValueError, match=rf"^{name} holds 2 NaN or inf entries out of"):
            call(**{name: bad})
    with pytest.raises(ValueError, match=r"theta_cal must have shape \(N, D\)"):
        call(theta_cal=good["theta_cal"][:, 0])
    with pytest.raises(ValueError, match=r"theta_q_cal has shape \(30, 3\) but theta_cal"):
        call(theta_q_cal=np.zeros((30, 3)))
    with pytest.raises(ValueError, match=r"x_cal must have shape \(N, F\).*N=30.*\(29, 2\)"):
        call(x_cal=good["x_cal"][:29])
    with pytest.raises(ValueError, match=r"at least 20 calibration pairs .* got N=19"):
        call(**{key: good[key][:19] for key in ("theta_cal", "x_cal", "theta_q_cal")})
    with pytest.raises(ValueError, match=r"theta_q_obs must have shape \(n_obs, M, D\)"):
        call(theta_q_obs=good["theta_q_obs"][0])
    with pytest.raises(ValueError, match=r"theta_q_obs has D=1 .* theta_cal has D=2"):
        call(theta_q_obs=good["theta_q_obs"][:, :, :1])
    with pytest.raises(ValueError, match=r"x_obs has shape \(3, 2\), expected .* \(2, 2\)"):
        call(x_obs=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"x_obs has shape \(2, 3\), expected .* \(2, 2\)"):
        call(x_obs=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"at least 20 estimator draws .* got M=19"):
        call(theta_q_obs=good["theta_q_obs"][:, :19])
    with pytest.raises(ValueError, match=r"at least 1 observation"):
        call(theta_q_obs=good["theta_q_obs"][:0], x_obs=good["x_obs"][:0])
    with pytest.raises(ValueError, match=r"num_null must be >= 19 .* got 10"):
        call(num_null=10)
    with pytest.raises(ValueError, match=r"hidden_units must be >= 1"):
        call(hidden_units=0)


# Posterior predictive checks

PPC_PAIRS = 500
PPC_DRAWS = 500
# DKW with n = 500 and eps = 0.08 bounds the chance of a larger deviation by 0.003; 0.02 more
# absorbs the estimated covariance (S = 500 draws: about 6% error on each variance) and the
# discreteness of the rank (1 / (S + 1)). As in tests/test_diagnostics.py.
CALIBRATED_TOLERANCE = 0.1


def predictive_pairs(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Observations, fresh replicates from the same theta and predictive draws given x_obs."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(PPC_PAIRS, DIM))
    x_obs = simulate(theta, rng)
    x_rep = simulate(theta, rng)
    x_pred = simulate(posterior_draws(x_obs, scale, PPC_DRAWS, rng), rng)
    return {"x_obs": x_obs, "x_rep": x_rep, "x_pred": x_pred}


@pytest.fixture(scope="module", params=list(SCALES))
def ppc_case(request: pytest.FixtureRequest) -> tuple[str, float, dict[str, np.ndarray]]:
    name = request.param
    return name, SCALES[name], predictive_pairs(SCALES[name])


def test_predictive_coverage_matches_analytic_curve(
    ppc_case: tuple[str, float, dict[str, np.ndarray]],
) -> None:
    _, scale, pairs = ppc_case
    coverage = predictive_coverage(pairs["x_rep"], pairs["x_pred"])
    # x_rep - m ~ N(0, v_true I) with m = x_obs / (1 + sigma^2) and v_true the exact
    # predictive variance; the draws spread with v_pred = predictive_variance(scale).
    ratio = predictive_variance(scale) / predictive_variance(1.0)
    assert coverage.shape == DEFAULT_LEVELS.shape
    np.testing.assert_allclose(
        coverage, chi2_coverage(DEFAULT_LEVELS, ratio), atol=CALIBRATED_TOLERANCE
    )


def test_predictive_coverage_direction(
    ppc_case: tuple[str, float, dict[str, np.ndarray]],
) -> None:
    name, _, pairs = ppc_case
    coverage = predictive_coverage(pairs["x_rep"], pairs["x_pred"])
    deviation = coverage - DEFAULT_LEVELS
    # Analytic mean deviations: -0.10 (over-confident, v_pred / v_true = 2/3) and +0.21
    # (under-confident, 7/3); the data noise dilutes a wrong width, so both are smaller than
    # in parameter space. A mean over levels beyond 0.05 needs a sup deviation beyond it.
    if name == "exact":
        assert max_coverage_deviation(DEFAULT_LEVELS, coverage) < CALIBRATED_TOLERANCE
    elif name == "over-confident":
        assert deviation.mean() < -0.05
        assert np.all(deviation[DEFAULT_LEVELS > 0.5] < 0)
    else:
        assert deviation.mean() > 0.1
        assert np.all(deviation[DEFAULT_LEVELS > 0.5] > 0)


def test_predictive_coverage_is_exact_for_few_draws() -> None:
    # Pooling x_rep with the draws makes its rank uniform on {0, ..., S} for any exchangeable
    # set, however small S and whatever the distribution: here S = 20 draws in 3-D from a
    # heavy-tailed Student t. With the mid-rank (k + 1/2) / (S + 1) the exact coverage is
    # ceil(l (S + 1) - 1/2) / (S + 1), within 1 / (2 (S + 1)) of the diagonal. DKW with
    # n = 4000 and eps = 0.04: 2 exp(-12.8) < 1e-5.
    rng = np.random.default_rng(3)
    points = rng.standard_t(df=3, size=(4000, 21, 3))
    coverage = predictive_coverage(points[:, 0], points[:, 1:])
    expected = np.ceil(DEFAULT_LEVELS * 21 - 0.5) / 21
    assert np.abs(expected - DEFAULT_LEVELS).max() <= 0.5 / 21
    np.testing.assert_allclose(coverage, expected, atol=0.04)


def test_predictive_pvalues_match_analytic(
    ppc_case: tuple[str, float, dict[str, np.ndarray]],
) -> None:
    name, scale, pairs = ppc_case
    pvalues = predictive_pvalues(pairs["x_obs"], pairs["x_pred"])
    assert pvalues.shape == (PPC_PAIRS,)
    assert np.all((pvalues >= 1 / (PPC_DRAWS + 1)) & (pvalues <= 1))
    # The draws follow N(m, v_pred I), so p -> P(chi2_D >= |x_obs - m|^2 / v_pred) as S grows.
    # With S = 500: Monte Carlo error sd <= 0.5 / sqrt(500) = 0.022, and the estimated mean is
    # off by 0.045 sd per dimension, which matters because x_obs sits near the centre (its
    # distance is small, where a shift changes it most). Typical errors add to about 0.02
    # (measured mean 0.012 to 0.020); the worst of 500 pairs, with a mean estimate 3.3 sd off,
    # deviates by up to 0.14 (measured), inside 0.2.
    loc = pairs["x_obs"] / (1 + SIGMA**2)
    distance = np.sum((pairs["x_obs"] - loc) ** 2, axis=1) / predictive_variance(scale)
    error = np.abs(pvalues - stats.chi2(DIM).sf(distance))
    assert error.mean() < 0.03
    assert error.max() < 0.2
    if name == "exact":
        # Conservative: x_obs informed the posterior, so it sits closer to the predictive mean
        # than a draw (|x_obs - m|^2 is 1/9 of a draw's on average here): no p-value is small.
        assert pvalues.mean() > 0.5
        assert pvalues.min() > 0.05


def test_predictive_pvalues_flag_prior_data_conflict() -> None:
    # x_obs = (10, 10) lies 7 prior-predictive sds out; the exact posterior N(8, 0.2) cannot
    # reach it, and x_obs - m = (2, 2) gives |.|^2 / v = 17.8, chi2_2 tail 1.4e-4, below the
    # smallest p-value of 500 draws: every p is 1/501.
    rng = np.random.default_rng(4)
    x_obs = np.full((5, DIM), 10.0)
    x_pred = simulate(posterior_draws(x_obs, 1.0, PPC_DRAWS, rng), rng)
    np.testing.assert_array_equal(predictive_pvalues(x_obs, x_pred), 1 / (PPC_DRAWS + 1))


def test_predictive_regularises_singular_covariance() -> None:
    pairs = predictive_pairs(1.0)
    x_obs, x_pred = pairs["x_obs"][:50], pairs["x_pred"][:50]
    reference = predictive_pvalues(x_obs, x_pred)
    # A feature constant over draws and observation contributes nothing.
    zeros_obs, zeros_pred = np.zeros((50, 1)), np.zeros((50, PPC_DRAWS, 1))
    with_constant = predictive_pvalues(
        np.concatenate([x_obs, zeros_obs], axis=1), np.concatenate([x_pred, zeros_pred], axis=2)
    )
    np.testing.assert_array_equal(with_constant, reference)
    # A duplicated feature makes the covariance singular; the 1e-6 ridge keeps the distance
    # that of the single feature (up to a relative 1e-6, which moves no rank here).
    duplicated = predictive_pvalues(
        np.concatenate([x_obs, x_obs[:, :1]], axis=1),
        np.concatenate([x_pred, x_pred[:, :, :1]], axis=2),
    )
    np.testing.assert_array_equal(duplicated, reference)
    # A feature constant over the draws but not in x_obs: the observation is impossible under
    # the predictive distribution and gets the smallest p-value, without dividing by zero.
    shifted = predictive_pvalues(
        np.concatenate([x_obs, zeros_obs + 1.0], axis=1),
        np.concatenate([x_pred, zeros_pred], axis=2),
    )
    np.testing.assert_array_equal(shifted, 1 / (PPC_DRAWS + 1))


def test_predictive_accepts_data_shapes() -> None:
    pairs = predictive_pairs(1.0)
    x_obs, x_pred = pairs["x_obs"][:20], pairs["x_pred"][:20]
    np.testing.assert_array_equal(
        predictive_pvalues(x_obs[:, None, :], x_pred[:, :, None, :]),
        predictive_pvalues(x_obs, x_pred),
    )


def test_predictive_is_scale_invariant() -> None:
    # Mahalanobis distances ignore the units of each feature, down to extreme ones whose
    # squares would overflow or underflow.
    pairs = predictive_pairs(1.0)
    x_obs, x_pred = pairs["x_obs"][:20], pairs["x_pred"][:20]
    units = np.array([1e-200, 1e200])
    np.testing.assert_array_equal(
        predictive_pvalues(x_obs * units, x_pred * units), predictive_pvalues(x_obs, x_pred)
    )


def test_predictive_intervals() -> None:
    rng = np.random.default_rng(6)
    loc = np.array([[0.0, 1.0, 2.0], [-1.0, 0.0, 5.0]])  # (n, F)
    x_pred = loc[:, None, :] + rng.normal(size=(2, 20000, 3))
    bands = predictive_intervals(x_pred, [0.05, 0.5, 0.95])
    assert bands.shape == (2, 3, 3)
    # Sample quantiles of 20000 normal draws: sd about 0.015 at the tails, 0.009 at the median.
    expected = loc[:, None, :] + stats.norm.ppf([0.05, 0.5, 0.95])[None, :, None]
    np.testing.assert_allclose(bands, expected, atol=0.06)
    assert predictive_intervals(x_pred.reshape(2, 20000, 3, 1), [0.5]).shape == (2, 1, 3, 1)


def test_predictive_rejects_bad_input() -> None:
    x_obs, x_pred = np.zeros((3, 2)), np.random.default_rng(0).normal(size=(3, 30, 2))
    bad = x_obs.copy()
    bad[0, 0], bad[2, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"x_obs holds 2 NaN or inf entries out of 6"):
        predictive_pvalues(bad, x_pred)
    with pytest.raises(ValueError, match=r"x_rep holds 2 NaN or inf entries out of 6"):
        predictive_coverage(bad, x_pred)
    bad = x_pred.copy()
    bad[1, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"x_pred holds 1 NaN or inf entries out of 180"):
        predictive_pvalues(x_obs, bad)
    with pytest.raises(ValueError, match=r"x_pred holds 1 NaN or inf"):
        predictive_intervals(bad, [0.5])
    with pytest.raises(ValueError, match=r"x_pred has shape \(3, 30, 2\) but x_obs .*\(4, 2\)"):
        predictive_pvalues(np.zeros((4, 2)), x_pred)
    with pytest.raises(ValueError, match=r"x_pred has shape \(3, 30, 2\) but x_rep .*\(3, 3\)"):
        predictive_coverage(np.zeros((3, 3)), x_pred)
    with pytest.raises(ValueError, match=r"x_obs must have shape \(n, F\)"):
        predictive_pvalues(np.zeros(2), x_pred)
    with pytest.raises(ValueError, match=r"x_pred must have shape \(n, S, F\)"):
        predictive_pvalues(x_obs, x_pred[:, 0])
    with pytest.raises(ValueError, match=r"at least 20 predictive draws .* got S=19"):
        predictive_pvalues(x_obs, x_pred[:, :19])
    with pytest.raises(ValueError, match=r"at least 31 predictive draws .*F=30.* got S=30"):
        predictive_pvalues(np.zeros((3, 30)), np.zeros((3, 30, 30)))
    with pytest.raises(ValueError, match=r"at least 1 observation"):
        predictive_pvalues(x_obs[:0], x_pred[:0])
    with pytest.raises(ValueError, match=r"levels must be .* in \[0, 1\]"):
        predictive_coverage(x_obs, x_pred, levels=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"quantiles must be .* in \[0, 1\]"):
        predictive_intervals(x_pred, [-0.1, 0.5])
    with pytest.raises(ValueError, match=r"2 draws"):
        predictive_intervals(x_pred[:, :1], [0.5])
    with pytest.raises(ValueError, match=r"x_pred must have shape \(n, S, F\)"):
        predictive_intervals(x_pred[:, 0], [0.5])

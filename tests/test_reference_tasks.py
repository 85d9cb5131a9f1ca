"""Tests of the sbibm tasks gaussian_mixture, slcp and bernoulli_glm, of the MCMC module behind
their references, and of the reference contract (``Task.reference``, the observation file's
record of how its references were drawn).

Simulators are checked against their definitions, written out again here; reference posteriors
against the analytic formula (gaussian_mixture) or against importance sampling, an independent
method (slcp, bernoulli_glm). Every test uses a fixed seed, so a statistical threshold is a
deterministic pass or fail; thresholds are ~5 standard errors (or p > 0.001), which a correct
implementation passes with a wide margin and the errors they guard against fail by far.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pipeline import mcmc
from pipeline.observations import make_observations, read_reference, read_reference_info
from pipeline.tasks import MultivariateNormal, Reference, Task, get_task
from pipeline.tasks.bernoulli_glm import BernoulliGLM, prior_precision
from pipeline.tasks.gaussian_mixture import GaussianMixture
from pipeline.tasks.slcp import SLCP
from pipeline.tasks.two_moons import TwoMoons

NEW = ("gaussian_mixture", "slcp", "bernoulli_glm")
MCMC = ("slcp", "bernoulli_glm")

# sbibm's observation 1 of bernoulli_glm: the spike train (files/num_observation_1/
# observation_raw.csv) and its summary statistics (observation.csv), as stored (float32).
SBIBM_GLM_SPIKES = np.array(
    [int(c) for c in "1101111111100000011111110001110111100000111100001110001111001100011111"]
    + [int(c) for c in "001110000000111000111110000111"]
)
SBIBM_GLM_X = np.array(
    [56.0, 3.32306, 14.356438, 11.104893, -4.167525]
    + [-18.507809, -21.917496, -9.553517, -0.357257, -5.497825]
)
# sbibm's observation 1 of slcp (files/num_observation_1/observation.csv, true_parameters.csv).
SBIBM_SLCP_X = np.array(
    [2.3718784, 0.49947417, 9.931435, 1.7136912, -10.436423, -1.9067793, -1.2343777, -0.09735]
)
SBIBM_SLCP_THETA = np.array([-2.8581212, -0.44451332, 2.9473476, 1.2396116, 2.9712725])


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {name: get_task(name) for name in NEW}


def weighted_moments(samples: np.ndarray, log_weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Self-normalised importance-sampling mean, std (per column) and the weights' ESS."""
    w = np.exp(log_weights - log_weights.max())
    w /= w.sum()
    mean = w @ samples
    std = np.sqrt(w @ (samples - mean) ** 2)
    return mean, std, 1 / np.sum(w**2)


def assert_moments_agree(
    samples: np.ndarray, ess_samples: float, mean: np.ndarray, std: np.ndarray, ess_is: float
) -> None:
    """Means and stds of two samplers agree within 5 combined standard errors (~Gaussian)."""
    se_mean = std * np.sqrt(1 / ess_samples + 1 / ess_is)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * se_mean)
    # se(std) / std = 1 / sqrt(2 n) for Gaussian-like marginals; the ridges of slcp have
    # heavier tails, so the 5 is a margin, not a calibrated level.
    se_std = std * np.sqrt(1 / (2 * ess_samples) + 1 / (2 * ess_is))
    np.testing.assert_array_less(np.abs(samples.std(0) - std), 5 * se_std)


# The reference contract.


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("gaussian_linear", "exact (analytic)"),
        ("two_moons", "exact (rejection)"),
        ("gaussian_mixture", "exact (rejection)"),
        ("slcp", "mcmc (emcee)"),
        ("bernoulli_glm", "mcmc (emcee)"),
    ],
)
def test_reference_carries_method_and_matches_reference_posterior(name: str, method: str) -> None:
    task = get_task(name)
    _, x = task.simulate_block(1, np.random.default_rng(20))
    reference = task.reference(x[0], 200, np.random.default_rng(21))
    assert isinstance(reference, Reference)
    assert reference.method == task.reference_method == method
    assert reference.samples.shape == (200, task.dim_theta)
    assert reference.samples.dtype == np.float64
    samples = task.reference_posterior(x[0], 200, np.random.default_rng(21))
    np.testing.assert_array_equal(samples, reference.samples)
    if method.startswith("exact"):
        assert reference.diagnostics == {}
    else:
        assert {"rhat_max", "ess_bulk_min", "acceptance"} <= set(reference.diagnostics)
        assert all(isinstance(v, float) for v in reference.diagnostics.values())


def test_sn_cosmology_reference_method_is_grid() -> None:
    assert get_task("sn_cosmology").reference_method == "grid"


def test_task_overriding_only_reference_has_reference() -> None:
    class OnlyReference(TwoMoons):
        reference_posterior = Task.reference_posterior

        def reference(
            self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
        ) -> Reference:
            return Reference(np.zeros((num_samples, 2)), "constant", {"answer": 42.0})

    class NoReference(TwoMoons):
        reference_posterior = Task.reference_posterior

    only = OnlyReference()
    assert only.has_reference
    assert only.reference_posterior(np.zeros(2), 3, np.random.default_rng(0)).shape == (3, 2)
    none = NoReference()
    assert not none.has_reference
    for method in (none.reference, none.reference_posterior):
        with pytest.raises(NotImplementedError, match="no reference posterior"):
            method(np.zeros(2), 3, np.random.default_rng(0))


@pytest.mark.parametrize("name", NEW)
def test_reference_rejects_bad_observations(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    with pytest.raises(ValueError, match="shape"):
        task.reference(np.zeros((1, *task.x_shape)), 10, np.random.default_rng(0))
    x_obs = np.zeros(task.x_shape)
    x_obs[0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        task.reference(x_obs, 10, np.random.default_rng(0))


@pytest.mark.parametrize("name", NEW)
def test_reference_is_deterministic(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    _, x = task.simulate_block(1, np.random.default_rng(22))
    a = task.reference(x[0], 300, np.random.default_rng(23))
    b = task.reference(x[0], 300, np.random.default_rng(23))
    c = task.reference(x[0], 300, np.random.default_rng(24))
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.diagnostics == b.diagnostics
    assert not np.array_equal(a.samples, c.samples)


def test_observations_record_reference_method_and_diagnostics(tmp_path: Path) -> None:
    out = tmp_path / "slcp.h5"
    make_observations(get_task("slcp"), 2, 100, seed=3, out=out)
    theta, x, reference = read_reference(out)
    assert theta.shape == (2, 5) and x.shape == (2, 8) and reference.shape == (2, 100, 5)
    info = read_reference_info(out)
    assert info["method"] == "mcmc (emcee)"
    assert len(info["diagnostics"]) == 2
    for diagnostics in info["diagnostics"]:
        assert diagnostics["rhat_max"] <= 1.01 and diagnostics["seconds"] > 0

    exact = tmp_path / "gaussian_mixture.h5"
    make_observations(get_task("gaussian_mixture"), 2, 100, seed=3, out=exact)
    info = read_reference_info(exact)
    assert info["method"] == "exact (rejection)"
    assert [set(d) for d in info["diagnostics"]] == [{"seconds"}, {"seconds"}]

    without = tmp_path / "none.h5"
    make_observations(get_task("gaussian_mixture"), 1, 0, seed=3, out=without)
    assert read_reference_info(without) is None


def test_read_reference_info_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pipeline observe"):
        read_reference_info(tmp_path / "absent.h5")


# The full-covariance Gaussian prior (bernoulli_glm's).


def test_multivariate_normal_prior_matches_scipy() -> None:
    precision = prior_precision()
    prior = MultivariateNormal(loc=tuple(np.arange(10.0)), precision=tuple(map(tuple, precision)))
    cov = np.linalg.inv(precision)
    theta = prior.sample(200_000, np.random.default_rng(25))
    expected = stats.multivariate_normal(np.arange(10.0), cov).logpdf(theta[:5])
    np.testing.assert_allclose(prior.log_prob(theta[:5]), expected, rtol=1e-12)
    # se of a covariance entry <= sqrt(2 / n) * max variance = 0.0032 * 2 for n = 2e5.
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(theta.mean(0), np.arange(10.0), atol=5 * sd.max() / np.sqrt(2e5))
    np.testing.assert_allclose(np.cov(theta.T), cov, atol=5 * np.sqrt(2 / 2e5) * sd.max() ** 2)
    assert prior.bounds is None and prior.dim == 10


# gaussian_mixture.


def mixture_cdf(t: np.ndarray, x_obs: np.ndarray, i: int, bound: float = 10.0) -> np.ndarray:
    """CDF of the ``i``-th marginal of the exact posterior, from its formula.

    ``p(theta | x) ~ sum_k 1/2 N(theta; x, s_k^2 I)`` on the box: component ``k`` keeps the
    mass ``Z_k = prod_j P(N(x_j, s_k^2) in [-b, b])``, so the posterior is the mixture of the
    truncated components with weights ``~ Z_k``; marginal ``i`` of component ``k`` is
    ``N(x_i, s_k^2)`` truncated to ``[-b, b]``.
    """
    scales = (1.0, 0.1)
    masses = [stats.norm(x_obs, s).cdf(bound) - stats.norm(x_obs, s).cdf(-bound) for s in scales]
    weights = np.array([m.prod() for m in masses])
    weights /= weights.sum()
    cdf = 0
    for weight, s, mass in zip(weights, scales, masses, strict=True):
        normal = stats.norm(x_obs[i], s)
        cdf = cdf + weight * (normal.cdf(np.clip(t, -bound, bound)) - normal.cdf(-bound)) / mass[i]
    return cdf


@pytest.mark.parametrize("theta", [(3.0, -4.0), (9.9, -10.0)])
def test_gaussian_mixture_simulator_matches_definition(theta: tuple[float, float]) -> None:
    n = 200_000
    x = GaussianMixture().simulate(np.tile(theta, (n, 1)), np.random.default_rng(26))
    r = x - np.asarray(theta)

    def noise_cdf(u: np.ndarray) -> np.ndarray:
        return 0.5 * stats.norm(0, 1).cdf(u) + 0.5 * stats.norm(0, 0.1).cdf(u)

    for i in range(2):
        assert stats.kstest(r[:, i], noise_cdf).pvalue > 1e-3
    # Both coordinates share the row's component: E[r1^2 r2^2] = (1 + 0.1^4) / 2 = 0.50005,
    # against E[r1^2] E[r2^2] = 0.505^2 = 0.255 if they did not. sd(r1^2 r2^2) ~ 2.1, so
    # se = 2.1 / sqrt(2e5) = 0.0047. sbibm's one-component-per-batch bug fails the KS above.
    assert abs(np.mean(r[:, 0] ** 2 * r[:, 1] ** 2) - 0.50005) < 5 * 2.1 / np.sqrt(n)


@pytest.mark.parametrize("x_obs", [(0.3, 2.0), (9.6, -9.95), (10.8, 3.0)])
def test_gaussian_mixture_reference_matches_formula(x_obs: tuple[float, float]) -> None:
    """Inside the box, at a corner (the box re-weighs the components ~1:2) and outside it."""
    x_obs = np.asarray(x_obs)
    samples = GaussianMixture().reference_posterior(x_obs, 20_000, np.random.default_rng(27))
    assert np.all(np.abs(samples) <= 10)
    for i in range(2):
        # KS p-values are uniform under the exact posterior: 0.001 fails 1 seed in 1000.
        assert stats.kstest(samples[:, i], lambda t, i=i: mixture_cdf(t, x_obs, i)).pvalue > 1e-3


def test_gaussian_mixture_formula_check_detects_wrong_weights() -> None:
    """Control: components truncated separately but kept at weights 1/2 (a plausible mistake)
    fail the same KS test at the corner, so the check has the power to tell them apart."""
    x_obs = np.array([9.6, -9.95])
    rng = np.random.default_rng(28)
    parts = []
    for scale in (1.0, 0.1):
        draws = x_obs + scale * rng.standard_normal((100_000, 2))
        parts.append(draws[np.all(np.abs(draws) <= 10, axis=1)][:10_000])
    wrong = np.concatenate(parts)
    assert stats.kstest(wrong[:, 1], lambda t: mixture_cdf(t, x_obs, 1)).pvalue < 1e-3


def test_gaussian_mixture_reference_fails_far_outside_the_box() -> None:
    with pytest.raises(ValueError, match="outside the prior box"):
        GaussianMixture().reference_posterior(np.array([30.0, 0.0]), 10, np.random.default_rng(0))


# slcp.


def slcp_covariance(theta: np.ndarray) -> np.ndarray:
    """sbibm's covariance, written out: stds theta_3^2 and theta_4^2, correlation tanh(theta_5),
    1e-6 added to the variances."""
    s1, s2, rho = theta[2] ** 2, theta[3] ** 2, np.tanh(theta[4])
    return np.array([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]]) + 1e-6 * np.eye(2)


@pytest.mark.parametrize("theta", [(0.5, -1.0, 1.2, -0.8, 0.7), (-2.0, 2.5, -0.6, 1.5, -2.0)])
def test_slcp_simulator_matches_definition(theta: tuple[float, ...]) -> None:
    theta = np.asarray(theta)
    n = 50_000
    x = SLCP().simulate(np.tile(theta, (n, 1)), np.random.default_rng(29))
    assert x.shape == (n, 8)
    points = x.reshape(n, 4, 2)  # point-major, as sbibm flattens (n, 4, 2)
    cov = slcp_covariance(theta)
    sd = np.sqrt(np.diag(cov))
    for j in range(4):
        # se(mean) = sd / sqrt(n); se of a covariance entry <= sqrt(2 / n) sd_i sd_k.
        np.testing.assert_array_less(np.abs(points[:, j].mean(0) - theta[:2]), 5 * sd / np.sqrt(n))
        atol = 5 * np.sqrt(2 / n) * np.outer(sd, sd)
        np.testing.assert_array_less(np.abs(np.cov(points[:, j].T) - cov), atol)
    # The four points are independent: cross-covariances between points vanish.
    cross = np.cov(points[:, 0, 0], points[:, 1, 0])[0, 1]
    assert abs(cross) < 5 * cov[0, 0] / np.sqrt(n)


def test_slcp_likelihood_matches_scipy() -> None:
    task = SLCP()
    theta = task.prior.sample(20, np.random.default_rng(30))
    x = task.simulate(theta[::-1], np.random.default_rng(31))
    for theta_i, x_i in zip(theta, x, strict=True):
        expected = stats.multivariate_normal(theta_i[:2], slcp_covariance(theta_i))
        log_like = task.log_likelihood(theta_i[None], x_i)[0]
        np.testing.assert_allclose(log_like, expected.logpdf(x_i.reshape(4, 2)).sum(), rtol=1e-9)
    flipped = theta * np.array([1, 1, -1, -1, 1])
    np.testing.assert_array_equal(
        task.log_likelihood(theta, x[0]), task.log_likelihood(flipped, x[0])
    )


def test_slcp_layout_matches_sbibm_observation() -> None:
    """sbibm's observation 1 is likely under its true parameters only when read point by
    point (its correlation tanh(2.97) = 0.995 pairs x_1 with x_2, x_3 with x_4, ...)."""
    task = SLCP()
    point_major = task.log_likelihood(SBIBM_SLCP_THETA[None], SBIBM_SLCP_X)[0]
    dim_major = task.log_likelihood(SBIBM_SLCP_THETA[None], SBIBM_SLCP_X.reshape(4, 2).T.ravel())
    assert point_major > -20 and dim_major[0] < point_major - 1000


def test_slcp_reference_matches_importance_sampling(tasks: dict[str, Task]) -> None:
    """MCMC against self-normalised importance sampling from the prior (10^6 draws, weights
    ESS ~1.5e4), both on the folded parameters; then the sign flips' balance."""
    task = tasks["slcp"]
    x_obs = task.simulate(np.array([[0.7, -0.5, 1.6, 1.4, 0.3]]), np.random.default_rng(1))[0]
    reference = task.reference(x_obs, 10_000, np.random.default_rng(32))
    assert reference.diagnostics["rhat_max"] <= 1.01
    assert reference.diagnostics["ess_bulk_min"] >= 0.5 * reference.diagnostics["pool_size"]

    rng = np.random.default_rng(33)
    proposals = rng.uniform([-3, -3, 0, 0, -3], 3, size=(1_000_000, 5))
    mean, std, ess_is = weighted_moments(proposals, task.log_likelihood(proposals, x_obs))
    assert ess_is > 5_000
    folded = reference.samples.copy()
    folded[:, 2:4] = np.abs(folded[:, 2:4])
    # The pool's ESS is >= half its size (checked above), so 10^4 samples are worth >= 5000.
    assert_moments_agree(folded, 5_000, mean, std, ess_is)

    # Signs of theta_3 and theta_4: independent fair coins, so the quadrants hold 1/4 each.
    quadrant = 2 * (reference.samples[:, 2] > 0) + (reference.samples[:, 3] > 0)
    assert stats.chisquare(np.bincount(quadrant, minlength=4)).pvalue > 1e-3


def test_slcp_reference_on_sbibm_observation(tasks: dict[str, Task]) -> None:
    """sbibm's observation 1: a narrow posterior (prior importance sampling has an ESS of ~130
    in 10^6 draws) with theta_5 near the box's edge; its true parameters lie in the bulk."""
    reference = tasks["slcp"].reference(SBIBM_SLCP_X, 2_000, np.random.default_rng(34))
    assert reference.diagnostics["rhat_max"] <= 1.01
    folded = np.abs(reference.samples)
    truth = np.abs(SBIBM_SLCP_THETA)
    # Posterior ranks of the true (folded) parameters: not in the extreme 0.5 % tails.
    ranks = np.mean(folded[:, [2, 3, 4]] < truth[[2, 3, 4]], axis=0)
    assert np.all((ranks > 0.005) & (ranks < 0.995)), ranks


# bernoulli_glm.


def test_bernoulli_glm_design_matches_sbibm_observation() -> None:
    """The regenerated stimulus reproduces sbibm's summary statistics of its observation 1 from
    its spike train: x = X^T y, to the float32 precision the csv files hold."""
    task = BernoulliGLM()
    assert SBIBM_GLM_SPIKES.shape == (100,) and SBIBM_GLM_SPIKES.sum() == 56
    np.testing.assert_allclose(SBIBM_GLM_SPIKES @ task.design, SBIBM_GLM_X, atol=1e-4)


def test_bernoulli_glm_prior_precision_matches_definition() -> None:
    """sbibm's F = D D + diag(sqrt(k / 9)) with D the first difference: 1 on the diagonal,
    then -2 and 1 on the first and second subdiagonals, plus the ridge, written out."""
    k = np.arange(9)
    f = np.diag(1 + np.sqrt(k / 9)) + np.diag(-2 * np.ones(8), -1) + np.diag(np.ones(7), -2)
    expected = np.zeros((10, 10))
    expected[0, 0] = 0.5
    expected[1:, 1:] = f.T @ f
    np.testing.assert_allclose(prior_precision(), expected, atol=1e-15)
    np.testing.assert_allclose(np.asarray(BernoulliGLM().prior.precision), expected, atol=1e-15)


def test_bernoulli_glm_simulator_matches_definition() -> None:
    task = BernoulliGLM()
    theta = np.array([-0.5, 1.0, 0.5, 0.2, -0.1, -0.3, -0.2, 0.0, 0.1, 0.05])
    n = 20_000
    x = task.simulate(np.tile(theta, (n, 1)), np.random.default_rng(35))
    design = task.design
    p = 1 / (1 + np.exp(-design @ theta))
    assert np.all(x[:, 0] == np.round(x[:, 0])) and x[:, 0].min() >= 0 and x[:, 0].max() <= 100
    # E[x] = X^T p and Var[x_i] = sum_t X_ti^2 p_t (1 - p_t) for independent Bernoulli bins.
    se = np.sqrt((design**2).T @ (p * (1 - p)) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - design.T @ p), 5 * se)


def test_bernoulli_glm_likelihood_is_the_spike_train_likelihood() -> None:
    task = BernoulliGLM()
    rng = np.random.default_rng(36)
    theta = task.prior.sample(5, rng)
    spikes = rng.uniform(size=100) < 0.4
    p = 1 / (1 + np.exp(-theta @ task.design.T))
    expected = stats.bernoulli(p).logpmf(spikes).sum(axis=1)
    np.testing.assert_allclose(task.log_likelihood(theta, spikes @ task.design), expected)


def test_bernoulli_glm_reference_matches_importance_sampling(tasks: dict[str, Task]) -> None:
    """MCMC against self-normalised importance sampling from the Laplace approximation with a
    1.5-fold widened covariance (the posterior is log-concave and near-Gaussian, so the
    weights are bounded and their ESS high), on sbibm's observation 1."""
    task = tasks["bernoulli_glm"]
    mode, cov = task.laplace(SBIBM_GLM_X)
    gradient = task.design.T @ (1 / (1 + np.exp(-task.design @ mode))) - SBIBM_GLM_X
    np.testing.assert_allclose(gradient + prior_precision() @ mode, 0, atol=1e-6)  # the MAP

    reference = task.reference(SBIBM_GLM_X, 10_000, np.random.default_rng(37))
    assert reference.diagnostics["rhat_max"] <= 1.01
    assert reference.diagnostics["ess_bulk_min"] >= 0.5 * reference.diagnostics["pool_size"]

    proposal = stats.multivariate_normal(mode, 1.5**2 * cov)
    draws = proposal.rvs(200_000, random_state=np.random.default_rng(38))
    log_weights = task.log_posterior(draws, SBIBM_GLM_X) - proposal.logpdf(draws)
    mean, std, ess_is = weighted_moments(draws, log_weights)
    # For a Gaussian target, a proposal 1.5 times wider keeps (2.25 / 3.5)^5 = 11 % of the
    # draws in 10 dimensions: ~2.2e4; measured 3.5e4.
    assert ess_is > 20_000
    assert_moments_agree(reference.samples, 5_000, mean, std, ess_is)


# The MCMC module.


def gaussian_target(dim: int = 3) -> tuple[np.ndarray, np.ndarray, mcmc.LogProb]:
    rng = np.random.default_rng(39)
    a = rng.normal(size=(dim, dim))
    cov = a @ a.T + 0.1 * np.eye(dim)  # strongly correlated
    mean = rng.normal(size=dim)
    precision = np.linalg.inv(cov)

    def log_prob(theta: np.ndarray) -> np.ndarray:
        d = theta - mean
        return -0.5 * np.einsum("ni,ij,nj->n", d, precision, d)

    return mean, cov, log_prob


def test_sample_emcee_gaussian() -> None:
    mean, cov, log_prob = gaussian_target()
    rng = np.random.default_rng(40)
    initial = rng.multivariate_normal(mean, cov, size=32)
    result = mcmc.sample_emcee(log_prob, initial, 4_000, rng, label="gaussian")
    assert result.samples.shape == (4_000, 3)
    assert result.rhat <= 1.01 and result.ess >= 0.5 * result.pool_size
    assert result.pool_size >= 4_000 and result.thin >= result.autocorr_time
    n_eff = 0.5 * 4_000  # the floor the ESS check enforces
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_array_less(np.abs(result.samples.mean(0) - mean), 5 * sd / np.sqrt(n_eff))
    atol = 5 * np.sqrt(2 / n_eff) * np.outer(sd, sd)
    np.testing.assert_array_less(np.abs(np.cov(result.samples.T) - cov), atol)
    # The same generator state gives the same samples; another gives others.
    runs = [
        mcmc.sample_emcee(log_prob, initial, 1_000, np.random.default_rng(seed)).samples
        for seed in (41, 41, 42)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert set(result.diagnostics) >= {"rhat_max", "ess_bulk_min", "acceptance", "thin"}


def bimodal_log_prob(theta: np.ndarray) -> np.ndarray:
    """Two narrow Gaussians at theta_1 = -5 and +5 (sd 0.1), too far apart for any move."""
    return np.logaddexp(
        -0.5 * np.sum((theta - [-5.0, 0.0]) ** 2, axis=-1) / 0.01,
        -0.5 * np.sum((theta - [5.0, 0.0]) ** 2, axis=-1) / 0.01,
    )


@pytest.mark.parametrize("interleaved", [False, True])
def test_sample_emcee_fails_clearly_on_separated_modes(interleaved: bool) -> None:
    """Half the walkers in each mode: no move crosses the gap, so the modes' weights are left to
    the start. Walker groups holding different modes fail R-hat; groups holding each mode
    alike (interleaved) leave R-hat near 1, and the ESS over walkers catches them."""
    rng = np.random.default_rng(42)
    modes = np.repeat([[-5.0, 0.0], [5.0, 0.0]], 16, axis=0)
    if interleaved:
        modes = modes.reshape(2, 16, 2).transpose(1, 0, 2).reshape(32, 2)
    initial = modes + 0.1 * rng.standard_normal((32, 2))
    with pytest.raises(RuntimeError, match="bimodal test target: MCMC did not converge") as info:
        mcmc.sample_emcee(
            bimodal_log_prob, initial, 1_000, rng, label="bimodal test target", max_extensions=1
        )
    message = str(info.value)
    assert "R-hat" in message and "bulk ESS" in message


def test_sample_emcee_fails_clearly_when_too_short() -> None:
    """Walkers started in a tiny ball 100 sd away, with 2 burn-in steps and no extension."""
    _, _, log_prob = gaussian_target(2)
    initial = 100 + 1e-3 * np.random.default_rng(43).standard_normal((8, 2))
    with pytest.raises(RuntimeError, match="R-hat") as info:
        mcmc.sample_emcee(
            log_prob,
            initial,
            100,
            np.random.default_rng(44),
            label="too short",
            burn_in=2,
            burn_in_factor=0,
            min_draws_per_walker=4,
            max_extensions=0,
        )
    assert "too short" in str(info.value)


def test_sample_emcee_rejects_bad_initial_ensembles() -> None:
    _, _, log_prob = gaussian_target(3)
    rng = np.random.default_rng(45)
    with pytest.raises(ValueError, match="W >= 2 D"):
        mcmc.sample_emcee(log_prob, rng.normal(size=(4, 3)), 10, rng)
    with pytest.raises(ValueError, match="not finite"):
        mcmc.sample_emcee(lambda t: np.full(len(t), -np.inf), rng.normal(size=(8, 3)), 10, rng)


def test_resample_distinct_draws_by_weight() -> None:
    candidates = np.arange(4.0)[:, None]
    log_weights = np.log([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(46)
    picks = [mcmc.resample_distinct(candidates, log_weights, 1, rng)[0, 0] for _ in range(20_000)]
    counts = np.bincount(np.asarray(picks, dtype=int), minlength=4)
    assert stats.chisquare(counts, 20_000 * np.array([0.1, 0.2, 0.3, 0.4])).pvalue > 1e-3
    # A single candidate with all the weight still gives distinct rows.
    spiky = np.where(np.arange(1000) == 7, 0.0, -1e4)
    rows = mcmc.resample_distinct(np.arange(1000.0)[:, None], spiky, 50, rng)
    assert len(np.unique(rows)) == 50 and 7.0 in rows

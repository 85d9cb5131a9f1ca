"""Tests of the benchmark tasks: contract properties, simulators against their definitions, and
reference posteriors against closed forms, brute force and simulation-based calibration.

Every test uses a fixed seed, so a statistical threshold is a deterministic pass or fail; the
thresholds are chosen so that a correct implementation passes with a wide margin (about 5
standard errors, or p > 0.001) while the errors they guard against fail by far.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from astropy.cosmology import FlatwCDM
from scipy import stats

from pipeline.tasks import TASKS, BoxUniform, DiagonalNormal, Task, TaskError, get_task
from pipeline.tasks.gaussian_linear import GaussianLinear
from pipeline.tasks.sn_cosmology import SNCosmology
from pipeline.tasks.two_moons import TwoMoons

# Every built-in task, the map tasks at their smallest size only (the same code at every size):
# a task added to the registry is tested here without being listed.
BUILT_IN = tuple(n for n in TASKS if f"{n}_32" not in TASKS and not n.endswith(("_128", "_256")))
NAMES = tuple(n for n in BUILT_IN if get_task(n).has_reference)
# Tasks whose reference is MCMC: simulation-based calibration runs 200 chains (minutes).
MCMC_NAMES = tuple(n for n in NAMES if "mcmc" in get_task(n).reference_method.lower())
# Their reference calibration takes seconds: MCMC, or a likelihood over 1024 or more pixels.
SLOW_NAMES = MCMC_NAMES + tuple(n for n in NAMES if math.prod(get_task(n).x_shape) >= 1024)

Sampler = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    """One instance per task, shared so that sn_cosmology builds its reference grid once."""
    return {name: get_task(name) for name in NAMES}


# Contract properties, for every task.


def test_every_kind_of_task_is_covered() -> None:
    # The derivation above must not lose a family: the benchmarks (references), the maps, and
    # a task validated by coverage alone.
    assert {"two_moons", "slcp", "grf_cosmology_32"} <= set(NAMES)
    assert "lognormal_cosmology_32" in set(BUILT_IN) - set(NAMES)


@pytest.mark.parametrize("name", BUILT_IN)
def test_metadata(name: str) -> None:
    task = get_task(name)
    assert task.name == name
    assert len(task.parameter_units) == len(task.parameter_names) == task.dim_theta
    assert len(set(task.parameter_names)) == task.dim_theta
    assert task.prior.dim == task.dim_theta


@pytest.mark.parametrize("name", BUILT_IN)
def test_shapes_and_dtypes(name: str) -> None:
    task = get_task(name)
    theta, x = task.simulate_block(7, np.random.default_rng(0))
    assert theta.shape == (7, task.dim_theta) and theta.dtype == np.float64
    assert x.shape == (7, *task.x_shape) and x.dtype == np.float64
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("name", BUILT_IN)
def test_simulation_is_deterministic(name: str) -> None:
    task = get_task(name)
    theta_a, x_a = task.simulate_block(50, np.random.default_rng(1))
    theta_b, x_b = task.simulate_block(50, np.random.default_rng(1))
    _, x_c = task.simulate_block(50, np.random.default_rng(2))
    np.testing.assert_array_equal(theta_a, theta_b)
    np.testing.assert_array_equal(x_a, x_b)
    assert not np.array_equal(x_a, x_c)


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_deterministic(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    _, x = task.simulate_block(1, np.random.default_rng(3))
    a = task.reference_posterior(x[0], 100, np.random.default_rng(4))
    b = task.reference_posterior(x[0], 100, np.random.default_rng(4))
    assert a.shape == (100, task.dim_theta)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_reference_rejects_wrong_shape(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    with pytest.raises(ValueError, match="shape"):
        task.reference_posterior(np.zeros((1, *task.x_shape)), 10, np.random.default_rng(0))


@pytest.mark.parametrize("name", BUILT_IN)
def test_prior_log_prob(name: str) -> None:
    prior = get_task(name).prior
    theta = prior.sample(100, np.random.default_rng(5))
    assert np.all(np.isfinite(prior.log_prob(theta)))
    if prior.bounds is None:
        assert np.all(np.isfinite(prior.log_prob(100 * theta)))
        return
    low, high = prior.bounds
    assert np.all((theta >= low) & (theta <= high))
    for i in range(prior.dim):  # one coordinate out of range at a time, the others inside
        for edge, step in ((low, -1), (high, 1)):
            outside = theta.copy()
            outside[:, i] = edge[i] + step * 0.01 * (high[i] - low[i])
            assert np.all(prior.log_prob(outside) == -np.inf)


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(TaskError) as info:
        get_task("three_moons")
    assert all(name in str(info.value) for name in BUILT_IN)


def test_a_task_imports_only_its_own_module() -> None:
    # Every MPI rank imports the registry: astropy.cosmology (1.5 s, 70 MiB) is for the tasks
    # that need it, not for a two_moons run. A fresh interpreter, as a rank starts.
    probe = (
        "import sys; from pipeline.tasks import get_task; task = get_task('two_moons'); "
        "print(task.name, sorted(m for m in sys.modules if m.startswith(('astropy', "
        "'pipeline.tasks.'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == [
        "two_moons",
        "['pipeline.tasks.base', 'pipeline.tasks.two_moons']\n",
    ]


@pytest.mark.parametrize(
    ("name", "noise_std"), [("gaussian_linear", np.sqrt(0.1)), ("sn_cosmology", 0.15)]
)
def test_gaussian_noise_level(name: str, noise_std: float) -> None:
    task = get_task(name)
    theta = np.repeat(task.prior.sample(1, np.random.default_rng(6)), 20_000, axis=0)
    x = task.simulate(theta, np.random.default_rng(7))
    mean = theta if name == "gaussian_linear" else task.distance_modulus(theta)
    residual = (x - mean).ravel()
    n = residual.size  # >= 2e5: se(mean) = std / sqrt(n), se(std) = std / sqrt(2 n)
    assert abs(residual.mean()) < 5 * noise_std / np.sqrt(n)
    assert abs(residual.std() - noise_std) < 5 * noise_std / np.sqrt(2 * n)


# Simulation-based calibration of every reference posterior.


def sbc_pvalues(
    task: Task, sampler: Sampler, rng: np.random.Generator, num_pairs: int = 200
) -> np.ndarray:
    """Chi-square p-values of the SBC ranks' uniformity, one per parameter, shape ``(D,)``.

    The rank of the true theta among 99 posterior samples is uniform on 0..99 for an exact
    posterior; ranks are pooled into 10 bins so each expects 20 counts (chi-square valid).
    """
    theta, x = task.simulate_block(num_pairs, rng)
    pairs = zip(theta, x, strict=True)
    ranks = np.stack([np.sum(sampler(xi, 99, rng) < ti, axis=0) for ti, xi in pairs])
    counts = np.stack([np.bincount(r // 10, minlength=10) for r in ranks.T], axis=-1)
    return stats.chisquare(counts, axis=0).pvalue


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_NAMES else n for n in NAMES],
)
def test_reference_is_calibrated(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    # An MCMC reference costs seconds per observation (burn-in), so those tasks get 100 pairs:
    # 10 expected counts per bin still keep the chi-square approximation valid.
    num_pairs = 100 if name in MCMC_NAMES else 200
    pvalues = sbc_pvalues(task, task.reference_posterior, np.random.default_rng(8), num_pairs)
    # Uniform p-values under an exact reference; 0.001 is the threshold the brief sets, and the
    # controls below show that a wrong posterior lands far below it with the same 200 pairs.
    assert np.all(pvalues > 1e-3), pvalues


@pytest.mark.parametrize("shrink", [0.5, 2.0])
def test_calibration_check_detects_wrong_width(shrink: float) -> None:
    task = GaussianLinear()

    def wrong(x_obs: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        mean, _ = task.analytic_posterior(x_obs)
        return mean + shrink * (task.reference_posterior(x_obs, num_samples, rng) - mean)

    pvalues = sbc_pvalues(task, wrong, np.random.default_rng(8))
    assert np.all(pvalues < 1e-3), pvalues


# gaussian_linear.


def test_gaussian_linear_conjugate_formula_matches_closed_form() -> None:
    task = GaussianLinear()
    for x_obs in np.random.default_rng(9).normal(0, 0.5, size=(5, 10)):
        mean, cov = task.analytic_posterior(x_obs)
        np.testing.assert_allclose(mean, x_obs / 2, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(cov, 0.05 * np.eye(10), rtol=1e-12, atol=1e-14)


def test_gaussian_linear_reference_samples_match_closed_form() -> None:
    x_obs = np.linspace(-0.5, 0.5, 10)
    samples = GaussianLinear().reference_posterior(x_obs, 100_000, np.random.default_rng(10))
    n = len(samples)
    # se(mean) = sqrt(0.05 / n) = 7e-4; se of a covariance entry <= 0.05 sqrt(2 / n) = 2.2e-4.
    # 5 standard errors: a wrong variance (e.g. the prior's 0.1) misses by 0.05, i.e. 200 se.
    np.testing.assert_allclose(samples.mean(axis=0), x_obs / 2, atol=5 * np.sqrt(0.05 / n))
    cov_atol = 5 * 0.05 * np.sqrt(2 / n)
    np.testing.assert_allclose(np.cov(samples.T), 0.05 * np.eye(10), atol=cov_atol)


# two_moons.


def crescent_density(p: np.ndarray) -> np.ndarray:
    """The density of the simulator's noise ``p``, derived independently of the task code.

    ``p - (0.25, 0) = r (cos a, sin a)`` with ``a ~ U(-pi/2, pi/2)`` and ``r ~ N(0.1, 0.01^2)``.
    In polar coordinates ``(rho, phi)`` the density is ``N(r) / pi`` per unit ``dr da``, and
    ``dx dy = rho drho dphi``; a negative ``r`` (probability ~1e-23) lands on the left half.
    """
    q = p - np.array([0.25, 0.0])
    rho = np.hypot(q[..., 0], q[..., 1])
    radius = np.where(q[..., 0] > 0, rho, -rho)
    return stats.norm.pdf(radius, 0.1, 0.01) / (np.pi * rho)


def moons_rejection_sampler(x_obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exact posterior samples by rejection from the prior with the explicit likelihood."""
    rho = np.linspace(0.05, 0.15, 100_001)
    bound = 1.001 * np.max(stats.norm.pdf(rho, 0.1, 0.01) / (np.pi * rho))
    theta = rng.uniform(-1, 1, size=(4_000_000, 2))
    t1, t2 = theta[:, 0], theta[:, 1]
    shift = np.stack([-np.abs(t1 + t2) / np.sqrt(2), (t2 - t1) / np.sqrt(2)], axis=-1)
    ratio = crescent_density(x_obs - shift) / bound
    assert ratio.max() <= 1  # the envelope holds, so the accepted draws are exact
    return theta[rng.uniform(size=len(theta)) < ratio]


@pytest.mark.parametrize("theta", [(0.3, -0.7), (0.5, 0.2), (-1.0, 1.0)])
def test_two_moons_simulator_matches_definition(theta: tuple[float, float]) -> None:
    n = 100_000
    x = TwoMoons().simulate(np.tile(theta, (n, 1)), np.random.default_rng(11))
    t1, t2 = theta
    q = x - [-abs(t1 + t2) / np.sqrt(2) + 0.25, (t2 - t1) / np.sqrt(2)]
    r, a = np.hypot(q[:, 0], q[:, 1]), np.arctan2(q[:, 1], q[:, 0])
    # se(mean r) = 0.01 / sqrt(n) = 3.2e-5 and se(std r) = 0.01 / sqrt(2 n) = 2.2e-5: 5 se each.
    # A sign error in the shift moves r by ~0.1 or more.
    assert abs(r.mean() - 0.1) < 5 * 0.01 / np.sqrt(n)
    assert abs(r.std() - 0.01) < 5 * 0.01 / np.sqrt(2 * n)
    assert stats.kstest(a, stats.uniform(-np.pi / 2, np.pi).cdf).pvalue > 1e-3


@pytest.mark.parametrize("x_obs", [(0.0, 0.0), (-1.0, 0.05)])
def test_two_moons_reference_matches_rejection_sampling(x_obs: tuple[float, float]) -> None:
    x_obs = np.asarray(x_obs)
    task = TwoMoons()
    brute = moons_rejection_sampler(x_obs, np.random.default_rng(12))
    reference = task.reference_posterior(x_obs, 20_000, np.random.default_rng(13))
    assert len(brute) > 5_000
    assert np.all(np.isfinite(task.prior.log_prob(reference)))
    for i in range(2):
        # Two independent exact samples: KS p-values are uniform, so 0.001 fails 1 in 1000
        # seeds; a wrong branch weight or a missing box cut gives p ~ 0.
        assert stats.ks_2samp(brute[:, i], reference[:, i]).pvalue > 1e-3
        se = np.sqrt(brute[:, i].var() / len(brute) + reference[:, i].var() / len(reference))
        assert abs(brute[:, i].mean() - reference[:, i].mean()) < 5 * se


def test_two_moons_reference_fails_clearly_outside_support() -> None:
    with pytest.raises(ValueError, match="outside the support"):
        TwoMoons().reference_posterior(np.array([5.0, 5.0]), 100, np.random.default_rng(14))


# sn_cosmology.


@pytest.mark.parametrize(
    ("omega_m", "w0"),
    [(0.3, -1.0), (0.1, -2.0), (0.6, -0.4), (0.1, -0.4), (0.45, -1.3), (0.8, -0.3), (1.5, -1.0)],
)
def test_sn_distance_modulus_matches_astropy(omega_m: float, w0: float) -> None:
    """Inside the prior box and outside it where the model is physical (last two rows)."""
    task = SNCosmology()
    mu = task.distance_modulus(np.array([[omega_m, w0]]))[0]
    expected = FlatwCDM(H0=70, Om0=omega_m, w0=w0).distmod(task.redshifts).value
    assert np.max(np.abs(mu - expected)) < 1e-5  # required agreement (measured: ~1e-14 mag)


def test_sn_unphysical_parameters_give_nan_rows_silently() -> None:
    """Omega_m = -0.5 makes E(z)^2 < 0 beyond z ~ 0.4: that row is NaN, the others unharmed."""
    task = SNCosmology()
    theta = np.array([[-0.5, -1.0], [0.3, -1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = task.simulate(theta, np.random.default_rng(15))
    assert np.all(np.isnan(x[0])) and np.all(np.isfinite(x[1]))
    assert task.prior.log_prob(theta)[0] == -np.inf


def test_sn_reference_rejects_non_finite_observation(tasks: dict[str, Task]) -> None:
    x_obs = np.full(tasks["sn_cosmology"].x_shape, np.nan)
    with pytest.raises(ValueError, match="NaN"):
        tasks["sn_cosmology"].reference_posterior(x_obs, 10, np.random.default_rng(0))


def test_sn_reference_grid_resolves_posterior(tasks: dict[str, Task]) -> None:
    task = tasks["sn_cosmology"]
    cell = (np.asarray(task.prior.high) - np.asarray(task.prior.low)) / task.grid_size
    _, x = task.simulate_block(30, np.random.default_rng(16))
    for x_obs in x:
        cov = np.cov(task.reference_posterior(x_obs, 4_000, np.random.default_rng(17)).T)
        conditional_std = 1 / np.sqrt(np.diag(np.linalg.inv(cov)))
        # >= 3 cells per conditional std: the jitter then adds < 1 % to the variance across the
        # posterior's ridge (h^2 / 12 relative to sigma^2 = 1 / 108).
        assert np.all(conditional_std > 3 * cell), conditional_std / cell


@pytest.mark.parametrize("theta", [(0.3, -1.0), (0.15, -1.8)])
def test_sn_reference_matches_fine_local_grid(
    theta: tuple[float, float], tasks: dict[str, Task]
) -> None:
    """Reference moments against an independent midpoint rule on a finer grid (500^2 cells over
    the posterior's +-6 std, clipped to the box: 1.2 to 6 times finer than the reference's).
    The second posterior is truncated by two edges of the box."""
    task = tasks["sn_cosmology"]
    x_obs = task.simulate(np.array([theta]), np.random.default_rng(18))[0]
    samples = task.reference_posterior(x_obs, 100_000, np.random.default_rng(19))
    low = np.maximum(samples.mean(0) - 6 * samples.std(0), task.prior.low)
    high = np.minimum(samples.mean(0) + 6 * samples.std(0), task.prior.high)
    # Midpoints, not linspace's end points: where the box truncates the posterior, nodes on the
    # edge with full weight would bias the moments by ~0.01 std.
    cells = (np.arange(500) + 0.5) / 500
    axes = [lo + (hi - lo) * cells for lo, hi in zip(low, high, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
    chi2 = np.sum((x_obs - task.distance_modulus(grid)) ** 2, axis=-1) / task.sigma_mag**2
    weights = np.exp(-0.5 * (chi2 - chi2.min()))
    mean = np.average(grid, axis=0, weights=weights)
    std = np.sqrt(np.average((grid - mean) ** 2, axis=0, weights=weights))
    # Monte-Carlo se(mean) = std / sqrt(1e5) = 0.0032 std: 0.02 std is ~6 se, yet catches a
    # half-cell offset of the jitter (0.06-0.1 std for the Omega_m of the second posterior).
    # The std may differ by the jitter's h^2 / 12 (< 0.1 %) and its Monte-Carlo se (~0.3 %
    # for a Gaussian, more for a truncated one): 2 %.
    assert np.all(np.abs(samples.mean(0) - mean) < 0.02 * std), (samples.mean(0) - mean) / std
    np.testing.assert_allclose(samples.std(0), std, rtol=0.02)


def test_a_file_naming_the_parameters_otherwise_than_the_task_now_is_refused(tmp_path, caplog):
    """Names or units swapped in a task file after simulating would label the file's columns
    wrongly; a user's task whose files changed since gets a warning naming both digests."""
    from pipeline.tasks.base import check_recorded

    task = get_task("two_moons")
    names = list(task.parameter_names)
    check_recorded(task, {"parameter_names": names}, "sims.h5")
    with pytest.raises(
        ValueError, match=r"sims.h5 records parameter_names \['theta_2', 'theta_1'\]"
    ):
        check_recorded(task, {"parameter_names": names[::-1]}, "sims.h5")
    with pytest.raises(ValueError, match="records parameter_units"):
        check_recorded(task, {"parameter_units": ["s", "m"]}, "sims.h5")
    user = get_task("examples/oscillator/task.yaml")
    check_recorded(user, {"task_digest": "0123456789abcdef"}, "sims.h5")
    assert "another definition of task" in caplog.text and "0123456789abcdef" in caplog.text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BoxUniform((1.0, 0.0), (0.0, 1.0)), "low < high in every parameter"),
        (lambda: BoxUniform((0.0, np.nan), (1.0, 1.0)), "finite low and high"),
        (lambda: DiagonalNormal((0.0, 0.0), (1.0, 0.0)), "positive scale in every parameter"),
        (lambda: DiagonalNormal((0.0,), (1.0, 1.0)), "loc and scale of one length"),
    ],
)
def test_a_prior_whose_density_would_be_nan_is_refused(make, message):
    # A zero scale or a NaN bound gives NaN densities downstream, not an error.
    with pytest.raises(ValueError, match=message):
        make()

"""The validate stage on files shaped like the sample stage's, with posteriors of known quality.

gaussian_linear's reference posterior is exact (a Gaussian in closed form), so its samples stand
in for a perfect estimator; shrinking them about their mean by a factor gives an over-confident
one. The stage must pass the first and flag the second in every diagnostic that can see it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
from scipy import stats

from pipeline import diagnostics
from pipeline.metrics import ESTIMATE_QUANTILES as QUANTILES
from pipeline.metrics import ValidationMetrics
from pipeline.observations import make_observations
from pipeline.provenance import file_digest
from pipeline.sampling import PosteriorSamples, write_samples
from pipeline.tasks import get_task
from pipeline.validation import (
    _estimates,
    _predictive_at_observations,
    _predictive_coverage,
    _widths,
    score_budget,
    validate,
    write_estimates_csv,
)

NUM_TEST = 300
NUM_SAMPLES = 200


def posterior_file(
    path: Path,
    x: np.ndarray,
    theta: np.ndarray | None,
    shrink: float,
    seed: int,
    model: str = "exact",
) -> None:
    """Exact posterior samples for each row of ``x``, shrunk about their mean by ``shrink``;
    ``model`` stands for the digest of the weights that would have drawn them."""
    task = get_task("gaussian_linear")
    rng = np.random.default_rng(seed)
    samples = np.stack([task.reference_posterior(row, NUM_SAMPLES, rng) for row in x])
    mean = samples.mean(axis=1, keepdims=True)
    samples = mean + shrink * (samples - mean)

    # log q of a Gaussian shrunk by s: the exact log density, in the shrunk variable.
    def log_q(points: np.ndarray, centre: np.ndarray, draws: np.ndarray) -> np.ndarray:
        covariance = np.cov(draws.T)
        return stats.multivariate_normal(centre, covariance).logpdf(points)

    log_prob = np.stack([log_q(s, m[0], s) for s, m in zip(samples, mean, strict=True)])
    attrs = {"task": task.name, "parameter_names": list(task.parameter_names)}
    attrs["model_digest"] = model
    log_prob_true = None
    if theta is not None:
        log_prob_true = np.array(
            [log_q(t, m[0], s) for t, m, s in zip(theta, mean, samples, strict=True)]
        )
    result = PosteriorSamples(samples.astype(np.float32), log_prob.astype(np.float32))
    write_samples(path, result, attrs, theta=theta, log_prob_true=log_prob_true, x=x)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("validate")
    task = get_task("gaussian_linear")
    make_observations(task, 3, 1000, 3, folder / "observations.h5")
    theta, x = task.simulate_block(NUM_TEST, np.random.default_rng(2))
    np.save(folder / "theta.npy", theta)
    np.save(folder / "x.npy", x)
    return folder


def observed_x(experiment: Path) -> np.ndarray:
    """The experiment's observations' x."""
    with h5py.File(experiment / "observations.h5") as f:
        return f["x"][...]


def validate_files(
    experiment: Path, test: str, observed: str, out: str, **options: Any
) -> ValidationMetrics:
    """The validate stage on two sample files of ``experiment`` against its observations."""
    return validate(
        experiment / test,
        experiment / observed,
        experiment / "observations.h5",
        experiment / out,
        seed=0,
        c2st_max_samples=None,
        **options,
    )


def run(experiment: Path, shrink: float, **options) -> dict:
    theta, x = np.load(experiment / "theta.npy"), np.load(experiment / "x.npy")
    name = f"shrink-{shrink}"
    posterior_file(experiment / f"{name}-test.h5", x, theta, shrink, seed=4)
    posterior_file(experiment / f"{name}-obs.h5", observed_x(experiment), None, shrink, seed=5)
    settings = {"local_c2st_null": 19, "predictive_draws": 50, **options}
    return validate_files(
        experiment, f"{name}-test.h5", f"{name}-obs.h5", name, c2st_folds=2, **settings
    )


@pytest.mark.slow  # 300 test pairs, predictive simulations and 19 local C2ST refits: seconds
def test_exact_posterior_passes_every_diagnostic(experiment: Path) -> None:
    metrics = run(experiment, 1.0)
    # The file reads back as what validate returned: the report sees what validate concluded.
    assert ValidationMetrics.read(experiment / "shrink-1.0" / "metrics.json") == metrics
    coverage = metrics.coverage
    # 300 pairs: a coverage fraction's standard error is at most 0.029; 0.1 is > 3 of them.
    for key in ("tarp_max_deviation", "hpd_max_deviation", "predictive_max_deviation"):
        assert getattr(coverage, key) < 0.1, (key, getattr(coverage, key))
    assert len(coverage.predictive) == len(coverage.levels)
    # Posterior predictive p-values of a correct model sit near 0.5 or above (conservative).
    assert all(p > 0.05 for p in metrics.predictive.pvalues)
    # Local C2ST with 19 null refits: p = 1/20 is the floor; an exact posterior stays above.
    assert min(metrics.local_c2st.pvalue) > 0.05
    assert (experiment / "shrink-1.0" / "predictive.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics.figures["predictive"] == "predictive.png"
    reference = metrics.reference
    assert reference.method == get_task("gaussian_linear").reference_method
    assert len(reference.diagnostics) == 3  # one per observation
    # 200 draws against 1000 reference samples: each std is within ~5 % (1 / sqrt(2 * 200)),
    # the mean of 3 observations within ~3 %; 0.1 is over 3 of those.
    ratios = np.array(list(metrics.widths.std_ratio.mean.values()))
    assert ratios.shape == (10,) and np.all(np.abs(ratios - 1) < 0.1), ratios
    assert metrics.widths.std_over_cramer_rao is None  # no Fisher matrix for this task
    assert metrics.observations.digest == file_digest(experiment / "observations.h5")
    # Prior and noise variances 0.1: the posterior's spread is sqrt(1/2) of the prior's, within
    # the same few per cent as above.
    over_prior = np.array(list(metrics.widths.over_prior.mean.values()))
    assert np.all(np.abs(over_prior - np.sqrt(0.5)) < 0.07), over_prior
    # Observations drawn like the test set: three p-values per test, each in (0, 1].
    tests = metrics.misspecification
    assert len(tests.typicality) == len(tests.surprise) == len(tests.pvalue) == 3
    assert all(0 < p <= 1 for p in tests.typicality + tests.surprise + tests.pvalue)
    # Each observation's estimates, beside the metrics as a table: one row per parameter.
    assert len(metrics.estimates.values) == 3 and metrics.estimates.units == [""] * 10
    assert (experiment / "shrink-1.0" / "estimates.csv").read_text().count("\n") == 1 + 3 * 10


@pytest.mark.slow  # as above
def test_over_confident_posterior_is_flagged(experiment: Path) -> None:
    metrics = run(experiment, 0.5)
    coverage = metrics.coverage
    levels = np.array(coverage.levels)
    # Half the width: HPD coverage at 50 % falls to about 16 %, so far below the diagonal.
    assert coverage.hpd_max_deviation > 0.2
    # In data space the noise dilutes it, but the replicate still falls outside too often.
    assert np.mean(np.array(coverage.predictive) - levels) < -0.03
    local = metrics.local_c2st
    assert max(local.pvalue) <= 0.05 + 1e-9
    assert all(c < 0 for c in local.dispersion_correlation)  # read as over-confident
    # Shrunk by half: the std ratio is 0.5 up to the sampling error above (~3 % of 0.5).
    ratios = np.array(list(metrics.widths.std_ratio.mean.values()))
    assert np.all(np.abs(ratios - 0.5) < 0.05), ratios


def test_too_many_predictive_draws_is_refused(experiment: Path) -> None:
    # A validation that fails leaves no metrics of an earlier one beside its new figures.
    (experiment / "shrink-1.0").mkdir(exist_ok=True)
    (experiment / "shrink-1.0" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"predictive_draws=500 exceeds the 200 posterior"):
        run(experiment, 1.0, predictive_draws=500)
    assert not (experiment / "shrink-1.0" / "metrics.json").exists()


def test_too_few_test_simulations_are_refused_naming_the_option(experiment: Path) -> None:
    theta, x = np.load(experiment / "theta.npy"), np.load(experiment / "x.npy")
    posterior_file(experiment / "few-test.h5", x[:10], theta[:10], 1.0, seed=4)
    posterior_file(experiment / "few-obs.h5", observed_x(experiment), None, 1.0, seed=5)
    with pytest.raises(ValueError, match=r"holds 10 test .*\(simulate.num_test_simulations\)"):
        validate_files(experiment, "few-test.h5", "few-obs.h5", "few")


def test_an_observations_predictive_pvalue_does_not_depend_on_the_others(tmp_path) -> None:
    """Each observation's predictive draws come from a stream of its own: validated in
    another order, or with fewer observations beside it, it gets the same p-value."""
    task = get_task("two_moons")
    _, x = task.simulate_block(3, np.random.default_rng(2))
    rng = np.random.default_rng(4)
    samples = np.stack([task.reference_posterior(row, 40, rng) for row in x])

    def pvalues(order: list[int]) -> list[float]:
        checks = _predictive_at_observations(task, samples[order], x[order], 40, 7, tmp_path, {})
        return checks.pvalues

    forward = pvalues([0, 1, 2])
    assert pvalues([2, 1, 0]) == forward[::-1]
    assert pvalues([2]) == forward[2:]


def test_predictive_replicates_average_out_their_noise() -> None:
    """Data-space coverage of an exact posterior, one fresh replicate per pair against twenty.

    gaussian_mixture's replicates are noisy (each draws the broad or the narrow component), so
    with one per pair the curve's largest deviation from the diagonal is mostly their noise:
    0.027-0.050 over these six seeds (400 pairs; binomial standard error 0.025 at level 0.5).
    Twenty leave the pairs' own spread: 0.019-0.029, mean 0.023 against 0.040. The bounds leave
    room for a platform's different rounding but fail if replicates stop being averaged.
    """
    task = get_task("gaussian_mixture")
    theta, x = task.simulate_block(400, np.random.default_rng(2))
    rng = np.random.default_rng(4)
    test = {
        "theta": theta,
        "samples": np.stack([task.reference_posterior(row, 50, rng) for row in x]),
    }
    levels = diagnostics.DEFAULT_LEVELS

    def deviations(replicates: int) -> np.ndarray:
        curves = [_predictive_coverage(task, test, 50, replicates, seed) for seed in range(6)]
        return np.array(
            [diagnostics.max_coverage_deviation(levels, c["coverage"]) for c in curves]
        )

    one, twenty = deviations(1), deviations(20)
    assert twenty.mean() < 0.75 * one.mean()
    assert twenty.max() < 0.035
    with pytest.raises(ValueError, match="predictive_replicates must be at least 1, got 0"):
        _predictive_coverage(task, test, 50, 0, 0)


def test_test_samples_without_x_are_refused(experiment: Path) -> None:
    theta, x = np.load(experiment / "theta.npy"), np.load(experiment / "x.npy")
    posterior_file(experiment / "old-test.h5", x, theta, 1.0, seed=4)
    with h5py.File(experiment / "old-test.h5", "a") as f:
        del f["x"]
    with pytest.raises(ValueError, match=r"old-test.h5 has no 'x' .* rerun the sample stage"):
        validate_files(experiment, "old-test.h5", "unused-obs.h5", "old")
    assert not (experiment / "old").exists()


def test_a_task_recorded_by_a_path_that_does_not_resolve_here_is_named(experiment: Path) -> None:
    """validate run by hand from another folder than the workflow's, whose samples record a
    user's task by a relative path: the message names the file that recorded it and the fix."""
    theta, x = np.load(experiment / "theta.npy"), np.load(experiment / "x.npy")
    posterior_file(experiment / "moved-test.h5", x, theta, 1.0, seed=4)
    with h5py.File(experiment / "moved-test.h5", "a") as f:
        f.attrs["task"] = "my_project/task.yaml"
    message = r"moved-test.h5 records task 'my_project/task.yaml', which does not resolve here"
    with pytest.raises(ValueError, match=message + r".*run validate there"):
        validate_files(experiment, "moved-test.h5", "unused-obs.h5", "moved")


def test_the_observations_samples_are_refused_as_the_test_set(experiment: Path) -> None:
    """The observations' samples file given as --test-samples: coverage would be scored on the
    observations and each ranked among a set holding itself; validate wrote it as any other."""
    theta, x = np.load(experiment / "theta.npy"), np.load(experiment / "x.npy")
    posterior_file(experiment / "as-test.h5", x, theta, 1.0, seed=4)
    with h5py.File(experiment / "as-test.h5", "a") as f:
        f.attrs["sampled"] = "observations"
    with pytest.raises(ValueError, match=r"as-test.h5 holds samples at observations, not at"):
        validate_files(experiment, "as-test.h5", "unused-obs.h5", "as-test")
    assert not (experiment / "as-test").exists()


@pytest.mark.slow  # simulates 32^2 maps for the predictive checks: seconds
def test_map_task_is_checked_on_summaries_and_against_the_fisher_bound(tmp_path: Path) -> None:
    """grf_cosmology_32 with its exact posterior as the estimator: predictive checks and local
    C2ST run on the band-power summaries (8 values, not 1024 pixels), and the widths are
    compared with the reference and the Cramer-Rao bound."""
    task = get_task("grf_cosmology_32")
    make_observations(task, 2, 1000, 3, tmp_path / "observations.h5")
    theta, x = task.simulate_block(100, np.random.default_rng(2))
    rng = np.random.default_rng(4)

    def write(path: Path, x: np.ndarray, theta: np.ndarray | None, draws: int) -> None:
        samples = np.stack([task.reference_posterior(row, draws, rng) for row in x])
        # The exact log posterior up to a constant per x (the prior is flat): HPD regions need
        # only the order of the densities at one x.
        pairs = zip(x, samples, strict=True)
        log_prob = np.stack([task.log_likelihood(row, s) for row, s in pairs])
        log_true = None
        if theta is not None:
            pairs = zip(x, theta, strict=True)
            log_true = np.array([task.log_likelihood(row, t[None])[0] for row, t in pairs])
        attrs = {"task": task.name, "parameter_names": list(task.parameter_names)}
        attrs["model_digest"] = "exact"  # stands for the weights that would have drawn them
        result = PosteriorSamples(samples.astype(np.float32), log_prob.astype(np.float32))
        write_samples(path, result, attrs, theta=theta, log_prob_true=log_true, x=x)

    write(tmp_path / "test.h5", x, theta, 50)
    write(tmp_path / "obs.h5", observed_x(tmp_path), None, 500)
    metrics = validate_files(
        tmp_path,
        "test.h5",
        "obs.h5",
        "out",
        c2st_folds=2,
        local_c2st_null=19,
        predictive_draws=20,
    )
    # 100 pairs: a coverage fraction's standard error is at most 0.05; 0.15 is 3 of them.
    assert metrics.coverage.hpd_max_deviation < 0.15
    assert metrics.coverage.predictive_max_deviation < 0.15
    assert max(metrics.c2st.per_observation) < 0.6  # the same posterior on both sides
    widths = metrics.widths
    # 500 draws against 1000: each std within ~4 %, the mean of 2 within ~3 %.
    assert all(abs(r - 1) < 0.12 for r in widths.std_ratio.mean.values()), widths
    # The Fisher bound ignores the prior, so the exact posterior is at most a little narrower
    # and, with 1023 modes, not much wider (the observed information scatters by ~5 %).
    for name in task.parameter_names:
        assert 0.6 < widths.reference_over_cramer_rao.mean[name] < 1.3, widths
    assert np.array(widths.cramer_rao_std).shape == (2, 2)


def test_the_estimates_are_each_observations_quantiles_in_its_units(tmp_path: Path) -> None:
    """Median and central intervals per observation and parameter: the quantiles of the finite
    draws, the truth of the observations that were sampled, and a CSV that reads back."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 4000, 2)) * [0.1, 2.0] + [0.3, 67.0]
    samples[1, :10, 0] = np.nan  # draws of no density are left out, not the observation
    observed = {
        "samples": samples,
        "x": np.zeros((3, 1)),
        "attrs": {"observation_index": [0, 2, 4]},
    }
    theta_obs = rng.normal(size=(5, 2))
    task = SimpleNamespace(parameter_units=("", "km / (Mpc s)"))
    estimates = _estimates(task, observed, theta_obs)
    assert estimates.observation_index == [0, 2, 4] and estimates.units == ["", "km / (Mpc s)"]
    np.testing.assert_allclose(estimates.values[2][1], np.quantile(samples[2, :, 1], QUANTILES))
    np.testing.assert_allclose(estimates.values[1][0], np.quantile(samples[1, 10:, 0], QUANTILES))
    assert estimates.truth == theta_obs[[0, 2, 4]].tolist()
    assert _estimates(task, observed, None).truth is None
    names = ["Omega_m", "H_0, local"]  # a comma in a name stays one cell
    write_estimates_csv(estimates, names, tmp_path / "estimates.csv")
    with open(tmp_path / "estimates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[1]["parameter"] == "H_0, local"
    assert rows[5]["observation"] == "4" and rows[5]["unit"] == "km / (Mpc s)"
    assert float(rows[5]["q0.5"]) == estimates.values[2][1][2]  # no digit lost
    assert float(rows[5]["truth"]) == theta_obs[4, 1]


def test_widths_refuse_a_reference_without_spread() -> None:
    task = get_task("two_moons")
    samples = np.random.default_rng(0).normal(size=(2, 50, 2))
    reference = samples.copy()
    reference[1, :, 1] = 0.3  # every sample of observation 1 has the same theta_2
    with pytest.raises(ValueError, match="observation 1 do not vary in theta_2"):
        _widths(task, samples, reference, np.zeros((2, 2)))


def test_samples_drawn_at_other_observations_or_of_another_task_are_refused(
    experiment: Path,
) -> None:
    """Validating samples against the wrong observation file would score them against the wrong
    references: refused, naming the files, before anything is computed."""
    theta, x = np.load(experiment / "theta.npy"), np.load(experiment / "x.npy")
    posterior_file(experiment / "lineage-test.h5", x[:50], theta[:50], 1.0, seed=4)
    x_obs = observed_x(experiment)
    posterior_file(experiment / "elsewhere-obs.h5", x_obs + 0.5, None, 1.0, seed=5)

    def check(observation_samples: Path) -> None:
        validate_files(experiment, "lineage-test.h5", observation_samples.name, "lineage")

    with pytest.raises(ValueError, match=r"elsewhere-obs.h5 was drawn at other observations than"):
        check(experiment / "elsewhere-obs.h5")
    posterior_file(experiment / "other-task-obs.h5", x_obs, None, 1.0, seed=5)
    with h5py.File(experiment / "other-task-obs.h5", "a") as f:
        f.attrs["task"] = "slcp"
    with pytest.raises(ValueError, match=r"different tasks .*other-task-obs.h5: 'slcp'"):
        check(experiment / "other-task-obs.h5")
    # Another model's samples at the right observations: its calibration is not this one's.
    posterior_file(experiment / "other-model-obs.h5", x_obs, None, 1.0, seed=5, model="retrained")
    with pytest.raises(ValueError, match=r"drawn by different models .*other-model-obs.h5: retr"):
        check(experiment / "other-model-obs.h5")
    # Samples at two of the three observations (the third's x was NaN when sampled).
    posterior_file(experiment / "some-obs.h5", x_obs[[0, 2]], None, 1.0, seed=5)
    with h5py.File(experiment / "some-obs.h5", "a") as f:
        f.attrs["observation_index"] = json.dumps([0, 2])
    with pytest.raises(ValueError, match=r"some-obs.h5 has no samples at observations \[1\]"):
        check(experiment / "some-obs.h5")
    assert not (experiment / "lineage" / "metrics.json").exists()
    # pipeline c2st scores one file against the observations' references: the same checks.
    with pytest.raises(ValueError, match=r"elsewhere-obs.h5 was drawn at other observations"):
        score_budget(
            experiment / "elsewhere-obs.h5",
            experiment / "observations.h5",
            experiment / "budget.json",
            budget=100,
            seed=0,
            max_samples=None,
        )


def test_a_budgets_score_records_the_model_that_drew_its_samples(experiment: Path) -> None:
    # The report checks it against the budget's weights: a curve point of another model (an
    # untrained one, a stale one) was shown unremarked.
    posterior_file(experiment / "budget-obs.h5", observed_x(experiment), None, 1.0, seed=5)
    score = score_budget(
        experiment / "budget-obs.h5",
        experiment / "observations.h5",
        experiment / "budget-score.json",
        budget=100,
        seed=0,
        max_samples=500,
        folds=2,
    )
    assert score.model_digest == "exact"
    assert json.loads((experiment / "budget-score.json").read_text())["model_digest"] == "exact"


def test_a_skipped_c2st_says_whether_the_task_or_the_observations_lack_a_reference() -> None:
    from pipeline.validation import _skipped

    theta_obs = np.zeros((1, 10))
    linear = _skipped(get_task("gaussian_linear"), theta_obs, None, None)["c2st"]
    assert "observations.num_reference_samples: 0" in linear
    cosmology = _skipped(get_task("lognormal_cosmology"), np.zeros((1, 2)), None, None)["c2st"]
    assert cosmology == "the task has no reference posterior"

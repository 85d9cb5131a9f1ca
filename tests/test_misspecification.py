"""The misspecification tests on synthetic cases with known answers: observations drawn like the
simulations give uniform p-values; shifted or sharper ones are rejected."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.diagnostics.misspecification import (
    posterior_sharpness,
    surprise_pvalues,
    typicality_pvalues,
)


def test_typicality_is_uniform_for_observations_like_the_simulations() -> None:
    rng = np.random.default_rng(0)
    sims = rng.standard_t(df=5, size=(300, 4))  # heavy tails: the test assumes no Gaussianity
    observed = rng.standard_t(df=5, size=(400, 4))
    pvalues = typicality_pvalues(observed, sims)
    # Exchangeable: uniform on {1..301}/301. 400 p-values: a KS test at 0.001 fails by chance
    # once in a thousand seeds; the false-positive rate at 0.05 is 0.05 +- 0.011 (1 sd).
    assert stats.kstest(pvalues, "uniform").pvalue > 1e-3
    assert 0.02 <= np.mean(pvalues < 0.05) <= 0.08
    assert pvalues.min() >= 1 / 301


def test_typicality_rejects_shifted_observations() -> None:
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(500, 10))
    # A coherent offset of 1.5 sd in every feature: Mahalanobis distance sqrt(10) * 1.5 ~ 4.7.
    shifted = rng.normal(size=(50, 10)) + 1.5
    assert np.mean(typicality_pvalues(shifted, sims) < 0.05) > 0.9


def test_typicality_checks_shapes() -> None:
    with pytest.raises(ValueError, match="x_obs has 3 features but x_sims has 2"):
        typicality_pvalues(np.zeros((1, 3)), np.zeros((50, 2)))
    with pytest.raises(ValueError, match=r"x_sims must have shape \(N, F\)"):
        typicality_pvalues(np.zeros((1, 2)), np.zeros(50))


def test_surprise_is_uniform_for_exchangeable_scores_and_two_sided() -> None:
    rng = np.random.default_rng(2)
    sims = rng.normal(size=999)
    pvalues = surprise_pvalues(rng.normal(size=2000), sims)
    # 2000 p-values on a grid of step 2/1000: the FPR at 0.05 is 0.05 +- 0.005 (1 sd).
    assert 0.035 <= np.mean(pvalues < 0.05) <= 0.065
    assert stats.kstest(pvalues, "uniform").pvalue > 1e-3
    # Either tail rejects: much sharper and much broader posteriors alike.
    extreme = surprise_pvalues(np.array([10.0, -10.0, 0.0]), sims)
    np.testing.assert_allclose(extreme[:2], 2 / 1000)
    assert extreme[2] > 0.9


def test_sharpness_uses_as_many_draws_as_asked_and_refuses_nan() -> None:
    log_prob = np.array([[1.0, 2.0, 9.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(posterior_sharpness(log_prob, num_draws=2), [1.5, 0.0])
    np.testing.assert_allclose(posterior_sharpness(log_prob), [4.0, 1.0])
    with pytest.raises(ValueError, match=r"num_draws must be in \[1, 3\]"):
        posterior_sharpness(log_prob, num_draws=4)
    assert np.isnan(posterior_sharpness(np.array([[np.nan, 1.0]])))[0]
    np.testing.assert_allclose(surprise_pvalues(np.array([np.inf]), np.arange(99.0)), 0.02)
    with pytest.raises(ValueError, match="score_obs holds NaN"):
        surprise_pvalues(np.array([np.nan]), np.arange(99.0))
    with pytest.raises(ValueError, match="at least 19 simulations"):
        surprise_pvalues(np.zeros(1), np.zeros(5))


def test_recovery_of_known_parameters() -> None:
    """Exact Gaussian posteriors recover the truth (coverage 0.68 / 0.95, no bias); posteriors
    shifted by one standard deviation show a bias of -1 and lose coverage."""
    from pipeline.diagnostics import marginal_recovery

    rng = np.random.default_rng(3)
    theta = rng.normal(size=(2000, 2))
    centre = theta + rng.normal(size=theta.shape)  # the posterior mean scatters by 1 sd
    samples = centre[:, None, :] + rng.normal(size=(2000, 400, 2))
    bias, inside_68, inside_95 = marginal_recovery(samples, theta)
    # 2000 observations: a coverage fraction's sd is at most 0.011; the bias's 0.022.
    np.testing.assert_allclose(bias, 0, atol=0.07)
    np.testing.assert_allclose(inside_68, 0.68, atol=0.04)
    np.testing.assert_allclose(inside_95, 0.95, atol=0.03)
    bias, inside_68, _ = marginal_recovery(samples - 1.0, theta)
    np.testing.assert_allclose(bias, -1, atol=0.07)
    assert np.all(inside_68 < 0.55)
    # A posterior collapsed to one value: infinitely biased unless it is the truth (it read 0).
    collapsed = np.zeros((3, 10, 2))
    bias, inside_68, _ = marginal_recovery(collapsed, np.array([[1.0, 0.0]] * 3))
    assert bias.tolist() == [-np.inf, 0.0] and inside_68.tolist() == [0.0, 1.0]


def test_mock_observations_come_from_the_other_model(tmp_path) -> None:
    from pipeline.observations import make_observations, read_mock_of, read_reference
    from pipeline.tasks import get_task

    task = get_task("sn_cosmology")
    make_observations(task, 3, 100, 5, tmp_path / "own.h5")
    make_observations(task, 3, 100, 5, tmp_path / "mock.h5", mock=get_task("sn_cosmology_offset"))
    theta, x, reference = read_reference(tmp_path / "own.h5")
    theta_mock, x_mock, no_reference = read_reference(tmp_path / "mock.h5")
    # The same parameters and noise, then the mock model's offset of 0.1 mag; no reference
    # (the task's would be the posterior of another model).
    np.testing.assert_array_equal(theta_mock, theta)
    np.testing.assert_allclose(x_mock - x, 0.1, atol=1e-5)
    assert reference is not None and no_reference is None
    assert read_mock_of(tmp_path / "mock.h5") == "sn_cosmology_offset"
    assert read_mock_of(tmp_path / "own.h5") is None
    with pytest.raises(ValueError, match="mocks must share the parameters"):
        make_observations(task, 1, 0, 5, tmp_path / "bad.h5", mock=get_task("two_moons"))
    other_units = get_task("sn_cosmology_offset")
    other_units.parameter_units = ("", "km")
    with pytest.raises(ValueError, match=r"measures its parameters in \['', 'km'\]"):
        make_observations(task, 1, 0, 5, tmp_path / "bad.h5", mock=other_units)


def test_mock_configs_are_checked_before_any_job() -> None:
    from pipeline.tasks.experiment import resolve_tasks

    def resolve(mocks, observed=None):
        return resolve_tasks(["sn_cosmology"], {}, {}, observed or {}, {}, [], mocks=mocks)

    assert resolve({"sn_cosmology": "sn_cosmology_offset"})["sn_cosmology"].name == "sn_cosmology"
    with pytest.raises(ValueError, match="config 'mocks' names two_moons, which config 'tasks'"):
        resolve({"two_moons": "sn_cosmology_offset"})
    with pytest.raises(ValueError, match="config mocks.sn_cosmology: mock model 'two_moons' has"):
        resolve({"sn_cosmology": "two_moons"})
    with pytest.raises(ValueError, match="config mocks.sn_cosmology: unknown task 'sn_offset'"):
        resolve({"sn_cosmology": "sn_offset"})
    with pytest.raises(ValueError, match="observed.sn_cosmology and mocks.sn_cosmology both"):
        resolve({"sn_cosmology": "sn_cosmology_offset"}, {"sn_cosmology": "x.npy"})

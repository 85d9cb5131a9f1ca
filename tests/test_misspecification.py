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
    with pytest.raises(ValueError, match="log_prob holds 1 NaN or inf"):
        posterior_sharpness(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="at least 19 simulations"):
        surprise_pvalues(np.zeros(1), np.zeros(5))

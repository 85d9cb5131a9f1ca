"""Is an observation one the simulator could have produced? Two rank tests against the held-out
simulations, one in data space and one in the estimator's own terms.

Both compare each observation with the ``N`` test simulations, which are draws of the training
distribution (``theta`` from the prior, ``x`` from the simulator). Under the null hypothesis that
the observation is one more such draw, it is exchangeable with them, so the rank of any
statistic computed symmetrically is uniform on ``1..N+1`` and the p-values below are exactly
calibrated (conservative under ties), whatever the task, the statistic or the estimator.

- :func:`typicality_pvalues` (data space): the squared Mahalanobis distance of ``x``'s summaries
  from the centre of the pooled set of the observation and the simulations (the construction of
  :func:`pipeline.diagnostics.predictive_pvalues`, here against the prior predictive). It flags
  data outside the cloud of simulations: a shifted calibration, an unmodelled systematic.
- :func:`surprise_pvalues` (estimator space): the mean log-density the estimator assigns to its
  own draws at ``x``, a sharpness the network produces for every ``x``. Outside the training
  distribution a network extrapolates, and its posterior turns unusually sharp or broad even
  where the summaries look ordinary; the test is two-sided.

References:
    | Detecting model misspecification in amortized Bayesian inference with neural networks
    | (Schmitt, Bürkner, Köthe & Radev), https://arxiv.org/abs/2112.08866: how posteriors
    | degrade outside the training distribution, and a test in the learned summary space.
"""

from __future__ import annotations

import numpy as np

from pipeline.diagnostics.common import check_finite, check_ndim
from pipeline.diagnostics.predictive import predictive_pvalues

__all__ = ["posterior_sharpness", "surprise_pvalues", "typicality_pvalues"]

# Observations per batch of typicality_pvalues: each holds a copy of the N simulations.
BATCH = 32


def typicality_pvalues(x_obs: np.ndarray, x_sims: np.ndarray) -> np.ndarray:
    """Prior predictive p-value of each observation's summaries among the simulations'.

    ``p_i = (1 + #{j : d(x_sims[j]) >= d(x_obs[i])}) / (N + 1)``, with ``d`` the squared
    Mahalanobis distance in the pooled set of ``x_obs[i]`` and the ``N`` simulations.

    Arguments:
        x_obs: Observations' summaries, shape ``(n, F)``.
        x_sims: Summaries of simulations of the training distribution, shape ``(N, F)`` with
            ``N >= max(20, F + 1)``.

    Returns:
        p-values in ``[1 / (N + 1), 1]``, shape ``(n,)``; small: ``x_obs[i]`` lies further out
        than the simulations do.
    """
    x_obs, x_sims = np.asarray(x_obs, dtype=float), np.asarray(x_sims, dtype=float)
    check_ndim("x_obs", x_obs, 2, "(n, F)")
    check_ndim("x_sims", x_sims, 2, "(N, F)")
    if x_obs.shape[1] != x_sims.shape[1]:
        raise ValueError(
            f"x_obs has {x_obs.shape[1]} features but x_sims has {x_sims.shape[1]}: compare "
            "summaries of the same task"
        )
    pvalues = [
        predictive_pvalues(batch, np.broadcast_to(x_sims, (len(batch), *x_sims.shape)))
        for batch in np.array_split(x_obs, max(1, -(-len(x_obs) // BATCH)))
        if len(batch)
    ]
    return np.concatenate(pvalues) if pvalues else np.empty(0)


def posterior_sharpness(log_prob: np.ndarray, num_draws: int | None = None) -> np.ndarray:
    """Mean log-density of the estimator's draws at each ``x``: ``(n, M)`` to ``(n,)``.

    The first ``num_draws`` draws only (all by default): the test set and the observations must
    use as many for their scores to be exchangeable, since the mean's noise falls with ``M``.
    A row holding NaN or inf scores NaN or inf: the caller decides what that means.
    """
    log_prob = np.asarray(log_prob, dtype=float)
    check_ndim("log_prob", log_prob, 2, "(n, M)")
    if num_draws is not None:
        if not 1 <= num_draws <= log_prob.shape[1]:
            raise ValueError(f"num_draws must be in [1, {log_prob.shape[1]}], got {num_draws}")
        log_prob = log_prob[:, :num_draws]
    return log_prob.mean(axis=1)


def surprise_pvalues(score_obs: np.ndarray, score_sims: np.ndarray) -> np.ndarray:
    """Two-sided rank p-value of each observation's score among the simulations' scores.

    ``p_i = min(1, 2 min(1 + #{j : s_j >= s_i}, 1 + #{j : s_j <= s_i}) / (N + 1))``: twice the
    smaller tail, each tail counting the observation itself.

    Arguments:
        score_obs: Scores of the observations, shape ``(n,)`` (e.g. :func:`posterior_sharpness`);
            an infinite score is as extreme as it gets (p = 2 / (N + 1)), NaN is refused.
        score_sims: The same score at the ``N >= 19`` simulations, finite, shape ``(N,)``.

    Returns:
        p-values in ``[2 / (N + 1), 1]``, shape ``(n,)``.
    """
    score_obs = np.asarray(score_obs, dtype=float)
    score_sims = np.asarray(score_sims, dtype=float)
    check_ndim("score_obs", score_obs, 1, "(n,)")
    check_ndim("score_sims", score_sims, 1, "(N,)")
    if len(score_sims) < 19:
        raise ValueError(
            f"need at least 19 simulations for a p-value that can reach 0.1, got {len(score_sims)}"
        )
    if np.isnan(score_obs).any():
        raise ValueError("score_obs holds NaN; map an undefined score to inf (most extreme)")
    check_finite("score_sims", score_sims)
    upper = 1 + np.sum(score_sims[None, :] >= score_obs[:, None], axis=1)
    lower = 1 + np.sum(score_sims[None, :] <= score_obs[:, None], axis=1)
    return np.minimum(1.0, 2 * np.minimum(upper, lower) / (len(score_sims) + 1.0))

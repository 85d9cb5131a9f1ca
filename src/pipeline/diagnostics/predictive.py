"""Posterior predictive checks in data space, on simulations the caller has already run.

Every function takes arrays: the simulator runs outside, on parameters drawn from the
posterior estimator, and its outputs come in as ``x_pred`` of shape ``(n, S, F)``, ``S``
predictive simulations for each of ``n`` observations. Data with more axes per simulation,
``(n, S, *x_shape)``, are flattened to ``F = prod(x_shape)`` features.

The discrepancy is the squared Mahalanobis distance of a point from the predictive mean under
the predictive covariance, both estimated per observation. They are estimated from the pooled
set of the ``S`` draws *and* the point under test (``x_obs`` or ``x_rep``): a symmetric
function of all ``S + 1`` points, so when the point is exchangeable with the draws its
distance rank is exactly uniform, however poorly ``S`` draws estimate the covariance.
Each feature is first scaled by its pooled standard deviation (Mahalanobis distances do not
change under that scaling); a feature constant over the pool is left unscaled and contributes
nothing; and ``1e-6`` is added to the diagonal of the resulting correlation matrix, so a
singular covariance (a constant feature, exactly collinear features) stays invertible. The
ridge changes the distance along a direction of variance ``lambda`` (in standard deviations)
by a factor ``lambda / (lambda + 1e-6)``.

References:
    | Posterior predictive assessment of model fitness via realized discrepancies
    | (Gelman, Meng & Stern, 1996), Statistica Sinica 6, 733-807

    | Bayesian Data Analysis, 3rd ed. (Gelman et al., 2013), chapter 6
"""

from __future__ import annotations

import numpy as np

from pipeline.diagnostics.common import (
    check_finite,
    check_levels,
    check_ndim,
    coverage_at,
    credibility,
)
from pipeline.diagnostics.coverage import DEFAULT_LEVELS
from pipeline.predictive_draws import MIN_DRAWS, min_predictive_draws

__all__ = ["predictive_coverage", "predictive_intervals", "predictive_pvalues"]
# Added to the diagonal of the correlation matrix (features in units of standard deviation).
RIDGE = 1e-6


def _flatten_data(
    name_obs: str, x_obs: np.ndarray, x_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Checks ``(n, *x_shape)`` against ``(n, S, *x_shape)``; returns ``(n, F)``, ``(n, S, F)``."""
    if x_obs.ndim < 2:
        raise ValueError(f"{name_obs} must have shape (n, F), got shape {x_obs.shape}")
    if x_pred.ndim != x_obs.ndim + 1:
        raise ValueError(
            f"x_pred must have shape (n, S, F) to match {name_obs} of shape (n, F), got "
            f"x_pred shape {x_pred.shape} and {name_obs} shape {x_obs.shape}"
        )
    if x_pred.shape[0] != x_obs.shape[0] or x_pred.shape[2:] != x_obs.shape[1:]:
        raise ValueError(
            f"x_pred has shape {x_pred.shape} but {name_obs} has shape {x_obs.shape}: expected "
            f"(n, S, F) and (n, F) with the same n and F"
        )
    num, draws = x_pred.shape[:2]
    features = int(np.prod(x_obs.shape[1:]))
    if num < 1 or features < 1:
        raise ValueError(
            f"need at least 1 observation and 1 feature, got {name_obs} shape {x_obs.shape}"
        )
    needed = min_predictive_draws(features)
    if draws < needed:
        raise ValueError(
            f"x_pred needs at least {needed} predictive draws per observation (at least "
            f"{MIN_DRAWS}, so that a p-value can reach 0.05, and more than F={features}, so "
            f"that the covariance has full rank), got S={draws}"
        )
    check_finite(name_obs, x_obs)
    check_finite("x_pred", x_pred)
    return x_obs.reshape(num, features), x_pred.reshape(num, draws, features)


def squared_mahalanobis(points: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each point from the mean of its set.

    Mean and covariance are those of the set itself, scaled and regularised as described in
    the module docstring.

    Arguments:
        points: ``n`` sets of ``K`` points, shape ``(n, K, F)``.

    Returns:
        Squared distances, shape ``(n, K)``.
    """
    # Scaling each feature by its largest magnitude first changes no distance and keeps the
    # squares below from overflowing, however large the data.
    magnitude = np.max(np.abs(points), axis=1, keepdims=True)
    points = points / np.where(magnitude > 0, magnitude, 1.0)
    # A feature equal over the whole set gets exactly zero, not rounding noise about its mean.
    constant = np.ptp(points, axis=1, keepdims=True) == 0
    centred = np.where(constant, 0.0, points - points.mean(axis=1, keepdims=True))
    std = centred.std(axis=1, keepdims=True)
    scaled = centred / np.where(std > 0, std, 1.0)
    covariance = np.einsum("nkf,nkg->nfg", scaled, scaled) / points.shape[1]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.clip(eigenvalues, 0.0, None) + RIDGE
    return np.sum((scaled @ eigenvectors) ** 2 / eigenvalues[:, None, :], axis=-1)


def _pooled_distances(x: np.ndarray, x_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances of ``x`` (n, F) and of the draws (n, S, F) in the pooled set of S + 1."""
    distances = squared_mahalanobis(np.concatenate([x[:, None, :], x_pred], axis=1))
    return distances[:, 0], distances[:, 1:]


def predictive_pvalues(x_obs: np.ndarray, x_pred: np.ndarray) -> np.ndarray:
    """Posterior predictive p-value of the Mahalanobis discrepancy, per observation.

    ``p_i = (1 + #{s : d(x_pred[i, s]) >= d(x_obs[i])}) / (S + 1)``, with ``d`` the squared
    Mahalanobis distance from the predictive mean (module docstring). The ``+ 1`` counts
    ``x_obs`` itself, so ``p >= 1 / (S + 1) > 0``; ties count against rejection.

    Reading the values: posterior predictive p-values are conservative. The posterior was
    conditioned on ``x_obs``, so the predictive distribution is pulled towards it, and for a
    correct model and an exact posterior the p-values cluster around or above 0.5 rather
    than being uniform (in the Gaussian model of the tests, ``x_obs`` is on average closer to
    the predictive mean than a predictive draw). A large p-value therefore proves little;
    only a small one (``< 0.05``) flags a misfit: an observation the model cannot reproduce
    (prior-data conflict, a misspecified simulator, a posterior in the wrong place). For a
    calibration test with a known uniform answer, see :func:`predictive_coverage`.

    Arguments:
        x_obs: Observed data, shape ``(n, F)`` (or ``(n, *x_shape)``).
        x_pred: Simulations from parameters drawn from the posterior given ``x_obs[i]``,
            shape ``(n, S, F)`` (or ``(n, S, *x_shape)``), with ``S >= max(20, F + 1)``.

    Returns:
        p-values in ``[1 / (S + 1), 1]``, shape ``(n,)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x_pred = rng.normal(size=(2, 200, 3))
        >>> p = predictive_pvalues(np.array([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]]), x_pred)
        >>> bool(p[0] > 0.5), float(p[1]) == 1 / 201
        (True, True)
    """
    x_obs = np.asarray(x_obs, dtype=float)
    x_pred = np.asarray(x_pred, dtype=float)
    x_obs, x_pred = _flatten_data("x_obs", x_obs, x_pred)
    distance_obs, distance_pred = _pooled_distances(x_obs, x_pred)
    exceed = np.sum(distance_pred >= distance_obs[:, None], axis=1)
    return (1.0 + exceed) / (x_pred.shape[1] + 1.0)


def predictive_coverage(
    x_rep: np.ndarray, x_pred: np.ndarray, levels: np.ndarray = DEFAULT_LEVELS
) -> np.ndarray:
    """Expected coverage of central predictive regions by a fresh replicate: calibration in x.

    Setting: for test pair ``i``, ``theta_true[i]`` produced the observation ``x_obs[i]`` on
    which the posterior was conditioned; ``x_rep[i] ~ p(x | theta_true[i])`` is a *second*,
    fresh simulation from the same ``theta_true[i]``, independent of ``x_obs[i]`` given
    ``theta_true[i]``; ``x_pred[i, s] ~ p(x | theta_s)`` with ``theta_s ~ q(theta | x_obs[i])``.

    Why the answer is known: given ``x_obs``, the truth ``theta_true`` is distributed as
    ``p(theta | x_obs)``. If ``q`` is that exact posterior, ``theta_true`` and the ``theta_s``
    are i.i.d. given ``x_obs``, and so are the pairs ``(theta_true, x_rep)`` and
    ``(theta_s, x_pred[s])``: ``x_rep`` is exchangeable with the ``S`` predictive draws.
    The distance ``d`` is computed in the pooled set of all ``S + 1`` points (module
    docstring), a symmetric function of them, so the rank of ``d(x_rep)`` among the draws is
    uniform on ``{0, ..., S}`` whatever the data distribution.

    With ``alpha_i`` the mid-rank of the draws strictly closer to the predictive mean than
    ``x_rep[i]`` is (:func:`~pipeline.diagnostics.common.credibility`), ``x_rep[i]`` lies in
    the central predictive region of level ``l`` when ``alpha_i < l``, and the coverage at
    ``l`` is ``mean_i(alpha_i < l)``, on the diagonal up to ``1 / (2 (S + 1))`` for an exact
    posterior. Conventions are those of
    :func:`pipeline.diagnostics.hpd_coverage`: an over-confident posterior gives predictive
    draws too concentrated, the replicate falls outside too often and the curve lies below the
    diagonal; an under-confident one lies above it. Summarise with
    :func:`pipeline.diagnostics.max_coverage_deviation`.

    Unlike :func:`predictive_pvalues` this needs no ``x_obs`` (only the draws conditioned on
    it) but does need ``theta_true``, so it runs on simulated test pairs, not on real data.

    Arguments:
        x_rep: Fresh replicates, one per test pair, shape ``(n, F)`` (or ``(n, *x_shape)``).
        x_pred: Predictive draws, shape ``(n, S, F)`` (or ``(n, S, *x_shape)``), with
            ``S >= max(20, F + 1)``.
        levels: Credibility levels in ``[0, 1]``, shape ``(L,)``.

    Returns:
        Expected coverage at each level, shape ``(L,)``.
    """
    x_rep = np.asarray(x_rep, dtype=float)
    x_pred = np.asarray(x_pred, dtype=float)
    levels = check_levels(levels)
    x_rep, x_pred = _flatten_data("x_rep", x_rep, x_pred)
    distance_rep, distance_pred = _pooled_distances(x_rep, x_pred)
    alpha = credibility(distance_pred < distance_rep[:, None])
    return coverage_at(alpha, levels)


def predictive_intervals(x_pred: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Pointwise quantiles of the predictive draws, e.g. bands to plot around ``x_obs``.

    Arguments:
        x_pred: Predictive draws, shape ``(n, S, F)`` (or ``(n, S, *x_shape)``), ``S >= 2``.
        quantiles: Probabilities in ``[0, 1]``, shape ``(Q,)``, e.g. ``[0.05, 0.5, 0.95]``.

    Returns:
        Quantiles (linear interpolation), shape ``(n, Q, F)`` (or ``(n, Q, *x_shape)``).
    """
    x_pred = np.asarray(x_pred, dtype=float)
    quantiles = np.asarray(quantiles, dtype=float)
    check_ndim("quantiles", quantiles, 1, "(Q,)")
    if quantiles.size == 0 or not np.all((quantiles >= 0) & (quantiles <= 1)):
        raise ValueError(f"quantiles must be a non-empty array in [0, 1], got {quantiles}")
    if x_pred.ndim < 3:
        raise ValueError(f"x_pred must have shape (n, S, F), got shape {x_pred.shape}")
    if x_pred.shape[0] < 1 or x_pred.shape[1] < 2 or np.prod(x_pred.shape[2:]) < 1:
        raise ValueError(
            f"need at least 1 observation, 2 draws and 1 feature, got x_pred shape {x_pred.shape}"
        )
    check_finite("x_pred", x_pred)
    return np.moveaxis(np.quantile(x_pred, quantiles, axis=1), 0, 1)

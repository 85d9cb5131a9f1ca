"""Local classifier two-sample test (L-C2ST): is the estimator right at this observation?

Needs no reference posterior, only the simulations used for calibration. A classifier learns
to tell the estimator's joint ``q(theta | x) p(x)`` (class 0: pairs ``(theta_q, x)`` with
``theta_q ~ q(theta | x)``) from the true joint ``p(theta, x)`` (class 1: the simulated pairs
``(theta, x)``), on the same ``x`` for both classes. The Bayes-optimal classifier predicts
``d(theta, x) = q(theta | x) / (q(theta | x) + p(theta | x))`` for class 0, which is 1/2
everywhere exactly when ``q(. | x) = p(. | x)``. At an observation ``x_o`` the statistic is

    ``T(x_o) = mean_m (d(theta_m, x_o) - 1/2)^2``, with ``theta_m ~ q(theta | x_o)``,

the mean squared distance of the predicted probabilities from chance over the estimator's own
draws (the "T_MSE" statistic of Linhart et al., 2023). The classifier is trained once, on the
calibration set, and then evaluated at any number of observations.

The null distribution comes from permutations, as in the paper: the classifier is retrained
``num_null`` times on permuted class labels and each null classifier is evaluated at the same
draws; the p-value is ``(1 + #{h : T_h(x_o) >= T(x_o)}) / (num_null + 1)``. The permutations
here only swap the labels *within* a calibration pair, ``(theta_q_cal[i], x_cal[i])`` against
``(theta_cal[i], x_cal[i])``, each pair with probability 1/2, where the paper and ``sbi``
shuffle all ``2 N`` labels. When ``q(. | x) = p(. | x)`` for every ``x`` (the global null),
``theta_q_cal[i]`` and ``theta_cal[i]`` are i.i.d. given ``x_cal[i]``, so every swap leaves
the distribution of the labelled calibration set unchanged, and the observed and the null
statistics are exchangeable: the p-value is exactly valid (``P(p <= a) <= a``) at every
``x_o``. A full shuffle can put both rows of a pair in one class, a data set the original
design never produces, so it is only approximately valid. A small p-value says that the
classifier, trained on all of the calibration set, tells the estimator from the truth at
``x_o``.

Classifier: the scikit-learn MLP of :func:`pipeline.diagnostics.c2st` (two hidden layers of
``10 * (D + F)`` ReLU units, here at most 200, Adam, early stopping on a held-out 10%). The
``sbi`` implementation (``sbi.diagnostics.lc2st``) also uses an MLP with early stopping (its
layers sized ``10 * D``) and the same statistic, with the full shuffle above for its null and a
p-value without the ``+ 1`` correction, which can be 0; here it never is. Early stopping keeps
the ``num_null + 1`` fits cheap (N = 1000 pairs, D = F = 2, M = 1000 draws, 5 observations and
``num_null = 100``: 15 to 25 s of one core, measured on a shared machine) and is applied to the
null fits too, so the test stays calibrated. Features are z-scored with the calibration set:
``theta`` with the pooled ``theta_cal`` and ``theta_q_cal`` (a statistic the label permutation
leaves unchanged), ``x`` with ``x_cal``; a constant feature is left unscaled.

References:
    | L-C2ST: Local Diagnostics for Posterior Approximations in Simulation-Based Inference
    | (Linhart, Gramfort & Rodrigues, 2023) https://arxiv.org/abs/2306.03580

    | Revisiting Classifier Two-Sample Tests (Lopez-Paz & Oquab, 2017)
    | https://arxiv.org/abs/1610.06545
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed
from scipy import stats
from threadpoolctl import threadpool_limits

from pipeline.diagnostics.common import check_finite, check_ndim, mlp_classifier, zscore
from pipeline.diagnostics.predictive import squared_mahalanobis
from pipeline.predictive_draws import MIN_DRAWS

__all__ = ["MIN_NULL", "MIN_PAIRS", "LocalC2ST", "local_c2st"]

# Early stopping holds out 10% of the 2N rows, stratified; 20 pairs per class put at least
# 2 of each class there (as in c2st). Power needs far more: see local_c2st.
MIN_PAIRS = 20
# The smallest p-value is 1 / (num_null + 1); 19 null fits let it reach 0.05.
MIN_NULL = 19
MAX_HIDDEN_UNITS = 200


@dataclass(frozen=True, eq=False)
class LocalC2ST:
    """Result of :func:`local_c2st` for ``n_obs`` observations.

    Attributes:
        statistic: ``T(x_o) = mean_m (d_m - 1/2)^2`` per observation, shape ``(n_obs,)``;
            0 at chance, at most 1/4.
        pvalue: Permutation p-value per observation, in ``[1 / (num_null + 1), 1]``, shape
            ``(n_obs,)``. Small values reject ``q(. | x_o) = p(. | x_o)``.
        dispersion_correlation: Spearman correlation, per observation, between ``d_m`` and the
            Mahalanobis distance of ``theta_q_m`` from the mean of the draws at ``x_o`` (under
            their covariance), shape ``(n_obs,)``, in ``[-1, 1]``. Negative: the classifier
            flags the centre of ``q`` as the estimator's and its tails as the truth's, so
            ``q`` is too narrow, **over-confident**. Positive: the tails are flagged as the
            estimator's, ``q`` is too wide, **under-confident**. Read it only where
            ``pvalue`` is small; a biased (shifted) estimator raises ``d`` on one side and
            lowers it on the other, which a correlation with the distance does not capture
            (typically near 0). Exactly 0 where ``d`` is constant over the draws.
        null_statistic: ``T`` of each classifier trained on permuted labels, shape
            ``(num_null, n_obs)``.
        probability: ``d_m = d(theta_q_m, x_o)``, the classifier's probability that draw
            ``m`` comes from the estimator (class 0), shape ``(n_obs, M)``; its histogram
            against 1/2 is the paper's graphical diagnostic.
    """

    statistic: np.ndarray
    pvalue: np.ndarray
    dispersion_correlation: np.ndarray
    null_statistic: np.ndarray
    probability: np.ndarray


def _check_calibration(
    theta_cal: np.ndarray, x_cal: np.ndarray, theta_q_cal: np.ndarray
) -> tuple[int, int]:
    """Returns ``(N, D)``."""
    check_ndim("theta_cal", theta_cal, 2, "(N, D)")
    if theta_q_cal.shape != theta_cal.shape:
        raise ValueError(
            f"theta_q_cal has shape {theta_q_cal.shape} but theta_cal has shape "
            f"{theta_cal.shape}: both need shape (N, D), one estimator draw per pair"
        )
    num, dim = theta_cal.shape
    if x_cal.ndim < 2 or x_cal.shape[0] != num:
        raise ValueError(
            f"x_cal must have shape (N, F) (or (N, *x_shape)) with N={num} as in theta_cal, "
            f"got shape {x_cal.shape}"
        )
    if dim < 1 or np.prod(x_cal.shape[1:]) < 1:
        raise ValueError(
            f"need at least one parameter and one data feature, got theta_cal shape "
            f"{theta_cal.shape} and x_cal shape {x_cal.shape}"
        )
    if num < MIN_PAIRS:
        raise ValueError(
            f"local_c2st needs at least {MIN_PAIRS} calibration pairs (theta_cal, x_cal, "
            f"theta_q_cal), got N={num}"
        )
    check_finite("theta_cal", theta_cal)
    check_finite("x_cal", x_cal)
    check_finite("theta_q_cal", theta_q_cal)
    return num, dim


def _check_observations(
    theta_q_obs: np.ndarray, x_obs: np.ndarray, dim: int, x_shape: tuple[int, ...]
) -> None:
    check_ndim("theta_q_obs", theta_q_obs, 3, "(n_obs, M, D)")
    if theta_q_obs.shape[2] != dim:
        raise ValueError(
            f"theta_q_obs has D={theta_q_obs.shape[2]} (shape {theta_q_obs.shape}) but "
            f"theta_cal has D={dim}"
        )
    if x_obs.shape != (theta_q_obs.shape[0], *x_shape):
        raise ValueError(
            f"x_obs has shape {x_obs.shape}, expected (n_obs, F) = "
            f"{(theta_q_obs.shape[0], *x_shape)}: n_obs as in theta_q_obs {theta_q_obs.shape} "
            "and the data shape of x_cal"
        )
    if theta_q_obs.shape[0] < 1:
        raise ValueError(f"need at least 1 observation, got theta_q_obs shape {theta_q_obs.shape}")
    needed = max(MIN_DRAWS, dim + 2)
    if theta_q_obs.shape[1] < needed:
        raise ValueError(
            f"theta_q_obs needs at least {needed} estimator draws per observation (at least "
            f"{MIN_DRAWS}, and more than D + 1 for the draws' covariance), got "
            f"M={theta_q_obs.shape[1]}"
        )
    check_finite("theta_q_obs", theta_q_obs)
    check_finite("x_obs", x_obs)


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of the rows of ``a`` and ``b`` (n, M); 0 where a row is constant."""
    rank_a = stats.rankdata(a, axis=1)
    rank_b = stats.rankdata(b, axis=1)
    rank_a -= rank_a.mean(axis=1, keepdims=True)
    rank_b -= rank_b.mean(axis=1, keepdims=True)
    scale = np.sqrt(np.sum(rank_a**2, axis=1) * np.sum(rank_b**2, axis=1))
    covariance = np.sum(rank_a * rank_b, axis=1)
    return np.where(scale > 0, covariance / np.where(scale > 0, scale, 1.0), 0.0)


def _probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    evaluate: np.ndarray,
    seed: np.random.SeedSequence,
    permute: bool,
    hidden_units: int,
) -> np.ndarray:
    """Trains one classifier; P(class 0) at ``evaluate``.

    ``features`` holds the ``N`` class-0 rows, then the ``N`` class-1 rows of the same pairs;
    with ``permute`` the labels of each pair are swapped with probability 1/2.
    """
    rng = np.random.default_rng(seed)
    if permute:
        swap = rng.random(len(labels) // 2) < 0.5
        labels = np.concatenate([swap, ~swap]).astype(float)
    classifier = mlp_classifier(hidden_units, int(rng.integers(2**31 - 1)), early_stopping=True)
    # One BLAS thread: faster on these small matrices and right for joblib workers (c2st.py).
    with threadpool_limits(limits=1):
        classifier.fit(features, labels)
        return classifier.predict_proba(evaluate)[:, 0]


def _statistic(probability: np.ndarray) -> np.ndarray:
    """``T = mean_m (d_m - 1/2)^2`` over the last axis."""
    return np.mean((probability - 0.5) ** 2, axis=-1)


def _null_statistic(
    features: np.ndarray,
    labels: np.ndarray,
    evaluate: np.ndarray,
    seed: np.random.SeedSequence,
    hidden_units: int,
    shape: tuple[int, int],
) -> np.ndarray:
    """``T`` per observation of one classifier trained on permuted labels, shape (n_obs,)."""
    probability = _probabilities(features, labels, evaluate, seed, True, hidden_units)
    return _statistic(probability.reshape(shape))


def local_c2st(
    theta_cal: np.ndarray,
    x_cal: np.ndarray,
    theta_q_cal: np.ndarray,
    theta_q_obs: np.ndarray,
    x_obs: np.ndarray,
    *,
    num_null: int = 100,
    seed: int = 0,
    hidden_units: int | None = None,
    n_jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> LocalC2ST:
    """Local C2ST of a posterior estimator at each of ``n_obs`` observations.

    See the module docstring for the test. Calibration data: ``N`` simulated pairs
    ``theta_cal[i] ~ p(theta)``, ``x_cal[i] ~ p(x | theta_cal[i])`` (held out from training
    the estimator), and one estimator draw per pair, ``theta_q_cal[i] ~ q(theta | x_cal[i])``.
    Each observation ``x_obs[j]`` comes with ``M`` estimator draws ``theta_q_obs[j]``.

    Cost: ``num_null + 1`` classifier fits on ``2 N`` rows, whatever ``n_obs``; spread them
    over processes with ``n_jobs``. Power grows with ``N``: ``N >= 20`` only lets the
    classifier train; ``N = 1000`` detects a posterior width off by a factor of 2 in 2-D
    (``tests/test_diagnostics_local.py``).

    Arguments:
        theta_cal: Parameters of the calibration simulations, shape ``(N, D)``.
        x_cal: Their simulated data, shape ``(N, F)`` or ``(N, *x_shape)`` (flattened).
        theta_q_cal: One estimator draw given each ``x_cal[i]``, shape ``(N, D)``.
        theta_q_obs: Estimator draws given each observation, shape ``(n_obs, M, D)``, with
            ``M >= max(20, D + 2)``.
        x_obs: The observations, shape ``(n_obs, F)`` or ``(n_obs, *x_shape)``.
        num_null: Number of classifiers trained on permuted labels, at least 19.
        seed: Seeds the permutations and the classifiers; results do not depend on ``n_jobs``.
        hidden_units: Width of both hidden layers; default ``min(10 * (D + F), 200)``.
        n_jobs: Number of parallel processes (joblib); -1 uses every core.
        progress: Called with 1 after each null classifier's fit, e.g. ``Progress.update``.

    Returns:
        A :class:`LocalC2ST` with the statistic, p-value and dispersion correlation per
        observation (see its attributes for the sign convention).
    """
    theta_cal = np.asarray(theta_cal, dtype=float)
    x_cal = np.asarray(x_cal, dtype=float)
    theta_q_cal = np.asarray(theta_q_cal, dtype=float)
    theta_q_obs = np.asarray(theta_q_obs, dtype=float)
    x_obs = np.asarray(x_obs, dtype=float)
    _, dim = _check_calibration(theta_cal, x_cal, theta_q_cal)
    _check_observations(theta_q_obs, x_obs, dim, x_cal.shape[1:])
    hidden_units = _hidden_units(num_null, hidden_units, dim + x_cal[0].size)  # D + F
    features, labels, evaluate = _classifier_data(
        theta_cal, x_cal, theta_q_cal, theta_q_obs, x_obs
    )
    seeds = np.random.SeedSequence(seed).spawn(num_null + 1)
    probability = _probabilities(features, labels, evaluate, seeds[0], False, hidden_units)
    probability = probability.reshape(theta_q_obs.shape[:2])
    null_statistic = _null_statistics(
        features, labels, evaluate, seeds[1:], hidden_units, probability.shape, n_jobs, progress
    )
    return _result(probability, null_statistic, theta_q_obs)


def _hidden_units(num_null: int, hidden_units: int | None, num_features: int) -> int:
    """Checks ``num_null`` and ``hidden_units``; the width of the classifiers' hidden layers,
    by default ten per feature of ``(theta, x)``, at most :data:`MAX_HIDDEN_UNITS`."""
    if num_null < MIN_NULL:
        raise ValueError(
            f"num_null must be >= {MIN_NULL} (so that a p-value can reach 0.05), got {num_null}"
        )
    if hidden_units is not None and hidden_units < 1:
        raise ValueError(f"hidden_units must be >= 1 or None, got {hidden_units}")
    if hidden_units is None:
        hidden_units = min(10 * num_features, MAX_HIDDEN_UNITS)
    return hidden_units


def _classifier_data(
    theta_cal: np.ndarray,
    x_cal: np.ndarray,
    theta_q_cal: np.ndarray,
    theta_q_obs: np.ndarray,
    x_obs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classifiers' training rows, their labels and the rows to evaluate, z-scored.

    Arguments:
        theta_cal: Shape ``(N, D)``.
        x_cal: Shape ``(N, F)`` or ``(N, *x_shape)``.
        theta_q_cal: Shape ``(N, D)``.
        theta_q_obs: Shape ``(n_obs, M, D)``.
        x_obs: Shape ``(n_obs, F)`` or ``(n_obs, *x_shape)``.

    Returns:
        ``features`` ``(2 N, D + F)``: the pairs ``(theta_q_cal, x_cal)``, then
        ``(theta_cal, x_cal)``; ``labels`` ``(2 N,)``: 0 for the first ``N`` rows, 1 for the
        others; ``evaluate`` ``(n_obs * M, D + F)``: every draw at ``x_o`` next to ``x_o``,
        all observations in one block.
    """
    num, (num_obs, num_draws, dim) = len(theta_cal), theta_q_obs.shape
    x_cal = x_cal.reshape(num, -1)
    x_obs = x_obs.reshape(num_obs, -1)
    theta_mean, theta_std = zscore(np.concatenate([theta_q_cal, theta_cal]))
    x_mean, x_std = zscore(x_cal)
    theta_cal = (theta_cal - theta_mean) / theta_std
    theta_q_cal = (theta_q_cal - theta_mean) / theta_std
    x_cal = (x_cal - x_mean) / x_std
    features = np.concatenate(
        [np.concatenate([theta_q_cal, x_cal], axis=1), np.concatenate([theta_cal, x_cal], axis=1)]
    )
    labels = np.concatenate([np.zeros(num), np.ones(num)])
    evaluate = np.concatenate(
        [
            ((theta_q_obs - theta_mean) / theta_std).reshape(num_obs * num_draws, dim),
            np.repeat((x_obs - x_mean) / x_std, num_draws, axis=0),
        ],
        axis=1,
    )
    return features, labels, evaluate


def _null_statistics(
    features: np.ndarray,
    labels: np.ndarray,
    evaluate: np.ndarray,
    seeds: list[np.random.SeedSequence],
    hidden_units: int,
    shape: tuple[int, int],
    n_jobs: int,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    """``T`` per observation of one classifier per seed, trained on permuted labels, on
    ``n_jobs`` processes; shape ``(len(seeds), n_obs)``, ``shape`` being ``(n_obs, M)``."""
    fits = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_null_statistic)(features, labels, evaluate, child, hidden_units, shape)
        for child in seeds
    )
    null_statistic = []
    for fit in fits:  # in order of the seeds, whatever n_jobs
        null_statistic.append(fit)
        if progress is not None:
            progress(1)
    return np.stack(null_statistic)


def _result(
    probability: np.ndarray, null_statistic: np.ndarray, theta_q_obs: np.ndarray
) -> LocalC2ST:
    """The test's result from ``d_m`` ``(n_obs, M)``, the null statistics ``(num_null, n_obs)``
    and the draws ``theta_q_obs`` ``(n_obs, M, D)``."""
    statistic = _statistic(probability)
    num_null = len(null_statistic)
    pvalue = (1.0 + np.sum(null_statistic >= statistic, axis=0)) / (num_null + 1.0)
    distances = squared_mahalanobis(theta_q_obs)  # Spearman: squared or not is the same
    return LocalC2ST(
        statistic=statistic,
        pvalue=pvalue,
        dispersion_correlation=_spearman(probability, distances),
        null_statistic=null_statistic,
        probability=probability,
    )

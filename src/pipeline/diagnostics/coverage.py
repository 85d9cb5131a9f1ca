"""Calibration of a posterior estimator: expected coverage (HPD, TARP) and SBC ranks.

Every function takes the posterior samples of all test observations at once and works on
whole arrays; none loops over observations in Python.

Conventions shared by the coverage functions: for test pair ``i`` a statistic
``alpha_i`` in ``[0, 1]`` says how much posterior mass lies "closer" than the truth; the
truth is inside the credible region of level ``l`` when ``alpha_i < l`` (strict), so the
expected coverage at level ``l`` is ``mean_i(alpha_i < l)``. A calibrated posterior gives
``alpha_i ~ U(0, 1)`` and coverage on the diagonal; an over-confident one lies below it and
an under-confident one above it.

References:
    | Simulation-based calibration (Talts et al., 2018)
    | https://arxiv.org/abs/1804.06788

    | Averting a crisis in simulation-based inference (Hermans et al., 2022)
    | https://arxiv.org/abs/2110.06581

    | Sampling-based accuracy testing of posterior estimators for general inference
    | (Lemos et al., 2023) https://arxiv.org/abs/2302.03026
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from pipeline.diagnostics.common import (
    check_finite,
    check_levels,
    check_ndim,
    coverage_at,
    credibility,
)

__all__ = [
    "DEFAULT_LEVELS",
    "hpd_coverage",
    "marginal_recovery",
    "max_coverage_deviation",
    "sbc_histogram",
    "sbc_ranks",
    "sbc_uniformity_pvalues",
    "tarp_coverage",
]

DEFAULT_LEVELS = np.linspace(0.05, 0.95, 19)


def hpd_coverage(
    log_prob_samples: np.ndarray,
    log_prob_true: np.ndarray,
    levels: np.ndarray = DEFAULT_LEVELS,
) -> np.ndarray:
    """Expected coverage of the highest-posterior-density (HPD) credible regions.

    For pair ``i``, ``alpha_i`` is the mid-rank share of posterior samples with a strictly
    higher log-density than the truth (:func:`~pipeline.diagnostics.common.credibility`): the
    credibility of the smallest HPD region that contains the truth. Coverage at level ``l`` is
    ``mean_i(alpha_i < l)``; a truth whose density ties with samples therefore counts as
    inside.

    Arguments:
        log_prob_samples: ``log q(theta_ij | x_i)`` of ``M`` samples per pair, shape ``(n, M)``.
        log_prob_true: ``log q(theta_i | x_i)`` of the true parameters, shape ``(n,)``.
        levels: Credibility levels in ``[0, 1]``, shape ``(L,)``.

    Returns:
        Expected coverage at each level, shape ``(L,)``.

    ``-inf`` is allowed (zero density, e.g. outside a bounded support); NaN and ``+inf`` are not.
    """
    log_prob_samples = np.asarray(log_prob_samples, dtype=float)
    log_prob_true = np.asarray(log_prob_true, dtype=float)
    levels = check_levels(levels)
    check_ndim("log_prob_samples", log_prob_samples, 2, "(n, M)")
    check_ndim("log_prob_true", log_prob_true, 1, "(n,)")
    if log_prob_samples.shape[0] != log_prob_true.shape[0]:
        raise ValueError(
            f"log_prob_samples has shape {log_prob_samples.shape} but log_prob_true has shape "
            f"{log_prob_true.shape}: both need the same number of pairs n"
        )
    if log_prob_samples.shape[0] < 1 or log_prob_samples.shape[1] < 2:
        raise ValueError(
            f"need at least 1 pair and 2 samples per pair, got shape {log_prob_samples.shape}"
        )
    check_finite("log_prob_samples", log_prob_samples, allow_neg_inf=True)
    check_finite("log_prob_true", log_prob_true, allow_neg_inf=True)

    alpha = credibility(log_prob_samples > log_prob_true[:, None])
    return coverage_at(alpha, levels)


def _check_samples_theta(samples: np.ndarray, theta: np.ndarray) -> None:
    check_ndim("samples", samples, 3, "(n, M, D)")
    check_ndim("theta", theta, 2, "(n, D)")
    if samples.shape[0] != theta.shape[0] or samples.shape[2] != theta.shape[1]:
        raise ValueError(
            f"samples has shape {samples.shape} but theta has shape {theta.shape}: "
            "expected (n, M, D) and (n, D)"
        )
    if samples.shape[0] < 1 or samples.shape[1] < 2 or samples.shape[2] < 1:
        raise ValueError(
            f"need at least 1 pair, 2 samples and 1 dimension, got samples shape {samples.shape}"
        )
    check_finite("samples", samples)
    check_finite("theta", theta)


def tarp_coverage(
    samples: np.ndarray,
    theta: np.ndarray,
    levels: np.ndarray = DEFAULT_LEVELS,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Expected coverage of TARP regions: balls around random reference points.

    Each dimension is normalised to the unit interval by the prior box ``[low, high]`` when
    given; otherwise it is z-scored with the mean and standard deviation of ``theta`` and the
    box is the range that the normalised ``theta`` spans. One reference point per pair is
    drawn uniformly in that box, the paper's default. ``alpha_i`` is the mid-rank share of
    samples closer (Euclidean, in normalised units) to the reference than ``theta_i`` is.

    Reading the curve: a calibrated posterior gives the diagonal, and TARP is exact for any
    reference distribution. A wrong width, however, gives an S-shaped curve rather than a
    one-sided one: a ball around a distant reference cuts the posterior almost like a
    half-space, so ``alpha_i`` behaves like a 1-D rank. For levels above 0.5, below the
    diagonal means over-confident and above means under-confident, as for HPD coverage;
    below 0.5 the signs flip.

    Arguments:
        samples: Posterior samples, shape ``(n, M, D)``.
        theta: True parameters, shape ``(n, D)``.
        levels: Credibility levels in ``[0, 1]``, shape ``(L,)``.
        low: Lower corner of the prior box, shape ``(D,)``; with ``high`` or not at all.
        high: Upper corner of the prior box, shape ``(D,)``.
        rng: Source of the reference points.

    Returns:
        Expected coverage at each level, shape ``(L,)``.
    """
    samples = np.asarray(samples, dtype=float)
    theta = np.asarray(theta, dtype=float)
    levels = check_levels(levels)
    _check_samples_theta(samples, theta)
    shift, scale, box_low, box_high = _tarp_box(theta, low, high)

    samples = (samples - shift) / scale
    theta = (theta - shift) / scale
    reference = rng.uniform(box_low, box_high, size=theta.shape)

    distance_samples = np.linalg.norm(samples - reference[:, None, :], axis=-1)
    distance_true = np.linalg.norm(theta - reference, axis=-1)
    alpha = credibility(distance_samples < distance_true[:, None])
    return coverage_at(alpha, levels)


def _tarp_box(
    theta: np.ndarray, low: np.ndarray | None, high: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How :func:`tarp_coverage` normalises each dimension, and its box of reference points.

    Arguments:
        theta: True parameters, shape ``(n, D)``.
        low: Lower corner of the prior box, broadcast to ``(D,)``, or ``None``.
        high: Upper corner of the prior box, broadcast to ``(D,)``, or ``None``.

    Returns:
        ``shift`` and ``scale``, shape ``(D,)`` each, that map a parameter to
        ``(theta - shift) / scale``, and the lower and upper corners of the box in those units,
        shape ``(D,)`` each.
    """
    dim = theta.shape[1]
    if (low is None) != (high is None):
        raise ValueError("give both low and high (the prior box) or neither")
    if low is not None:
        low = np.broadcast_to(np.asarray(low, dtype=float), (dim,))
        high = np.broadcast_to(np.asarray(high, dtype=float), (dim,))
        check_finite("low", low)
        check_finite("high", high)
        if np.any(high <= low):
            raise ValueError(f"the prior box needs high > low, got low={low} and high={high}")
        return low, high - low, np.zeros(dim), np.ones(dim)
    shift, scale = theta.mean(axis=0), theta.std(axis=0)
    # A constant parameter carries no coverage information; scale 1 keeps it finite.
    scale = np.where(scale > 0, scale, 1.0)
    normalised = (theta - shift) / scale
    return shift, scale, normalised.min(axis=0), normalised.max(axis=0)


def sbc_ranks(samples: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Simulation-based calibration ranks of the truth among the marginal samples.

    Arguments:
        samples: Posterior samples, shape ``(n, M, D)``.
        theta: True parameters, shape ``(n, D)``.

    Returns:
        Number of samples strictly below ``theta[i, d]``, integers in ``[0, M]``, shape
        ``(n, D)``. Uniform on ``{0, ..., M}`` for a calibrated posterior.
    """
    samples = np.asarray(samples, dtype=float)
    theta = np.asarray(theta, dtype=float)
    _check_samples_theta(samples, theta)
    return np.sum(samples < theta[:, None, :], axis=1)


def _default_num_bins(num_pairs: int, num_samples: int) -> int:
    # About 10 expected counts per bin keeps the chi-square approximation sound (rule of thumb:
    # >= 5) while leaving enough bins to see the shape of a miscalibration.
    return int(np.clip(num_pairs // 10, 2, num_samples + 1))


def sbc_histogram(
    ranks: np.ndarray, num_samples: int, num_bins: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of SBC ranks and the bin probabilities of uniform ranks.

    Rank ``r`` in ``{0, ..., M}`` falls in bin ``floor(r * B / (M + 1))``. When ``B`` does not
    divide ``M + 1`` the bins hold unequal numbers of ranks, so the uniform probabilities are
    counted exactly rather than assumed equal.

    Arguments:
        ranks: SBC ranks, shape ``(n, D)``, from :func:`sbc_ranks`.
        num_samples: Number of posterior samples ``M`` the ranks were computed from.
        num_bins: Number of bins ``B`` in ``[2, M + 1]``; default ``n // 10`` (about 10
            expected counts per bin), clipped to that range.

    Returns:
        Counts, shape ``(B, D)``, and uniform bin probabilities, shape ``(B,)``.
    """
    ranks = np.asarray(ranks)
    check_ndim("ranks", ranks, 2, "(n, D)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if ranks.shape[0] < 1 or ranks.shape[1] < 1:
        raise ValueError(f"ranks must hold at least one pair and one parameter, got {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        if not np.all(np.isfinite(ranks)) or np.any(ranks != np.round(ranks)):
            raise ValueError("ranks must be integers (from sbc_ranks)")
        ranks = ranks.astype(np.int64)
    if ranks.min() < 0 or ranks.max() > num_samples:
        raise ValueError(
            f"ranks must lie in [0, num_samples={num_samples}], "
            f"got values in [{ranks.min()}, {ranks.max()}]"
        )
    if num_bins is None:
        num_bins = _default_num_bins(ranks.shape[0], num_samples)
    if not 2 <= num_bins <= num_samples + 1:
        raise ValueError(f"num_bins must lie in [2, num_samples + 1], got {num_bins}")

    dim = ranks.shape[1]
    # Offsetting parameter d by d * B histograms all parameters in one bincount.
    bins = ranks * num_bins // (num_samples + 1) + np.arange(dim) * num_bins
    counts = np.bincount(bins.ravel(), minlength=num_bins * dim).reshape(dim, num_bins).T
    every_rank = np.arange(num_samples + 1) * num_bins // (num_samples + 1)
    probs = np.bincount(every_rank, minlength=num_bins) / (num_samples + 1)
    return counts, probs


def sbc_uniformity_pvalues(
    ranks: np.ndarray, num_samples: int, num_bins: int | None = None
) -> np.ndarray:
    """Chi-square test that the SBC ranks of each parameter are uniform.

    Arguments:
        ranks: SBC ranks, shape ``(n, D)``, from :func:`sbc_ranks`.
        num_samples: Number of posterior samples ``M`` the ranks were computed from.
        num_bins: See :func:`sbc_histogram`; the default aims at 10 expected counts per bin.

    Returns:
        One p-value per parameter, shape ``(D,)``; small values reject uniformity.
    """
    counts, probs = sbc_histogram(ranks, num_samples, num_bins)
    expected = counts.sum(axis=0, keepdims=True) * probs[:, None]
    statistic = np.sum((counts - expected) ** 2 / expected, axis=0)
    return stats.chi2.sf(statistic, df=len(probs) - 1)


def max_coverage_deviation(levels: np.ndarray, coverage: np.ndarray) -> float:
    """Largest absolute distance of an expected-coverage curve from the diagonal.

    Arguments:
        levels: Credibility levels, shape ``(L,)``.
        coverage: Expected coverage at those levels, shape ``(L,)``.
    """
    levels = np.asarray(levels, dtype=float)
    coverage = np.asarray(coverage, dtype=float)
    if levels.shape != coverage.shape or levels.ndim != 1 or levels.size == 0:
        raise ValueError(
            f"levels has shape {levels.shape} but coverage has shape {coverage.shape}: "
            "both need the same non-empty shape (L,)"
        )
    check_finite("levels", levels)
    check_finite("coverage", coverage)
    return float(np.max(np.abs(coverage - levels)))


def marginal_recovery(
    samples: np.ndarray, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How well posteriors recover known parameters, one parameter at a time.

    Arguments:
        samples: Posterior samples at each of ``n`` observations, shape ``(n, M, D)``.
        theta: The parameters that made each observation, shape ``(n, D)``.

    Returns:
        Per parameter, shape ``(D,)`` each: the mean over observations of
        ``(posterior mean - theta) / posterior std`` (bias in posterior widths; near 0 when
        unbiased; infinite where a posterior collapsed to one value other than ``theta``), and
        the fractions of observations whose ``theta`` lies inside the central 68 % and 95 %
        marginal credible intervals (0.68 and 0.95 when calibrated).
    """
    _check_samples_theta(samples, theta)
    offset, std = samples.mean(axis=1) - theta, samples.std(axis=1)
    # A posterior of one value misses by infinitely many of its widths unless it is the truth.
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, offset / std, np.where(offset == 0, 0.0, np.sign(offset) * np.inf))
    inside = {}
    for level in (0.68, 0.95):
        low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=1)
        inside[level] = np.mean((theta >= low) & (theta <= high), axis=0)
    return z.mean(axis=0), inside[0.68], inside[0.95]

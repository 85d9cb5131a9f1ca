"""What the diagnostics share: the checks of their array inputs, the coverage of a set of
credibility ranks, and the classifier (with its standardisation) that C2ST and local C2ST fit."""

from __future__ import annotations

import numpy as np
from sklearn.neural_network import MLPClassifier


def check_finite(name: str, array: np.ndarray, *, allow_neg_inf: bool = False) -> None:
    """Raises ``ValueError`` naming ``name`` and the count if ``array`` holds NaN or inf
    (``-inf`` allowed with ``allow_neg_inf``: a log-density outside the support)."""
    bad = np.isnan(array) | (np.isposinf(array) if allow_neg_inf else np.isinf(array))
    if bad.any():
        kind = "NaN or +inf" if allow_neg_inf else "NaN or inf"
        raise ValueError(f"{name} holds {int(bad.sum())} {kind} entries out of {array.size}")


def check_ndim(name: str, array: np.ndarray, ndim: int, layout: str) -> None:
    """Raises ``ValueError`` naming the expected ``layout`` unless ``array`` has ``ndim`` axes."""
    if array.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {array.shape}")


def check_levels(levels: np.ndarray) -> np.ndarray:
    """Credibility levels as a float array ``(L,)``, each in [0, 1]."""
    levels = np.asarray(levels, dtype=float)
    check_ndim("levels", levels, 1, "(L,)")
    if levels.size == 0 or not np.all((levels >= 0) & (levels <= 1)):
        raise ValueError(f"levels must be a non-empty array in [0, 1], got {levels}")
    return levels


def credibility(inside: np.ndarray) -> np.ndarray:
    """Each pair's credibility rank from ``inside`` (n, M), whether each of its ``M`` draws lies
    inside the region the truth bounds (denser, closer): ``(k + 1/2) / (M + 1)`` for ``k``
    draws inside, (n,).

    For an exact posterior ``k`` is uniform on ``{0, ..., M}``; ``k / M`` would put the
    coverage at level ``l`` at ``ceil(l M) / (M + 1)``, below the diagonal by up to
    ``l / (M + 1)`` (0.08 with 10 draws) and read as over-confidence, where the mid-rank is
    within ``1 / (2 (M + 1))`` of it either way."""
    return (inside.sum(axis=1) + 0.5) / (inside.shape[1] + 1)


def coverage_at(alpha: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Fraction of the pairs' credibility ranks ``alpha`` (n,) below each level: (L,)."""
    return np.mean(alpha[:, None] < levels[None, :], axis=0)


def zscore(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the rows of ``reference`` (N, F), each (F,); a constant
    feature gets scale 1 (dividing by zero would break the test, any scale keeps it valid)."""
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def mlp_classifier(
    hidden_units: int, seed: int, *, early_stopping: bool, patience: int = 10
) -> MLPClassifier:
    """The two-layer ReLU network both C2ST tests fit, as in sbibm's C2ST (Adam, up to 10^4
    iterations; with early stopping, on a 10 % validation split, after ``patience`` epochs
    without a better held-out accuracy)."""
    return MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(hidden_units, hidden_units),
        max_iter=10000,
        solver="adam",
        early_stopping=early_stopping,
        validation_fraction=0.1,
        n_iter_no_change=patience,
        random_state=seed,
    )

"""How many posterior predictive draws the predictive checks need: the one rule that both the
workflow (before any job) and :mod:`pipeline.diagnostics.predictive` apply.

Standard library only: Snakemake imports it at every start, jobs included, where the
diagnostics' scikit-learn would add seconds.
"""

from __future__ import annotations

# The smallest p-value of S draws is 1 / (S + 1); S >= 19 lets it reach 0.05, and 20 rounds up.
MIN_DRAWS = 20


def min_predictive_draws(features: int) -> int:
    """Draws per observation that a check of ``features`` summary values needs: at least
    :data:`MIN_DRAWS`, and more than ``features`` so that their covariance has full rank."""
    return max(MIN_DRAWS, features + 1)

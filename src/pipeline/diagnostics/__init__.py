"""Validation diagnostics: calibration (coverage, SBC), accuracy against a reference (C2ST),
local accuracy without one (L-C2ST) and posterior predictive checks."""

from pipeline.diagnostics.c2st import c2st, c2st_batched, c2st_sample_size
from pipeline.diagnostics.coverage import (
    DEFAULT_LEVELS,
    hpd_coverage,
    marginal_recovery,
    max_coverage_deviation,
    sbc_histogram,
    sbc_ranks,
    sbc_uniformity_pvalues,
    tarp_coverage,
)
from pipeline.diagnostics.local_c2st import LocalC2ST, local_c2st
from pipeline.diagnostics.misspecification import (
    posterior_sharpness,
    surprise_pvalues,
    typicality_pvalues,
)
from pipeline.diagnostics.predictive import (
    predictive_coverage,
    predictive_intervals,
    predictive_pvalues,
)

__all__ = [
    "DEFAULT_LEVELS",
    "LocalC2ST",
    "c2st",
    "c2st_batched",
    "c2st_sample_size",
    "hpd_coverage",
    "local_c2st",
    "marginal_recovery",
    "max_coverage_deviation",
    "posterior_sharpness",
    "predictive_coverage",
    "predictive_intervals",
    "predictive_pvalues",
    "sbc_histogram",
    "sbc_ranks",
    "sbc_uniformity_pvalues",
    "surprise_pvalues",
    "tarp_coverage",
    "typicality_pvalues",
]

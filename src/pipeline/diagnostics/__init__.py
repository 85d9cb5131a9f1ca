"""Validation diagnostics: calibration (coverage, SBC) and accuracy against a reference (C2ST)."""

from pipeline.diagnostics.c2st import c2st, c2st_batched
from pipeline.diagnostics.coverage import (
    DEFAULT_LEVELS,
    hpd_coverage,
    max_coverage_deviation,
    sbc_histogram,
    sbc_ranks,
    sbc_uniformity_pvalues,
    tarp_coverage,
)

__all__ = [
    "DEFAULT_LEVELS",
    "c2st",
    "c2st_batched",
    "hpd_coverage",
    "max_coverage_deviation",
    "sbc_histogram",
    "sbc_ranks",
    "sbc_uniformity_pvalues",
    "tarp_coverage",
]

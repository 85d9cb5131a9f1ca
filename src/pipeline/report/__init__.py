"""The experiment report: one self-contained HTML page on calibration, training and provenance.

Example:
    >>> html = build_report(  # doctest: +SKIP
    ...     Path("results/default"), ["two_moons"], config=config,
    ...     thresholds=Thresholds(c2st_max=0.6, coverage_max_deviation=0.1), title="default",
    ... )
    >>> write_report(html, Path("results/default/report.html"))  # doctest: +SKIP
"""

from pipeline.report.build import Thresholds, build_report, write_report
from pipeline.report.results import ResultsError

__all__ = ["ResultsError", "Thresholds", "build_report", "write_report"]

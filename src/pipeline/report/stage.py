"""The report stage: the experiment's page and its summary (for the index), from one reading of
every task's results."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.options import ReportOptions
from pipeline.report.build import Thresholds, load_results, render_report, write_report
from pipeline.report.index import experiment_summary, write_summary

log = logging.getLogger(__name__)


def report_experiment(
    experiment_dir: Path,
    tasks: list[str],
    options: ReportOptions,
    out: Path,
    *,
    config: dict[str, Any],
    specs: Sequence[str] = (),
    budgets: Sequence[int] = (),
    rounds: Sequence[int] = (),
    summary: Path | None = None,
) -> None:
    """The report stage: ``out`` (the page) and, if given, ``summary`` (the verdicts, for the
    index), both from one reading of the tasks' results (see :func:`load_results`)."""
    thresholds = Thresholds(
        c2st_max=options.c2st_max,
        coverage_max_deviation=options.coverage_max_deviation,
        misspecification_level=options.misspecification_level,
    )
    # A report that fails must leave no verdict of earlier results for the index to show.
    for stale in (out, summary):
        if stale is not None and Path(stale).exists():
            Path(stale).unlink()
            log.info("removed %s, the report of earlier results", stale)
    results = load_results(experiment_dir, tasks, budgets, specs, rounds)
    settings = {"config": config, "thresholds": thresholds, "title": options.title}
    html = render_report(experiment_dir, results, **settings)
    if summary is not None:
        write_summary(experiment_summary(experiment_dir, results, **settings), summary)
    write_report(html, out)
    log.info("wrote %s (%d kB)", out, len(html) // 1024)

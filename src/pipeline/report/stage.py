"""The report stage: the experiment's page and its summary (for the index), from one reading of
every task's results."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import check_new
from pipeline.options import ReportOptions
from pipeline.report.build import Thresholds, load_results, render_report, write_report
from pipeline.report.index import check_summary, experiment_summary, write_summary

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
    overwrite: bool = False,
) -> None:
    """The report stage: ``out`` (the page) and, if given, ``summary`` (the verdicts, for the
    index), both from one reading of the tasks' results (see :func:`load_results`).

    Raises:
        ValueError: If ``out`` or ``summary`` names an existing file that is not a report page
            or summary (kept).
        FileExistsError: If they exist and ``overwrite`` is false (kept).
    """
    thresholds = Thresholds(
        c2st_max=options.c2st_max,
        coverage_max_deviation=options.coverage_max_deviation,
        misspecification_level=options.misspecification_level,
    )
    # A report that fails must leave no verdict of earlier results for the index to show; but
    # only a page or summary is removed, never a file a mistyped path names.
    named = ((out, "report page"), (summary, "summary"))
    stale = [
        (Path(path), kind) for path, kind in named if path is not None and Path(path).exists()
    ]
    for path, kind in stale:
        check_replaceable(path, kind)
    for path, _ in stale:
        check_new(path, overwrite=overwrite)
    for path, kind in stale:
        path.unlink()
        log.info("removed %s, the %s of earlier results", path, kind)
    results = load_results(experiment_dir, tasks, budgets, specs, rounds)
    settings = {"config": config, "thresholds": thresholds, "title": options.title}
    html = render_report(experiment_dir, results, **settings)
    if summary is not None:
        write_summary(experiment_summary(experiment_dir, results, **settings), summary)
    write_report(html, out)
    log.info("wrote %s (%d kB)", out, len(html) // 1024)


def check_replaceable(path: Path, kind: str) -> None:
    """Raises unless ``path`` is a report page (HTML) or a summary (its JSON), which the stage
    replaces: any other file at the path was named by mistake and is kept."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
        if kind == "summary":
            # A summary is small JSON: a large file named by mistake is not read whole.
            if head.lstrip().startswith(b"{") and path.stat().st_size < 2**24:
                check_summary(json.loads(path.read_text()))
                return
        elif head.lstrip().lower().startswith(b"<!doctype html"):
            return
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    raise ValueError(
        f"{path} is not a {kind} (it would be replaced): name the {kind}'s path, e.g. "
        "results/EXPERIMENT/report.html, summary.json or results/index.html"
    )

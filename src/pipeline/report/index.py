"""One page over every experiment in a results folder, from each experiment's ``summary.json``.

``pipeline report`` writes the summary beside ``report.html``: the verdict of every check of
every task, with the experiment's title, time and config digest. The index reads only those
small files, so it stays quick however large the experiments are, and an experiment whose
summary is unreadable is listed as such instead of hiding the others.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.provenance import config_digest
from pipeline.report.build import (
    Thresholds,
    evaluate_checks,
    flagged_observations,
    template_environment,
    verdict,
    write_report,
)
from pipeline.report.results import TaskResults

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def experiment_summary(
    experiment_dir: Path,
    results: list[TaskResults],
    *,
    config: dict[str, Any],
    thresholds: Thresholds,
    title: str,
) -> dict[str, Any]:
    """Verdicts of every check of every task of one experiment, as JSON-ready data.

    ``results`` are the tasks' results as :func:`pipeline.report.build.load_results` read them.
    """
    rows = []
    for task in results:
        checks = evaluate_checks(task.validation, thresholds)
        flagged = flagged_observations(task.validation, thresholds)
        rows.append(
            {
                "name": task.name,
                "verdict": verdict(checks, flagged),
                "flagged_observations": flagged,
                "checks": [
                    {
                        "name": c.name,
                        "value": c.value,
                        "threshold": c.threshold,
                        "status": c.status,
                        "left_out": c.left_out,
                    }
                    for c in checks
                ],
            }
        )
    return {
        "experiment": Path(experiment_dir).name,
        "title": title,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config_digest": config_digest(config),
        "verdict": next(
            (v for v in ("FAIL", "FLAGGED") if any(row["verdict"] == v for row in rows)), "PASS"
        ),
        "tasks": rows,
    }


def write_summary(summary: dict[str, Any], out: Path) -> None:
    """Writes ``summary`` as JSON, atomically."""
    write_report(json.dumps(summary, indent=2) + "\n", out)


def read_summaries(results_dir: Path) -> list[dict[str, Any]]:
    """Each ``results_dir/*/summary.json``, newest first; unreadable or malformed ones carry
    ``error``. An experiment is named (and linked) by its folder, never by the file's text."""
    summaries = []
    for path in sorted(Path(results_dir).glob(f"*/{SUMMARY}")):
        try:
            summary = json.loads(path.read_text())
            check_summary(summary)
            for task in summary["tasks"]:
                for check in task["checks"]:
                    check.setdefault("left_out", 0.0)  # summaries written before it was
        except (OSError, ValueError) as error:
            log.warning("skipping %s: %s", path, error)
            summary = {"error": f"unreadable {SUMMARY}: {error}"}
        summary["experiment"] = path.parent.name
        summary["report_exists"] = (path.parent / "report.html").exists()
        summary["changed_since"] = changed_since(path, summary.get("tasks", []))
        summaries.append(summary)
    return sorted(summaries, key=lambda s: str(s.get("created", "")), reverse=True)


# What an experiment folder holds besides its tasks' results: the stages' logs and timings and
# the report itself, none of which the verdict is about.
NOT_RESULTS = ("logs", "benchmarks")


# The results a verdict rests on, per task folder: gone, the verdict is of files since removed.
VERDICT_INPUTS = ("validation/metrics.json", "model/posterior.json")
# Written into an experiment's folder by a run that failed (the workflow's onerror handler).
FAILED_RUN = "run-failed.txt"


def changed_since(summary_path: Path, tasks: list[dict[str, Any]]) -> str | None:
    """What changed in the experiment after its ``summary.json`` was written (``tasks``: its
    tasks), as text, or None: a run that failed since (:data:`FAILED_RUN`, which also covers
    the outputs Snakemake removed before rerunning their jobs), a result the verdict rests on
    removed, or a result written since (a run still going, or killed). Then the verdict and
    the report are of results since replaced."""
    folder, written = summary_path.parent, summary_path.stat().st_mtime_ns
    failed = folder / FAILED_RUN
    if failed.exists() and failed.stat().st_mtime_ns > written:
        return f"a later run failed ({FAILED_RUN})"
    for task in tasks:
        for name in VERDICT_INPUTS:
            if not (folder / str(task.get("name")) / name).exists():
                return f"{task.get('name')}/{name} removed"
    for path in sorted(folder.iterdir()):
        if path.name in NOT_RESULTS or not path.is_dir():
            continue
        if (written_since := _written_since(path, written)) is not None:
            return f"{written_since.relative_to(folder)} written"
    return None


def _written_since(folder: Path, time_ns: int) -> Path | None:
    """A file under ``folder`` modified after ``time_ns``, skipping simulation shards and
    training checkpoints (thousands of files that a later merged file or model stands for)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None  # removed while we looked: a job is running
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.name.endswith((".shards", ".checkpoints")):
                    continue
                if (found := _written_since(Path(entry.path), time_ns)) is not None:
                    return found
            elif entry.stat().st_mtime_ns > time_ns:
                return Path(entry.path)
        except OSError:
            continue
    return None


def check_summary(summary: Any) -> None:
    """Raises ValueError unless ``summary`` has the fields and types :func:`experiment_summary`
    writes (the index renders nothing else)."""

    def require(mapping: Any, key: str, kinds: tuple[type, ...], where: str) -> Any:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise ValueError(f"{where}{key!r} missing or of the wrong type")
        return value

    number = (int, float, type(None))
    for key in ("title", "created", "config_digest", "verdict"):
        require(summary, key, (str,), "")
    for i, task in enumerate(require(summary, "tasks", (list,), "")):
        require(task, "name", (str,), f"tasks[{i}].")
        require(task, "verdict", (str,), f"tasks[{i}].")
        for j, check in enumerate(require(task, "checks", (list,), f"tasks[{i}].")):
            where = f"tasks[{i}].checks[{j}]."
            require(check, "name", (str,), where)
            require(check, "status", (str,), where)
            require(check, "value", number, where)
            require(check, "threshold", (*number, str), where)
            if "left_out" in check:  # summaries of earlier versions have none
                require(check, "left_out", (int, float), where)


def build_index(results_dir: Path) -> str:
    """The HTML page listing every experiment under ``results_dir`` with its verdicts."""
    summaries = read_summaries(results_dir)
    return (
        template_environment()
        .get_template("index.html")
        .render(
            results_dir=str(results_dir),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            experiments=summaries,
        )
    )

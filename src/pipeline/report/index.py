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
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.provenance import CONTENT_FINGERPRINT_BYTES, config_digest, file_digest
from pipeline.report.build import (
    Thresholds,
    evaluate_checks,
    flagged_observations,
    misspecification_power,
    template_environment,
    truths_missed,
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
    rows, names = [], [task.name for task in results]
    for task in results:
        checks = evaluate_checks(task.validation, thresholds)
        flagged = flagged_observations(task.validation, thresholds)
        missed = truths_missed(task.validation, thresholds)
        rows.append(
            {
                "name": task.name,
                "verdict": verdict(checks, flagged, truths_missed=missed),
                "flagged_observations": flagged,
                "truths_missed": missed,
                # Where the tests cannot flag one observation alone, PASS does not say the
                # observations are like the simulations: the index says so as the page does.
                "misspecification_power": misspecification_power(task.validation, thresholds),
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
    sizes_and_times, digests = result_files(Path(experiment_dir), names)
    return {
        "experiment": Path(experiment_dir).name,
        "title": title,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config_digest": config_digest(config),
        "verdict": next(
            (v for v in ("FAIL", "FLAGGED") if any(row["verdict"] == v for row in rows)), "PASS"
        ),
        "tasks": rows,
        # Sizes and times under their own key, digests apart: an index of an earlier version
        # compares the first two as they were.
        "results": sizes_and_times,
        "digests": digests,
    }


def result_files(
    experiment_dir: Path, tasks: list[str]
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The files the verdict rests on: each task folder's, by path within the experiment
    folder, with their size and modification time, and, up to
    :data:`~pipeline.provenance.CONTENT_FINGERPRINT_BYTES`, their SHA-256 (a copy without the
    times, ``cp -r`` or a download, holds the same files); shards and checkpoints, which a
    merged file or a model stands for, and a dry run's stamps left out."""
    sizes_and_times, digests = {}, {}
    for task in tasks:
        for path in _files(Path(experiment_dir) / task):
            status = path.stat()
            name = str(path.relative_to(experiment_dir))
            sizes_and_times[name] = [status.st_size, status.st_mtime_ns]
            if status.st_size <= CONTENT_FINGERPRINT_BYTES:
                digests[name] = file_digest(path)
    return dict(sorted(sizes_and_times.items())), dict(sorted(digests.items()))


def _files(folder: Path) -> list[Path]:
    """Files under ``folder``, but not in ``*.shards``, ``*.checkpoints`` or ``dry-run``
    folders."""
    files = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return files
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not entry.name.endswith((".shards", ".checkpoints", "dry-run")):
                files += _files(Path(entry.path))
        elif entry.is_file():
            files.append(Path(entry.path))
    return files


# Beside an experiment's summary while a run of it goes: a run killed outright (a time limit,
# the OOM killer) leaves it, and the index then says that the verdict may be of older results.
RUN_MARKER = "unfinished-run.json"


def mark_run(experiment_dir: Path, running: bool) -> None:
    """Marks ``experiment_dir`` as having a run under way (when, where, which process), or
    removes the mark."""
    marker = Path(experiment_dir) / RUN_MARKER
    if not running:
        marker.unlink(missing_ok=True)
        return
    run = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(marker, run)


def unfinished_run(summary_path: Path) -> dict[str, Any] | None:
    """The mark of a run started after ``summary_path`` was written that has not ended (still
    going, or killed), or None."""
    marker = summary_path.parent / RUN_MARKER
    try:
        if marker.stat().st_mtime_ns <= summary_path.stat().st_mtime_ns:
            return None  # the verdict is of that run's results
        run = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else {"started": "unknown"}


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
        summary["changed_since"] = changed_since(path, summary)
        summary["unfinished_run"] = unfinished_run(path)
        summaries.append(summary)
    return sorted(summaries, key=lambda s: str(s.get("created", "")), reverse=True)


def changed_since(summary_path: Path, summary: dict[str, Any]) -> str | None:
    """What changed of the results ``summary`` (its file: ``summary_path``) rests on, as text,
    or None: a file removed (Snakemake removes a job's outputs before rerunning it) or
    changed (size or time) since, by a run that failed, is still going or was killed. Then the
    verdict and the report are of results since replaced. A summary written before the files
    were recorded is judged by any file of its tasks written after it."""
    folder = summary_path.parent
    recorded = summary.get("results")
    if not isinstance(recorded, dict):
        written = summary_path.stat().st_mtime_ns
        for task in summary.get("tasks", []):
            for path in _files(folder / str(task.get("name"))):
                try:
                    if path.stat().st_mtime_ns > written:
                        return f"{path.relative_to(folder)} written"
                except OSError:
                    continue
        return None
    digests = summary.get("digests") if isinstance(summary.get("digests"), dict) else {}
    for name, stamp in recorded.items():
        try:
            status = (folder / name).stat()
        except OSError:
            return f"{name} removed"
        if [status.st_size, status.st_mtime_ns] == stamp:
            continue
        digest = digests.get(name)  # summaries of earlier versions have none
        if status.st_size != stamp[0] or digest is None or file_digest(folder / name) != digest:
            return f"{name} changed"
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

"""Turns an experiment's per-task results into one self-contained, offline HTML page."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import binom

from pipeline import atomic, plots
from pipeline.metrics import ReferenceInfo, ValidationMetrics
from pipeline.provenance import config_digest
from pipeline.report.results import TaskResults, TrainingCurve, load_task
from pipeline.search.records import describe_range
from pipeline.search.select import SearchChoice

NO_REFERENCE = "n/a — no reference posterior"

# Observations whose posterior estimates the page tabulates (all are in estimates.csv): a mock
# study's hundreds would bury the checks below them.
ESTIMATES_SHOWN = 20


@dataclass(frozen=True)
class Thresholds:
    """Limits a task must stay within to pass.

    Arguments:
        c2st_max: Largest C2ST accuracy over observations (0.5 means indistinguishable).
        coverage_max_deviation: Largest absolute gap between credibility level and the
            empirical coverage, for TARP and HPD coverage alike.
        misspecification_level: Level of the misspecification tests over a task's
            observations together: observations are flagged as not consistent with the
            simulations by the Benjamini-Hochberg procedure at this level.
    """

    c2st_max: float
    coverage_max_deviation: float
    misspecification_level: float = 0.05

    def __post_init__(self) -> None:
        for name in ("c2st_max", "coverage_max_deviation", "misspecification_level"):
            value = getattr(self, name)
            # Written as a negated range test so that NaN is refused too.
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Thresholds.{name} must lie in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Check:
    """One diagnostic of one task against its threshold; ``value=None`` when not applicable,
    and ``reason`` then says why."""

    name: str
    value: float | None
    threshold: float
    reason: str = NO_REFERENCE
    # The share of test simulations the curve leaves out. Each moves a coverage curve by at most
    # 1/N where it falls, and those left out are the hard cases (a posterior the region barely
    # holds, chains stuck between modes), so the check passes only if it would with all of them
    # against it.
    left_out: float = 0.0

    @property
    def passed(self) -> bool | None:
        # A NaN statistic fails: the comparison is False, which is the safe answer.
        return None if self.value is None else self.value + self.left_out <= self.threshold

    @property
    def status(self) -> str:
        return {None: self.reason, True: "PASS", False: "FAIL"}[self.passed]


def evaluate_checks(validation: ValidationMetrics, thresholds: Thresholds) -> list[Check]:
    """C2ST, TARP, HPD and predictive-coverage checks of one ``validation/metrics.json``."""
    c2st = validation.c2st
    coverage = validation.coverage
    skipped = validation.skipped
    c2st_reason = "n/a — " + skipped["c2st"] if "c2st" in skipped else NO_REFERENCE
    total = validation.num_test + validation.num_left_out
    left_out = validation.num_left_out / total
    # The predictive curve also leaves out the pairs whose replicates the simulator failed.
    predictive_left_out = left_out + coverage.predictive_num_excluded / total
    return [
        Check("C2ST", None if c2st is None else c2st.max, thresholds.c2st_max, c2st_reason),
        Check(
            "TARP",
            coverage.tarp_max_deviation,
            thresholds.coverage_max_deviation,
            left_out=left_out,
        ),
        Check(
            "HPD",
            coverage.hpd_max_deviation,
            thresholds.coverage_max_deviation,
            left_out=left_out,
        ),
        Check(
            "Predictive",
            coverage.predictive_max_deviation,
            thresholds.coverage_max_deviation,
            "n/a — no simulator",
            predictive_left_out,
        ),
    ]


def verdict(
    checks: list[Check], flagged: Sequence[int] = (), *, truths_missed: bool = False
) -> str:
    """``FAIL`` when an applicable check fails; else ``FLAGGED`` when an observation is not
    consistent with the simulations, or mocks' truths are not recovered (the estimator is
    calibrated, but its posteriors there are not to be trusted), else ``PASS``."""
    if any(check.passed is False for check in checks):
        return "FAIL"
    return "FLAGGED" if flagged or truths_missed else "PASS"


def recovery_pvalue(validation: ValidationMetrics, thresholds: Thresholds) -> float | None:
    """At mock observations of another forward model, whether the truths fall inside the
    posteriors' central 68 % and 95 % intervals as often as those levels, within the coverage
    checks' tolerance: for each parameter and level the binomial p-value of a count as far as
    this outside ``level +- coverage_max_deviation`` (one-sided towards the nearer edge, twice
    that for either side), the smallest times their number (Bonferroni), at most 1; None at
    other observations or without truths.

    The observations' truths are independent draws of the prior, so each count is binomial; a
    posterior whose coverage there is within the tolerance the test set's checks allow is then
    flagged with at most the misspecification level's probability. The test set's checks say
    nothing of data from another model; this is what a mock study asks."""
    recovery = validation.recovery
    if recovery is None or validation.observations.mock_of is None:
        return None
    n, tolerance = recovery.num_observations, thresholds.coverage_max_deviation
    pvalues = []
    for level, fractions in ((0.68, recovery.coverage_68), (0.95, recovery.coverage_95)):
        for fraction in fractions.values():
            inside = round(fraction * n)
            below = binom.cdf(inside, n, max(level - tolerance, 0.0))
            above = binom.sf(inside - 1, n, min(level + tolerance, 1.0))
            pvalues.append(min(1.0, 2 * min(below, above)))
    return float(min(1.0, min(pvalues) * len(pvalues)))


def truths_missed(validation: ValidationMetrics, thresholds: Thresholds) -> bool:
    """Whether mocks' truths are recovered less or more often than the intervals claim, beyond
    the coverage tolerance, at the misspecification level (:func:`recovery_pvalue`)."""
    pvalue = recovery_pvalue(validation, thresholds)
    return pvalue is not None and pvalue <= thresholds.misspecification_level


def flagged_observations(validation: ValidationMetrics, thresholds: Thresholds) -> list[int]:
    """Observations not consistent with the simulations at the thresholds' level, over the
    task's observations together (see :meth:`pipeline.metrics.Misspecification.flagged`)."""
    if validation.misspecification is None:
        return []
    return validation.misspecification.flagged(thresholds.misspecification_level)


def training_curve_figure(curve: TrainingCurve) -> Figure:
    """Training and validation loss per epoch."""
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(curve.epoch_train, curve.train_loss, marker=".", label="train")
    axes.plot(curve.epoch_val, curve.val_loss, marker=".", label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def figure_png(figure: Figure) -> bytes:
    """Renders ``figure`` to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    """Embeds PNG bytes in a ``data:`` URI, so the page needs no files beside it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def load_results(
    experiment_dir: Path,
    tasks: list[str],
    budgets: Sequence[int] = (),
    specs: Sequence[str] = (),
    rounds: Sequence[int] = (),
) -> list[TaskResults]:
    """Every task's results, in ``tasks`` order, read once for the page and the summary.

    ``budgets`` are the budget study's simulation counts; each task's C2ST at each is read.
    ``specs`` (one per task, optional) are the task specs the outputs record, where they differ
    from the folder names (a user's tasks, by import path or task file). ``rounds`` (one per
    task, optional): how many sequential rounds made each task's model (0: amortized).

    Raises:
        FileNotFoundError: A task folder, result file or figure is missing.
        ValueError: A result file is malformed, or ``tasks`` is empty or repeats a name.
    """
    if not tasks:
        raise ValueError("no tasks to report")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat a name: {tasks}")
    if specs and len(specs) != len(tasks):
        raise ValueError(f"{len(specs)} task specs for {len(tasks)} tasks")
    if rounds and len(rounds) != len(tasks):
        raise ValueError(f"{len(rounds)} round counts for {len(tasks)} tasks")
    specs = list(specs) or [None] * len(tasks)
    rounds = list(rounds) or [0] * len(tasks)
    return [
        load_task(Path(experiment_dir), task, budgets, spec, count)
        for task, spec, count in zip(tasks, specs, rounds, strict=True)
    ]


def build_report(
    experiment_dir: Path,
    tasks: list[str],
    *,
    config: dict[str, Any],
    thresholds: Thresholds,
    title: str,
    budgets: Sequence[int] = (),
) -> str:
    """One self-contained HTML page on an experiment's tasks (see :func:`render_report`).

    Raises what :func:`load_results` raises.
    """
    results = load_results(experiment_dir, tasks, budgets)
    return render_report(
        experiment_dir, results, config=config, thresholds=thresholds, title=title
    )


def render_report(
    experiment_dir: Path,
    results: list[TaskResults],
    *,
    config: dict[str, Any],
    thresholds: Thresholds,
    title: str,
) -> str:
    """The page on ``results``.

    Arguments:
        experiment_dir: ``results/{experiment}``, holding one folder per task.
        results: The tasks' results (:func:`load_results`), in page order.
        config: The experiment's config, shown verbatim in the provenance section.
        thresholds: Limits that decide each check's PASS or FAIL.
        title: Page title.
    """
    anchors = task_anchors([r.name for r in results])
    context = {
        "title": title,
        "experiment": Path(experiment_dir).name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "thresholds": thresholds,
        "no_reference": NO_REFERENCE,
        "tasks": [task_context(r, anchors[r.name], thresholds) for r in results],
        "provenance": provenance_context(results, config),
        "stage_times": stage_times(Path(experiment_dir)),
        "estimates_shown": ESTIMATES_SHOWN,
        "uninformed": UNINFORMED,
    }
    return template_environment().get_template("report.html").render(context)


# A posterior whose spread is this much of the prior's in a parameter learnt almost nothing of
# it from x (a uniform prior's sixth of a width: 0.9 leaves it 19 % narrower in variance).
UNINFORMED = 0.9


def uninformed_parameters(validation: ValidationMetrics) -> list[str]:
    """Parameters whose posteriors are, on average over the observations, nearly as wide as the
    prior (:data:`UNINFORMED`)."""
    ratio = validation.widths.over_prior if validation.widths else None
    return [] if ratio is None else [k for k, v in ratio.mean.items() if v >= UNINFORMED]


def task_context(results: TaskResults, anchor: str, thresholds: Thresholds) -> dict[str, Any]:
    """What the page shows of one task."""
    checks = evaluate_checks(results.validation, thresholds)
    flagged = flagged_observations(results.validation, thresholds)
    figures = dict(results.figures, training=figure_png(training_curve_figure(results.curve)))
    if results.budgets:
        budget_figure = plots.plot_c2st_budget(
            np.array([score.budget for score in results.budgets]),
            np.array([score.c2st.per_observation for score in results.budgets]),
            threshold=thresholds.c2st_max,
        )
        figures["c2st_budget"] = figure_png(budget_figure)
    coverage = results.validation.coverage
    local = results.validation.local_c2st
    return {
        "name": results.name,
        "anchor": anchor,
        "checks": checks,
        "verdict": verdict(
            checks, flagged, truths_missed=truths_missed(results.validation, thresholds)
        ),
        "flagged": flagged,
        "recovery_pvalue": recovery_pvalue(results.validation, thresholds),
        "uninformed": uninformed_parameters(results.validation),
        "consistency_rows": consistency_rows(results.validation, flagged),
        "consistency_text": consistency_text(results.validation, flagged),
        "power": misspecification_power(results.validation, thresholds),
        "posterior": results.posterior,
        "validation": results.validation,
        "coverage_rows": list(
            zip(
                coverage.levels,
                coverage.tarp,
                coverage.hpd,
                coverage.predictive or [None] * len(coverage.levels),
                strict=True,
            )
        ),
        "local_c2st_rows": list(
            zip(local.statistic, local.pvalue, local.dispersion_correlation, strict=True)
        ),
        "figures": {key: png_data_uri(png) for key, png in figures.items()},
        "budgets": results.budgets,
        "reference": reference_summary(results.validation.reference),
        "search": search_context(results.search),
        "rounds": results.rounds,
    }


def search_context(choice: SearchChoice | None) -> dict[str, Any] | None:
    """The search that chose a task's training options: its ranges, trials and figure."""
    if choice is None:
        return None
    space = choice.search["space"]
    complete = [row for row in choice.trials if row.loss is not None and math.isfinite(row.loss)]
    figure = plots.plot_search(
        {name: [row.options[name] for row in complete] for name in space},
        np.array([row.loss for row in complete]),
        np.array([row.coverage_max_deviation for row in complete]),
        chosen=[row.trial for row in complete].index(choice.chosen),
        log_scale=[name for name, spec in space.items() if spec.get("log")],
    )
    return {
        "choice": choice,
        "ranges": {name: describe_range(spec) for name, spec in space.items()},
        "num_failed": len(choice.trials) - len(complete),
        "train_seconds": sum(row.train_seconds or 0.0 for row in choice.trials),
        "figure": png_data_uri(figure_png(figure)),
    }


def consistency_rows(validation: ValidationMetrics, flagged: list[int]) -> list[dict[str, Any]]:
    """One row per observation: its misspecification p-values and whether it is flagged."""
    tests = validation.misspecification
    if tests is None:
        return []
    typicality = tests.typicality or [None] * len(tests.pvalue)
    return [
        {"typicality": t, "surprise": s, "pvalue": p, "flagged": i in flagged}
        for i, (t, s, p) in enumerate(zip(typicality, tests.surprise, tests.pvalue, strict=True))
    ]


def misspecification_power(
    validation: ValidationMetrics, thresholds: Thresholds
) -> dict[str, int] | None:
    """What the misspecification tests can flag with this test set: ``fewest`` observations
    together (1: any one alone), and the ``simulations`` that would let one be flagged alone;
    None without the tests."""
    tests = validation.misspecification
    if tests is None:
        return None
    level, n = thresholds.misspecification_level, len(tests.pvalue)
    fewest = tests.fewest_flaggable(level)
    text = (
        f"none flagged; {tests.num_simulations} test simulations cannot flag any of {n}"
        if fewest > n
        else f"none flagged; {tests.num_simulations} test simulations cannot flag fewer than "
        f"{fewest} of {n}"
    )
    return {"fewest": fewest, "simulations": tests.simulations_to_flag_one(level), "text": text}


def consistency_text(validation: ValidationMetrics, flagged: list[int]) -> str:
    """The summary table's cell on the flagged observations: each with its p-value when there
    are a few, else their count and the first ones."""
    if validation.misspecification is None:
        return "not tested"
    pvalues = validation.misspecification.pvalue
    if len(flagged) <= 3:
        return "not: " + ", ".join(
            f"observation {i} (p = {format_number(pvalues[i], 2)})" for i in flagged
        )
    first = ", ".join(map(str, flagged[:5]))
    return f"not: {len(flagged)} of {len(pvalues)} (observations {first}, …)"


def reference_summary(info: ReferenceInfo | None) -> dict[str, Any] | None:
    """How the reference was drawn and its worst convergence figures over the observations
    (None where the observations have no reference)."""
    if info is None:
        return None
    rows = info.diagnostics

    def worst(key: str, pick: Any) -> float | None:
        values = [row[key] for row in rows if isinstance(row.get(key), int | float)]
        return pick(values) if values else None

    return {
        "method": info.method,
        "rhat_max": worst("rhat_max", max),
        "ess_bulk_min": worst("ess_bulk_min", min),
        "seconds": worst("seconds", max),
    }


def task_anchors(tasks: list[str]) -> dict[str, str]:
    """HTML ids for the task sections: readable, unique, and free of characters ids forbid."""
    anchors: dict[str, str] = {}
    for task in tasks:
        anchor = "task-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", task).strip("-") or "unnamed")
        while anchor in anchors.values():
            anchor += "-"
        anchors[task] = anchor
    return anchors


def provenance_context(results: list[TaskResults], config: dict[str, Any]) -> dict[str, Any]:
    """Provenance of the first task, the experiment's digest, and a note if code differs.

    Each task's model digests its own training options and data, so those digests differ by
    design; they are listed per task. A differing code revision means the tasks were trained by
    different code, which the reader should know.
    """
    first = results[0].posterior["provenance"]
    disagreements = {}
    revisions = {r.name: r.posterior["provenance"]["code_revision"] for r in results}
    if len(set(revisions.values())) > 1:
        disagreements["code_revision"] = revisions
    return {
        "hardware": first.get("hardware", "not recorded"),
        "source_task": results[0].name,
        "config_yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
        "disagreements": disagreements,
        "model_digests": {r.name: r.posterior["provenance"]["config_digest"] for r in results},
        **first,
        "config_digest": config_digest(config),
    }


STAGES = ("import", "simulate", "observe", "search", "rounds", "train", "sample", "validate")


def stage_times(experiment_dir: Path) -> list[dict[str, Any]]:
    """Wall time of each job, from the benchmark files Snakemake writes (none by hand).

    ``EXPERIMENT/benchmarks/STAGE/JOB.tsv``, or ``STAGE/TASK/JOB.tsv`` for the jobs of rounds
    and searches (job ``TASK/JOB``): a header and one row whose first column is seconds.
    Unreadable files are skipped: run times are information, not results.
    """
    root = experiment_dir / "benchmarks"
    rows = []
    for path in root.glob("*/**/*.tsv"):
        try:
            seconds = float(path.read_text().splitlines()[1].split("\t")[0])
        except (OSError, IndexError, ValueError):
            continue
        stage, *job = path.relative_to(root).with_suffix("").parts
        order = STAGES.index(stage) if stage in STAGES else len(STAGES)
        rows.append({"stage": stage, "job": "/".join(job), "seconds": seconds, "order": order})
    return sorted(rows, key=lambda row: (row["order"], row["stage"], natural_key(row["job"])))


def natural_key(text: str) -> list[Any]:
    """Sorts ``round-2`` before ``round-10``: digit runs compare as numbers (``re.split``
    with a group puts them at the odd places, so like compares with like)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def format_number(value: float, digits: int = 4) -> str:
    """A float with ``digits`` significant digits; NaN and infinities spelled out."""
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def format_against(value: float, threshold: float, digits: int = 4) -> str:
    """``value`` as :func:`format_number` writes it, with more digits where it would read as
    its ``threshold`` but is not (a C2ST of 0.60005 failing 0.6 read "FAIL (0.6)")."""
    text = format_number(value, digits)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        return text  # a summary of another version may hold none
    while (
        digits < 12
        and math.isfinite(value)
        and value != threshold
        and text == format_number(threshold, digits)
    ):
        digits += 1
        text = format_number(value, digits)
    return text


def format_duration(seconds: float) -> str:
    """Seconds as ``12.3 s (0:00:12)`` so both short and long runs read at a glance."""
    if not math.isfinite(seconds):
        return str(seconds)
    hours, rest = divmod(round(seconds), 3600)
    return f"{seconds:.1f} s ({hours}:{rest // 60:02d}:{rest % 60:02d})"


def template_environment() -> jinja2.Environment:
    # autoescape=True for every template: task names, parameter names and the config are text
    # from users, and must never become markup. StrictUndefined turns a typo into an error.
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = format_number
    environment.filters["against"] = format_against
    environment.filters["duration"] = format_duration
    return environment


def write_report(html: str, out: Path) -> None:
    """Writes ``html`` to ``out`` atomically: readers see the old file or the whole new one."""
    atomic.write_text(Path(out), html)

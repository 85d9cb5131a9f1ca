"""Reads one task's results from an experiment folder, failing clearly on anything missing.

The report is the last stage: it must never paper over a missing or malformed input, so every
file is checked against the fields the page shows, and each error names the file and the stage
(``pipeline train`` or ``pipeline validate``) that writes it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline import storage
from pipeline.metrics import BudgetScore, MetricsError, ValidationMetrics
from pipeline.provenance import file_digest
from pipeline.rounds.records import TRUNCATION, Truncation
from pipeline.search.records import SearchError
from pipeline.search.select import SearchChoice, read_choice

Metrics = TypeVar("Metrics", ValidationMetrics, BudgetScore)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBER = (int, float)

POSTERIOR_FIELDS: dict[str, type | tuple[type, ...]] = {
    "task": str,
    "parameter_names": list,
    "flow": str,
    "embedding": str,
    "num_train": int,
    "num_val": int,
    "num_nonfinite_excluded": int,
    "epochs": int,
    "best_val_loss": NUMBER,
    "train_seconds": NUMBER,
    "seed": int,
    "world_size": int,
    "batch_size": int,
    "ensemble": int,
    "provenance": dict,
}
PROVENANCE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "config_digest": str,
    "code_revision": str,
    "versions": dict,
    "hostname": str,
    "created": str,
}
FIGURES = ("corner", "coverage", "sbc")


class ResultsError(ValueError):
    """A result file exists but does not hold what the report needs (:class:`MetricsError`
    for the validate stage's files, with the stage to rerun)."""


@dataclass(frozen=True)
class TrainingCurve:
    """Losses from Lightning's CSVLogger, which logs train and validation rows separately."""

    epoch_train: list[float]
    train_loss: list[float]
    epoch_val: list[float]
    val_loss: list[float]


@dataclass(frozen=True)
class TaskResults:
    """Everything the report shows about one task, read and checked.

    Arguments:
        name: The task's name, as given to the report.
        posterior: Contents of ``model/posterior.json``.
        validation: ``validation/metrics.json``.
        curve: Training and validation losses from ``model/metrics.csv``.
        figures: PNG bytes of the validation figures, by key of ``metrics.json["figures"]``.
        budgets: C2ST at each budget of the budget study, ascending (empty without one).
        search: The hyperparameter search that chose the training options, if one did.
        rounds: The sequential rounds that made the model, in order (empty: amortized).
    """

    name: str
    posterior: dict[str, Any]
    validation: ValidationMetrics
    curve: TrainingCurve
    figures: dict[str, bytes]
    budgets: list[BudgetScore] = field(default_factory=list)
    search: SearchChoice | None = None
    rounds: list[RoundRecord] = field(default_factory=list)


@dataclass(frozen=True)
class RoundRecord:
    """One round of sequential inference, as the report shows it.

    Arguments:
        index: The round, from 0.
        observation: The observation (of the task's observations) the rounds aim at.
        num_simulations: Simulations the round ran.
        proposal_mass: Prior mass of the region its parameters were drawn from (1: the prior).
        c2st: C2ST of its posterior at the observation against the reference (None: none).
        region_mass: Prior mass of the region its posterior leaves to the next round.
        train_seconds: Time its training took.
    """

    index: int
    observation: int
    num_simulations: int
    proposal_mass: float
    c2st: float | None
    region_mass: float
    train_seconds: float


def load_task(
    experiment_dir: Path,
    task: str,
    budgets: Sequence[int] = (),
    spec: str | None = None,
    rounds: int = 0,
) -> TaskResults:
    """Reads and checks ``experiment_dir/task``'s training, validation and budget outputs.

    ``spec`` is what the outputs record as their task (the task's import path or file for a
    user's task; by default the folder's name, as for built-in tasks). ``rounds``: how many
    sequential rounds made the model (0: an amortized model).
    """
    task_dir = experiment_dir / task
    train = f"run `pipeline train` for task {task}"
    validate = f"run `pipeline validate` for task {task}"
    if not task_dir.is_dir():
        raise FileNotFoundError(f"missing task folder {task_dir}: {train}, then `validate`")
    posterior_path = task_dir / "model" / "posterior.json"
    posterior = read_json(posterior_path, train)
    check_fields(posterior, POSTERIOR_FIELDS, posterior_path)
    check_fields(posterior["provenance"], PROVENANCE_FIELDS, posterior_path, "provenance.")
    validation_path = task_dir / "validation" / "metrics.json"
    validation = read_metrics(ValidationMetrics, validation_path, validate)
    check_same_task(spec or task, posterior, posterior_path, validation, validation_path)
    check_same_model(task_dir / "model" / "posterior.pt", validation, validation_path)
    check_described_weights(posterior, posterior_path, validation)
    check_validated_observations(task_dir, validation, validation_path)
    return TaskResults(
        name=task,
        posterior=posterior,
        validation=validation,
        curve=read_training_curve(task_dir / "model" / "metrics.csv", train),
        figures=read_figures(task_dir / "validation", validation, validate),
        budgets=[read_budget(task_dir, spec or task, n) for n in sorted(budgets)],
        search=read_search(task_dir, posterior, posterior_path),
        rounds=read_rounds(task_dir, rounds),
    )


def read_rounds(task_dir: Path, count: int) -> list[RoundRecord]:
    """The ``count`` rounds under ``task_dir/rounds``; the last must have made the model."""
    records, proposal_mass, outer = [], 1.0, []
    for index in range(count):
        folder = task_dir / "rounds" / f"round-{index}"
        hint = f"run round {index} of task {task_dir.name} (rounds.tasks)"
        require_file(folder / TRUNCATION, hint)
        try:
            truncation = Truncation.read(folder / TRUNCATION)
        except ValueError as error:
            raise ResultsError(str(error)) from None
        if truncation.within != outer:
            expected = "the prior alone" if index == 0 else f"round {index - 1}'s region"
            raise ResultsError(
                f"{folder / TRUNCATION} is not a region inside {expected} (its `within` lists "
                "other regions, or none: `pipeline truncate --within` missing or given another "
                "round's truncation), so the rounds' proposals do not nest and the last "
                f"posterior is not the posterior inside its region; {hint} again"
            )
        outer = truncation.levels
        check_round(folder, index, truncation, hint)
        model = read_json(folder / "model" / "posterior.json", hint)
        records.append(
            RoundRecord(
                index=index,
                observation=int(truncation.observation.get("selected_index", 0)),
                num_simulations=int(storage.read_attrs(folder / "sims.h5")["num_simulations"]),
                proposal_mass=proposal_mass,
                c2st=truncation.c2st,
                region_mass=truncation.prior_mass,
                train_seconds=float(model.get("train_seconds", float("nan"))),
            )
        )
        proposal_mass = truncation.prior_mass
    if count:
        check_last_round(task_dir, truncation, folder / TRUNCATION)
    return records


def check_round(folder: Path, index: int, truncation: Truncation, hint: str) -> None:
    """Raises unless round ``index``'s model is the one its truncation was cut with and its
    simulations were drawn from the round before's region: the table would otherwise mix the
    rounds of two runs (a round's folder rerun or copied over)."""
    weights = folder / "model" / "posterior.pt"
    require_file(weights, hint)
    if truncation.model_digest != file_digest(weights):
        raise ResultsError(
            f"{folder / TRUNCATION} was cut with other weights than {weights}: the round's "
            f"model was retrained after its truncation; {hint} again"
        )
    if index == 0:
        return
    drawn = (storage.read_attrs(folder / "sims.h5").get("proposal") or {}).get("truncation")
    before = folder.parent / f"round-{index - 1}" / TRUNCATION
    if drawn != file_digest(before):
        raise ResultsError(
            f"{folder / 'sims.h5'} was not drawn from round {index - 1}'s region ({before}); "
            f"{hint} again"
        )


def check_last_round(task_dir: Path, truncation: Truncation, path: Path) -> None:
    """Raises unless the task's model is the last round's and its test simulations were drawn
    from the last round's region (``path``)."""
    rerun = f"rerun the rounds of task {task_dir.name}"
    model = task_dir / "model" / "posterior.pt"
    if truncation.model_digest != file_digest(model):
        raise ResultsError(f"{model} is not the posterior of the last round; {rerun}")
    test = task_dir / "sims" / "test.h5"
    proposal = storage.read_attrs(test).get("proposal") or {}
    if proposal.get("truncation") != file_digest(path):
        raise ResultsError(
            f"{test} was not drawn from the last round's region ({path}): its coverage would "
            f"not be the posterior's there; {rerun}"
        )


def read_search(
    task_dir: Path, posterior: dict[str, Any], posterior_path: Path
) -> SearchChoice | None:
    """``task_dir/search/best.json`` when the model says a search chose its options (it must
    then be that search's choice), else None."""
    recorded = posterior.get("search")
    if recorded is None:
        return None
    path = task_dir / "search" / "best.json"
    hint = f"{posterior_path} was trained with options a search chose; run its search-select"
    require_file(path, hint)
    try:
        choice = read_choice(path)
    except SearchError as error:
        raise ResultsError(str(error)) from None
    if not isinstance(recorded, dict) or (choice.search_digest, choice.chosen) != (
        recorded.get("search_digest"),
        recorded.get("chosen"),
    ):
        raise ResultsError(
            f"{path} is not the search choice the model was trained with ({posterior_path} "
            f"records {recorded!r}); train the task again"
        )
    return choice


def read_budget(task_dir: Path, task: str, budget: int) -> BudgetScore:
    """Reads ``task_dir/budget-N/c2st.json`` (written by ``pipeline c2st``)."""
    path = task_dir / f"budget-{budget}" / "c2st.json"
    score = read_metrics(
        BudgetScore, path, f"run the budget study (simulate.budgets) for task {task}"
    )
    if score.task != task or score.budget != budget:
        raise ResultsError(
            f"{path} holds task {score.task!r} at budget {score.budget}, not {task!r} at {budget}"
        )
    if score.model_digest is None:
        raise ResultsError(
            f"{path} does not record which model drew the samples it scores (written by an "
            f"older `pipeline c2st`); score budget {budget} of task {task} again (snakemake "
            "--forcerun score_budget)"
        )
    # The budget's own model, or the main model where the budget reuses it (a budget that had
    # a model of its own before may reuse the main model now: either may have drawn them).
    candidates = [task_dir / f"budget-{budget}" / "model", task_dir / "model"]
    weights = [folder / "posterior.pt" for folder in candidates]
    weights = [path for path in weights if path.exists()]
    matched = [path for path in weights if file_digest(path) == score.model_digest]
    if weights and not matched:
        raise ResultsError(
            f"{path} scores samples of other weights (digest {score.model_digest}) than "
            f"{' or '.join(map(str, weights))}: sample and score budget {budget} of task "
            f"{task} again"
        )
    # The budget is a label the score was given: the model says what it was trained on.
    spec_path = matched[0].with_name("posterior.json") if matched else None
    if spec_path is not None and spec_path.exists():
        spec = read_json(spec_path, f"run the budget study (simulate.budgets) for task {task}")
        keys = ("num_train", "num_val", "num_nonfinite_excluded")
        trained_on = sum(int(spec.get(key, 0)) for key in keys)
        if trained_on != budget:
            raise ResultsError(
                f"{path} scores {matched[0]}, trained on {trained_on} simulations, as budget "
                f"{budget}: sample and score budget {budget}'s own model"
            )
    return score


def read_metrics(kind: type[Metrics], path: Path, hint: str) -> Metrics:
    """Reads a result file of :mod:`pipeline.metrics`; errors name the file, field and fix."""
    require_file(path, hint)
    try:
        return kind.read(path)  # type: ignore[attr-defined]
    except MetricsError as error:
        raise ResultsError(f"{error}; {hint} again") from None


def require_file(path: Path, hint: str) -> None:
    """Raises ``FileNotFoundError`` naming ``path`` and how to produce it."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: {hint}")


def read_json(path: Path, hint: str) -> dict[str, Any]:
    """Parses a JSON object from ``path``; errors name the file."""
    require_file(path, hint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"{path} is not valid JSON ({error}); {hint} again") from error
    if not isinstance(data, dict):
        raise ResultsError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def check_fields(
    data: dict[str, Any],
    fields: dict[str, type | tuple[type, ...]],
    path: Path,
    prefix: str = "",
) -> None:
    """Raises ``ResultsError`` unless every field is present with the expected JSON type."""
    for key, kind in fields.items():
        if key not in data:
            raise ResultsError(f"{path}: missing field {prefix}{key!r}")
        # JSON true/false load as bool, a subclass of int, yet are never a valid count or value.
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ResultsError(f"{path}: field {prefix}{key!r} has the wrong type")


def check_same_task(
    task: str,
    posterior: dict[str, Any],
    posterior_path: Path,
    validation: ValidationMetrics,
    validation_path: Path,
) -> None:
    """Refuses results that were written for another task or another parametrisation."""
    for found, path in ((posterior["task"], posterior_path), (validation.task, validation_path)):
        if found != task:
            raise ResultsError(f"{path} holds results of task {found!r}, not {task!r}")
    if posterior["parameter_names"] != validation.parameter_names:
        raise ResultsError(
            f"{validation_path}: parameter_names differ from those in {posterior_path}"
        )


def check_same_model(weights: Path, validation: ValidationMetrics, validation_path: Path) -> None:
    """Refuses a validation of other weights than the model's: the report would show one
    model's architecture and training beside another's diagnostics."""
    if validation.model_digest is None:
        raise ResultsError(
            f"{validation_path} does not record which weights it validates (written by an "
            "older `pipeline validate`), so it cannot be told from a validation of another "
            "model; rerun sample and validate for this task"
        )
    require_file(weights, "run `pipeline train` for this task, then sample and validate")
    if file_digest(weights) != validation.model_digest:
        raise ResultsError(
            f"{validation_path} validates other weights (digest {validation.model_digest}) "
            f"than {weights} ({file_digest(weights)}): the model was retrained or replaced "
            "after validation; rerun sample and validate for this task"
        )


def check_described_weights(
    posterior: dict[str, Any], posterior_path: Path, validation: ValidationMetrics
) -> None:
    """Refuses a ``posterior.json`` saved with other weights than ``posterior.pt`` (which
    :func:`check_same_model` found the validated ones): the page would show another model's
    architecture, data and training beside these weights' diagnostics."""
    recorded = posterior.get("weights_digest")
    if recorded is not None and recorded != validation.model_digest:
        raise ResultsError(
            f"{posterior_path} was saved with other weights (digest {recorded}) than the "
            f"posterior.pt beside it ({validation.model_digest}), which was validated: one of "
            "the two files was replaced; train this task again (pipeline train --overwrite), "
            "then sample and validate"
        )


# Where the workflow keeps the observations a task is validated at: its own, or the one its
# rounds aim at (workflow/rules/common.smk, observations_of).
OBSERVATION_FILES = ("observations.h5", "rounds/observation.h5")


def check_validated_observations(
    task_dir: Path, validation: ValidationMetrics, validation_path: Path
) -> None:
    """Refuses a validation made at other observations than the task folder holds (a file
    replaced by hand since, the report then run by hand): the page would show estimates and
    truths of observations no longer there. Validations that record no digest, and folders
    without such a file (stages run by hand elsewhere), are not checked."""
    recorded = validation.observations.digest
    files = [task_dir / name for name in OBSERVATION_FILES if (task_dir / name).is_file()]
    if recorded is None or not files or any(file_digest(f) == recorded for f in files):
        return
    raise ResultsError(
        f"{validation_path} was made at other observations (digest {recorded}) than "
        f"{files[0]} holds ({file_digest(files[0])}): the observations were replaced after "
        "validation; sample and validate this task again"
    )


def read_training_curve(path: Path, hint: str) -> TrainingCurve:
    """Reads Lightning's ``metrics.csv``, where a row holds either a train or a val loss."""
    require_file(path, hint)
    losses: dict[str, tuple[list[float], list[float]]] = {
        "train_loss": ([], []),
        "val_loss": ([], []),
    }
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = {"epoch", *losses} - set(reader.fieldnames or ())
        if missing:
            raise ResultsError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            for column, (epochs, values) in losses.items():
                # Short rows give None for absent cells; empty strings mean "not logged here".
                cell = (row[column] or "").strip()
                if cell:
                    epochs.append(_cell_float(row["epoch"], path, reader.line_num))
                    values.append(_cell_float(cell, path, reader.line_num))
    for column, (_, values) in losses.items():
        if not values:
            raise ResultsError(f"{path}: no {column} values; did training finish? {hint}")
    (epoch_train, train_loss), (epoch_val, val_loss) = losses.values()
    return TrainingCurve(epoch_train, train_loss, epoch_val, val_loss)


def _cell_float(cell: str | None, path: Path, line: int) -> float:
    try:
        return float(cell or "")
    except ValueError:
        raise ResultsError(f"{path}, line {line}: {cell!r} is not a number") from None


def read_figures(
    validation_dir: Path, validation: ValidationMetrics, hint: str
) -> dict[str, bytes]:
    """Reads the PNG figures listed in ``metrics.json``; C2ST's only when it was computed."""
    keys = (
        FIGURES
        + (("c2st",) if validation.c2st is not None else ())
        + (("predictive",) if validation.predictive is not None else ())
    )
    listed = validation.figures
    metrics_path = validation_dir / "metrics.json"
    figures = {}
    for key in keys:
        if not isinstance(listed.get(key), str):
            raise ResultsError(f"{metrics_path}: figures.{key} should name a PNG file")
        figures[key] = read_png(_inside(validation_dir, listed[key], metrics_path), hint)
    return figures


def _inside(folder: Path, relative: str, listed_in: Path) -> Path:
    # Figures are embedded in a page people share, so a path must not reach outside its folder.
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ResultsError(f"{listed_in}: figure path {relative!r} leaves {folder}")
    return path


def read_png(path: Path, hint: str) -> bytes:
    """Reads a PNG file, refusing anything else so a broken image never reaches the page."""
    require_file(path, hint)
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ResultsError(f"{path} is not a PNG file; {hint} again")
    return data

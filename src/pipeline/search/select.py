"""Choosing among a search's trials, guarding calibration.

The trial of lowest held-out loss wins, unless trials within ``tolerance`` standard errors of
it (equal within the noise of the held-out set) include one whose HPD coverage lies closer to
the diagonal: a search must not buy a sliver of loss with an over- or under-confident posterior.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.metrics import MetricsError, from_json
from pipeline.options import SearchOptions
from pipeline.provenance import provenance
from pipeline.search.records import SearchError, TrialRecord, read_trial

__all__ = ["Choice", "SearchChoice", "TrialRow", "check_base", "choose", "read_choice", "select"]

log = logging.getLogger(__name__)
# The search options a trial records and depends on (pipeline.search.trial.search_identity).
SEARCH_KEYS = ("seed", "parallel", "startup", "held_out", "coverage_samples", "members")


@dataclass(frozen=True)
class Choice:
    """The chosen trial, the trials it was chosen among, and why, in words."""

    trial: int
    near: tuple[int, ...]
    reason: str


def choose(records: list[TrialRecord], tolerance: float) -> Choice:
    """The trial to train with: see the module's docstring.

    Raises:
        SearchError: If no trial completed.
    """
    complete = [r for r in records if r.complete and r.loss < float("inf")]
    if not complete:
        raise SearchError(
            f"all {len(records)} trials failed (training diverged or gave zero density to "
            "held-out parameters); narrow the space (e.g. lower learning_rate's high) and rerun "
            "the search"
        )
    best = min(complete, key=lambda r: (r.loss, r.trial))
    near = [r for r in complete if r.loss <= best.loss + tolerance * best.loss_se]
    chosen = min(near, key=lambda r: (r.coverage_max_deviation, r.loss, r.trial))
    if chosen is best:
        reason = f"lowest held-out loss of {len(complete)} completed trials"
        if len(near) > 1:
            reason += (
                f"; also the best calibrated of the {len(near)} within {tolerance:g} standard "
                "error(s) of it"
            )
    else:
        deviations = chosen.coverage_max_deviation, best.coverage_max_deviation
        reason = (
            f"best calibrated (HPD coverage off the diagonal by {deviations[0]:.3f}, against "
            f"{deviations[1]:.3f} for trial {best.trial}) of the "
            f"{len(near)} trials within {tolerance:g} standard error(s) of the lowest held-out "
            f"loss (trial {best.trial})"
        )
    return Choice(chosen.trial, tuple(r.trial for r in near), reason)


def read_trials(paths: list[Path], options: SearchOptions) -> list[TrialRecord]:
    """Every trial of one search, checked: the same search, trials 0 to ``trials - 1`` once
    each, scored on the same held-out simulations.

    Raises:
        SearchError: naming the file or trials at fault.
    """
    if not paths:
        raise SearchError("no trial scores given; pass --trials with every trial's score.json")
    first = read_trial(paths[0])
    records = [first] + [read_trial(p, first.document["search_digest"]) for p in paths[1:]]
    identity = first.document["search"]
    differ = [k for k in SEARCH_KEYS if identity.get(k) != getattr(options, k)]
    if differ:
        found = ", ".join(f"{k} {identity.get(k)} (given {getattr(options, k)})" for k in differ)
        raise SearchError(
            f"the trials were run with other search options: {found}; choose with the "
            "options they were run with, or run the search again"
        )
    numbers = sorted(r.trial for r in records)
    if numbers != list(range(options.trials)):
        raise SearchError(
            f"a search of {options.trials} trials needs the scores of trials 0 to "
            f"{options.trials - 1} once each, got trials {numbers}"
        )
    digests = {r.held_out_digest for r in records if r.complete}
    if len(digests) > 1:
        raise SearchError(
            "the trials were scored on different held-out simulations (streamed data are "
            "split by batch_size): remove batch_size from the space or set train.loading to "
            "memory, and rerun the search"
        )
    return sorted(records, key=lambda r: r.trial)


@dataclass(frozen=True)
class TrialRow:
    """One trial as the report lists it; ``loss`` and the coverage are None if it failed."""

    trial: int
    generation: int
    status: str
    message: str
    options: dict[str, Any]
    loss: float | None
    loss_se: float | None
    coverage_max_deviation: float | None
    epochs: int | None
    train_seconds: float | None

    @classmethod
    def of(cls, record: TrialRecord) -> TrialRow:
        document = record.document
        training = document.get("training") or {}
        return cls(
            trial=record.trial,
            generation=document["generation"],
            status=document["status"],
            message=document["message"],
            options=record.options,
            loss=record.loss,
            loss_se=record.loss_se,
            coverage_max_deviation=record.coverage_max_deviation,
            epochs=training.get("epochs"),
            train_seconds=training.get("train_seconds"),
        )


@dataclass(frozen=True)
class SearchChoice:
    """``search/best.json``: the chosen trial's options, why, and every trial's row."""

    kind: str
    task: str
    data_digest: str
    search_digest: str
    search: dict[str, Any]
    chosen: int
    near: list[int]
    reason: str
    options: dict[str, Any]
    trials: list[TrialRow]
    provenance: dict[str, Any]

    def __post_init__(self) -> None:
        if self.kind != "search-choice":
            raise MetricsError(f"kind is {self.kind!r}, not 'search-choice'")
        if not 0 <= self.chosen < len(self.trials):
            raise MetricsError(f"chosen trial {self.chosen} is not one of the trials listed")


def select(
    scores: list[Path], out: Path, options: SearchOptions, *, overwrite: bool = False
) -> SearchChoice:
    """Chooses a trial among ``scores`` (the trials' ``score.json``) and writes ``out``
    (:class:`SearchChoice`, JSON)."""
    atomic.check_new(out, overwrite=overwrite)
    records = read_trials(scores, options)
    choice = choose(records, options.tolerance)
    chosen = records[choice.trial]
    identity = chosen.document["search"]
    result = SearchChoice(
        kind="search-choice",
        task=identity["task"],
        data_digest=identity["data_digest"],
        search_digest=chosen.document["search_digest"],
        search=identity | {"trials": options.trials, "tolerance": options.tolerance},
        chosen=choice.trial,
        near=list(choice.near),
        reason=choice.reason,
        options=chosen.options,
        trials=[TrialRow.of(r) for r in records],
        provenance=provenance(identity),
    )
    atomic.write_json(out, dataclasses.asdict(result), indent=1, sort_keys=True)
    log.info("chose trial %d (%s): %s", choice.trial, choice.reason, json.dumps(chosen.options))
    return result


def read_choice(
    path: Path, task: str | None = None, data_digest: str | None = None
) -> SearchChoice:
    """A search's choice (``search-select``'s file); with ``task`` and ``data_digest``, refused
    unless it was made for that data.

    Raises:
        SearchError: If the file is unreadable, not a search's choice, or made for other data.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("kind") != "search-choice":
            kind = data.get("kind") if isinstance(data, dict) else None
            raise MetricsError(f"its kind is {kind!r}, not 'search-choice'")
        choice = from_json(SearchChoice, data)
    except (OSError, ValueError) as error:
        raise SearchError(
            f"{path} is not a search's choice ({error}); `pipeline search-select` writes one"
        ) from None
    expected = (task, data_digest)
    if task is not None and (choice.task, choice.data_digest) != expected:
        raise SearchError(
            f"{path} chose options for task {choice.task!r} on data {choice.data_digest}, but "
            f"this training is of task {task!r} on data {data_digest}; rerun the search on "
            "this data"
        )
    return choice


def check_base(choice: SearchChoice, shaping: dict[str, Any], path: Path) -> None:
    """Refuses training options that differ from those the search's trials started from
    (``shaping``: :meth:`TrainConfig.shaping` of the search's space, with the chosen options
    applied): the model would not be the chosen trial's.

    Raises:
        SearchError: naming the options that differ.
    """
    expected = json.loads(json.dumps(choice.search["base"] | choice.options))
    found = json.loads(json.dumps(shaping))
    differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if differ:
        pairs = ", ".join(f"{k}: {found.get(k)!r} (search: {expected.get(k)!r})" for k in differ)
        raise SearchError(
            f"{path} was chosen by trials trained with other options than these ({pairs}); "
            "train with the search's options, or without --chosen"
        )

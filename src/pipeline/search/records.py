"""A finished trial as the rest of the search reads it (its ``score.json``), without torch:
the selection and the report read trials without loading a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.provenance import config_digest

__all__ = ["SearchError", "TrialRecord", "describe_range", "history_of", "read_trial"]


class SearchError(ValueError):
    """Trial results that cannot be combined: another search's, missing, or all failed."""


@dataclass(frozen=True)
class TrialRecord:
    """What later trials and the selection read of a finished trial."""

    trial: int
    params: dict[str, Any]
    options: dict[str, Any]
    loss: float | None  # mean negative log-density of the held-out theta; None if it failed
    loss_se: float | None
    coverage_max_deviation: float | None
    held_out_digest: str | None
    path: Path
    document: dict[str, Any] = field(repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.loss is not None


def read_trial(path: Path, digest: str | None = None) -> TrialRecord:
    """A trial's ``score.json``; with ``digest``, refused unless it is of that search.

    Raises:
        SearchError: If the file is unreadable, not a trial's score, or of another search.
    """
    try:
        document = json.loads(Path(path).read_text())
        if not isinstance(document, dict) or document.get("kind") != "search-trial":
            raise KeyError("kind")
        held_out = document["held_out"] or {}
        record = TrialRecord(
            trial=int(document["trial"]),
            params=dict(document["params"]),
            options=dict(document["options"]),
            loss=held_out.get("loss"),
            loss_se=held_out.get("loss_se"),
            coverage_max_deviation=held_out.get("coverage_max_deviation"),
            held_out_digest=held_out.get("rows_digest"),
            path=Path(path),
            document=document,
        )
        found = str(document["search_digest"])
        if config_digest(document["search"]) != found:
            raise ValueError("its search description does not match its digest (edited?)")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SearchError(
            f"{path} is not the score of a search trial ({type(error).__name__}: {error}); "
            "run `pipeline search-trial` again for it with --overwrite"
        ) from None
    if digest is not None and found != digest:
        raise SearchError(
            f"{path} is a trial of another search (search digest {found}, this one {digest}): "
            "the task, data, base options, space or search options differ; move the old "
            "trials away or rerun them with --overwrite"
        )
    return record


def history_of(records: list[TrialRecord], trial: int, parallel: int) -> list[TrialRecord]:
    """The records trial ``trial`` is proposed from: exactly the earlier generations' trials.

    Raises:
        SearchError: If one is missing or a record of this or a later generation is given.
    """
    start = (trial // parallel) * parallel
    numbers = sorted(r.trial for r in records)
    if numbers != list(range(start)):
        missing = sorted(set(range(start)) - set(numbers))
        extra = sorted(set(numbers) - set(range(start)))
        raise SearchError(
            f"trial {trial} (generation {trial // parallel}, {parallel} trials a generation) is "
            f"proposed from trials 0 to {start - 1} exactly; missing {missing}, not allowed "
            f"{extra}. Pass --history with the score.json of each earlier trial"
        )
    return sorted(records, key=lambda r: r.trial)


def describe_range(spec: dict[str, Any]) -> str:
    """A searched option's range (as the config writes it) in words, for logs and the report."""
    if "choices" in spec:
        return ", ".join(json.dumps(c) for c in spec["choices"])
    return f"{spec['low']:g} to {spec['high']:g}" + (" (log scale)" if spec.get("log") else "")

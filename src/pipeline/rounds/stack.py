"""One training file from the simulations of rounds 0..r."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline import atomic, storage
from pipeline.provenance import provenance

log = logging.getLogger(__name__)


def stack_rounds(task: str, sources: Sequence[Path], out: Path, *, overwrite: bool) -> None:
    """Writes the simulations of ``sources`` (rounds 0..r, in order) into one training file.

    Arguments:
        task: The task as the simulations record it (name or import path).

    Raises naming the file if a source holds another task's simulations.
    """
    atomic.check_new(Path(out), overwrite=overwrite)
    found = [storage.read_attrs(source, task=task) for source in sources]
    rounds = [
        {"file": str(source), "config_digest": attrs.get("config_digest")}
        for source, attrs in zip(sources, found, strict=True)
    ]
    made_by = provenance({"task": task, "rounds": rounds})
    first = found[0]
    attrs = {
        "task": task,
        **{key: first[key] for key in ("parameter_names", "parameter_units", "x_unit")},
        "rounds": rounds,
        "num_nonfinite": sum(int(attrs.get("num_nonfinite", 0)) for attrs in found),
        "provenance": made_by,
        "config_digest": made_by["config_digest"],
    }
    storage.merge_copy(Path(out), list(map(Path, sources)), attrs)
    log.info("stacked %d rounds into %s", len(sources), out)

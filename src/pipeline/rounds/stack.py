"""One training file from the simulations of rounds 0..r."""

from __future__ import annotations

import json
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

    Raises naming the file if a source holds another task's simulations, or the sources are
    not one round each: the prior's first, then regions, none twice.
    """
    atomic.check_new(Path(out), overwrite=overwrite)
    found = [storage.read_attrs(source, task=task) for source in sources]
    proposals = [json.dumps(attrs.get("proposal"), sort_keys=True) for attrs in found]
    seeds = [attrs.get("seed") for attrs in found]
    for source, attrs in zip(sources, found, strict=True):
        if "seed" not in attrs or "num_simulations" not in attrs or attrs.get("imported"):
            raise ValueError(
                f"{source} is not a round's simulations (`pipeline simulate`'s, with a seed): "
                "stack the files the rounds simulated, round 0's from the prior first"
            )
    for index, (source, attrs) in enumerate(zip(sources, found, strict=True)):
        if (attrs.get("proposal") is None) != (index == 0):
            drawn = "the prior" if attrs.get("proposal") is None else "a truncated region"
            raise ValueError(
                f"{source} (round {index} of the stack) holds simulations drawn from {drawn}; "
                "stack round 0 (the prior) first, then the rounds of the regions, in order"
            )
    # A user's task's definition: round 0 records it as its own, later rounds in their proposal.
    definitions = [found[0].get("task_digest")]
    definitions += [attrs["proposal"].get("task_digest") for attrs in found[1:]]
    for index, (source, definition) in enumerate(zip(sources, definitions, strict=True)):
        if definition != definitions[0]:
            raise ValueError(
                f"{source} (round {index} of the stack) was simulated by another definition of "
                f"task {task!r} (digest {definition}) than round 0 ({definitions[0]}): its "
                "files changed between rounds. Simulate every round with one definition: "
                "rerun the rounds from the first whose task differs"
            )
    for index, source in enumerate(sources):
        if proposals.count(proposals[index]) > 1 or seeds.count(seeds[index]) > 1:
            raise ValueError(
                f"{source} repeats another file of the stack (same proposal or seed): each "
                "round's simulations belong in the stack once"
            )
    check_one_chain(sources, found)
    rounds = [
        {
            "file": str(source),
            "config_digest": attrs.get("config_digest"),
            "seed": attrs["seed"],
            "num_simulations": int(attrs["num_simulations"]),
        }
        | ({"proposal": attrs["proposal"]} if "proposal" in attrs else {})
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
        **({"task_digest": definitions[0]} if definitions[0] is not None else {}),
    }
    storage.merge_copy(Path(out), list(map(Path, sources)), attrs)
    log.info("stacked %d rounds into %s", len(sources), out)


def check_one_chain(sources: Sequence[Path], found: Sequence[dict]) -> None:
    """Refuses rounds (``found``: their files' attributes, round 0's first) that are not one
    chain aimed at one observation: round ``k`` must be drawn from a region of ``k`` levels
    whose first ``k - 1`` are round ``k - 1``'s, every region cut at the same ``x_o``.
    Otherwise a round drawn from a region that does not nest, or cut around another
    observation, is stacked and weighted as if it were this chain's, and the posterior trained
    on it is wrong without a sign. Rounds simulated before their files recorded the chain are
    passed over with a warning."""
    previous = None
    observations = {}
    for index, (source, attrs) in enumerate(zip(sources[1:], found[1:], strict=True), start=1):
        proposal = attrs["proposal"]
        levels = proposal.get("levels")
        if levels is None:
            log.warning(
                "%s (round %d of the stack) does not record its chain of regions (simulated by "
                "an older version): whether it nests in the rounds before it is not checked",
                source,
                index,
            )
            previous = None
            continue
        if len(levels) != index:
            raise ValueError(
                f"{source} (round {index} of the stack) was drawn from a region of "
                f"{len(levels)} level(s), where round {index} of one chain of rounds has "
                f"{index}: stack the rounds of one run, in order"
            )
        if previous is not None and levels[:-1] != previous:
            raise ValueError(
                f"{source} (round {index} of the stack) was drawn from a region that does not "
                f"lie within round {index - 1}'s: truncate each round's posterior --within the "
                "truncation its own round was drawn from, then simulate this round again"
            )
        previous = levels
        observations[source] = proposal["observation"]
    if len(set(observations.values())) > 1:
        named = "; ".join(f"{source}: {digest}" for source, digest in observations.items())
        raise ValueError(
            f"the rounds' regions were cut at different observations (x_o digests {named}): "
            "stack the rounds aimed at one observation"
        )

"""What a round leaves behind: its truncation file, and the seeds and digests rounds share.

No torch here: the workflow and the report read these without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.provenance import provenance

TRUNCATION = "truncation.json"


class TruncationError(ValueError):
    """The region is too small to sample by rejection against the prior."""


def round_seed(seed: int, round: int) -> int:
    """The simulation seed of round ``round`` (from 0) of a run seeded ``seed``: distinct
    rounds get unrelated streams, and the same pair always the same one."""
    return int(np.random.SeedSequence([seed, round]).generate_state(1)[0])


@dataclass(frozen=True)
class Truncation:
    """The region one round's posterior leaves to the next round, and how it was found.

    Attributes:
        task: The task's name or import path, as the model records it.
        threshold: ``t``: the region is ``log q(theta | x_o) >= t`` inside the prior.
        quantile: Posterior mass left outside the region.
        prior_mass: Fraction of ``num_prior_draws`` prior draws inside the region (the
            acceptance rate of rejection sampling).
        min_prior_mass: Below this acceptance rate the next round's sampling stops.
        num_draws: Posterior draws the threshold was estimated from.
        num_prior_draws: Prior draws the prior mass was estimated from.
        model_digest: SHA-256 of the posterior weights the region is defined by.
        observation: ``{"file": digest, "index": j, "selected_index": k}``: which observation
            ``x_o`` is (row ``j`` of the file; ``k`` of the task's observations).
        x_obs: ``x_o`` itself (flattened), so that a simulate job needs no other file.
        c2st: C2ST of the posterior draws against the reference at ``x_o`` (None without one).
        within: The earlier rounds' regions this one lies inside, round 0's first, each
            ``{"model_digest": ..., "threshold": ...}``: the region is their intersection with
            ``log q(theta | x_o) >= threshold``, so the regions of successive rounds are nested.
    """

    task: str
    threshold: float
    quantile: float
    prior_mass: float
    num_draws: int
    num_prior_draws: int
    min_prior_mass: float
    model_digest: str
    observation: dict[str, Any]
    x_obs: list[float]
    c2st: float | None = None
    within: list[dict[str, Any]] = field(default_factory=list)

    @property
    def observation_digest(self) -> str:
        """SHA-256 (16 hex digits) of ``x_obs`` as float64: which observation the regions were
        cut at, whatever file held it."""
        values = np.asarray(self.x_obs, dtype=np.float64)
        return hashlib.sha256(values.tobytes()).hexdigest()[:16]

    @property
    def levels(self) -> list[dict[str, Any]]:
        """Every region the truncated prior must lie in, round 0's first and this one last:
        ``[{"model_digest": ..., "threshold": ...}, ...]``."""
        return [*self.within, {"model_digest": self.model_digest, "threshold": self.threshold}]

    def write(self, path: Path, *, overwrite: bool) -> None:
        atomic.check_new(Path(path), overwrite=overwrite)
        document = {**asdict(self), "provenance": provenance(asdict(self))}
        atomic.write_json(Path(path), document, indent=1)

    @classmethod
    def read(cls, path: Path) -> Truncation:
        """Reads a file of :meth:`write`; raises naming the file if it is not one."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `pipeline truncate` first")
        try:
            data = json.loads(path.read_text())
            data.pop("provenance", None)
            return cls(**data)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{path} is not a truncation written by `pipeline truncate` "
                f"({type(error).__name__}: {error}); run it again with --overwrite"
            ) from None


def region_advice(quantile: float) -> str:
    """What a user can change when the region is too small to sample by rejection."""
    return (
        f"the posterior is too narrow for its region to be sampled from the prior. Lower "
        f"rounds.quantile (now {quantile:g}) to widen the region, lower "
        "rounds.min_prior_mass (the stages' --min-prior-mass) to accept slower rejection, or "
        "run fewer rounds"
    )

"""The truncated prior a round simulates from, and the stage that finds it (``truncate``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.diagnostics import c2st
from pipeline.ensemble import EnsembleSettings
from pipeline.models.posterior import WEIGHTS, NeuralPosterior, load_posterior
from pipeline.observations import read_reference
from pipeline.options import TruncateOptions
from pipeline.provenance import file_digest
from pipeline.rounds.records import Truncation, TruncationError, region_advice
from pipeline.sampling import SamplingError, observation_task, sample_posterior
from pipeline.tasks import Prior, Task, get_task
from pipeline.tasks.base import source_digest

log = logging.getLogger(__name__)

# Rows of theta per log-density evaluation: bounded memory, few Python round trips.
STEP = 65536


def _in_steps(theta: np.ndarray, evaluate: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """``evaluate`` of rows ``theta`` (n, D) -> (n,), :data:`STEP` rows (float32) at a time."""
    steps = [
        evaluate(torch.as_tensor(theta[start : start + STEP], dtype=torch.float32)).numpy()
        for start in range(0, len(theta), STEP)
    ]
    return np.concatenate(steps) if steps else np.empty(0)


class TruncatedPrior:
    """The prior restricted to the region of one round and of every round before it, sampled
    by rejection.

    The region of round ``r`` is ``log q_k(theta | x_o) >= t_k`` for every ``k <= r`` (inside
    the prior): nested regions keep the proposals of all rounds so far of one density ratio to
    the prior inside the last region, so a posterior trained on all rounds' simulations is the
    true posterior there (up to the network's error) for every ``x``, not only at ``x_o``.

    Arguments:
        prior: The task's prior.
        posteriors: The posteriors that define the regions, round 0's first (eval mode), one
            per level of ``truncation.levels``.
        x_obs: The observation, shape ``x_shape``.
        truncation: The thresholds, the region's prior mass (which sizes the batches) and the
            acceptance rate below which sampling stops with :class:`TruncationError`.
        min_prior_mass: That acceptance rate instead of the one ``truncation`` records (the
            floor decides only whether sampling stops, never which draws it keeps).
    """

    def __init__(
        self,
        prior: Prior,
        posteriors: Sequence[NeuralPosterior],
        x_obs: np.ndarray,
        truncation: Truncation,
        min_prior_mass: float | None = None,
    ) -> None:
        if len(posteriors) != len(truncation.levels):
            raise ValueError(
                f"the region has {len(truncation.levels)} levels (rounds) but "
                f"{len(posteriors)} posteriors were given"
            )
        self.prior = prior
        self.posteriors = list(posteriors)
        self.x_obs = torch.as_tensor(np.asarray(x_obs, dtype=np.float32))
        self.truncation = truncation
        self.min_prior_mass = min_prior_mass or truncation.min_prior_mass

    @torch.no_grad()
    def log_q(self, theta: np.ndarray, level: int = -1) -> np.ndarray:
        """log q(theta | x_o) of rows ``theta`` (n, D) -> (n,) under the posterior of
        ``level`` (the last by default); x_o is embedded once per step (a map task's embedding
        would otherwise run once per prior draw)."""
        posterior, x = self.posteriors[level], self.x_obs[None]
        return _in_steps(theta, lambda rows: posterior.log_prob(rows[:, None], x)[:, 0].double())

    def depth(self, theta: np.ndarray) -> np.ndarray:
        """How many of the nested regions hold each row of ``theta`` (n, D): ``(n,)`` integers,
        -1 outside the prior, 0 inside the prior only, ``k`` inside the regions of levels
        ``0..k-1``. Each level's posterior is evaluated only on the rows the earlier levels
        kept, and only as far as it takes to decide them
        (:meth:`~pipeline.models.posterior.NeuralPosterior.log_prob_reaches`)."""
        inside = np.isfinite(self.prior.log_prob(theta))
        depth = np.where(inside, 0, -1)
        for level, bound in enumerate(self.truncation.levels):
            inside[inside] = self._reaches(theta[inside], level, bound["threshold"])
            depth[inside] += 1
        return depth

    def _reaches(self, theta: np.ndarray, level: int, threshold: float) -> np.ndarray:
        """Whether log q(theta | x_o) >= ``threshold`` under the posterior of ``level``, for
        rows ``theta`` (n, D) -> (n,) booleans."""
        posterior, x = self.posteriors[level], self.x_obs[None]
        return _in_steps(theta, lambda rows: posterior.log_prob_reaches(rows, x, threshold))

    def accepts(self, theta: np.ndarray) -> np.ndarray:
        """Which rows of ``theta`` (n, D) lie in the region: ``(n,)`` booleans."""
        return self.depth(theta) == len(self.truncation.levels)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws of the truncated prior, shape ``(n, D)``; ``rng`` is the only source of
        randomness (batches are sized from the recorded prior mass, not from timing)."""
        floor = self.min_prior_mass
        # Sized by the recorded mass alone, so that the floor never changes the draws.
        batch = min(max(math.ceil(1.2 * n / max(self.truncation.prior_mass, 1e-6)), 64), 10**6)
        limit = n / floor
        kept, count, drawn = [], 0, 0
        while count < n:
            if drawn >= limit:
                raise TruncationError(
                    f"only {count} of {drawn} prior draws fell in the truncated region "
                    f"(acceptance {count / drawn:.2e}, below min_prior_mass {floor:g}); "
                    f"{region_advice(self.truncation.quantile)}"
                )
            theta = self.prior.sample(batch, rng)
            keep = theta[self.accepts(theta)]
            kept.append(keep)
            count, drawn = count + len(keep), drawn + batch
        return np.concatenate(kept)[:n]


# Prior draws a region's mass should rest on: its relative standard error is then near 3 %.
PRECISE_MASS_DRAWS = 1000


class TruncatedTask(Task):
    """``task`` with its parameters drawn from a :class:`TruncatedPrior`: what a round's
    simulate job runs. Everything else (names, shapes, simulator) is ``task``'s own."""

    def __init__(self, task: Task, region: TruncatedPrior, files: Sequence[Path]) -> None:
        """``files``: the truncation file, then the weights that define the region."""
        if task.prior is None:
            raise ValueError(
                f"task {task.name!r} has no prior, so it cannot draw parameters to simulate "
                "rounds from; add one (rounds need a simulator and a prior)"
            )
        self.task = task
        self.region = region
        truncation = region.truncation
        self.proposal = {
            "truncation": file_digest(Path(files[0])),
            "model": truncation.model_digest,
            "threshold": truncation.threshold,
            "prior_mass": truncation.prior_mass,
            # The whole chain of regions and the observation they were cut at: a stack of
            # rounds must be one chain, aimed at one observation (pipeline.rounds.stack).
            "levels": truncation.levels,
            "observation": truncation.observation_digest,
        }
        # A user's task: the definition simulated, which every round of a stack must share
        # (this task's own digest also covers the region's files).
        if (base := source_digest(task)) is not None:
            self.proposal["task_digest"] = base
        self.name = task.name
        self.parameter_names = tuple(task.parameter_names)
        self.parameter_units = tuple(task.parameter_units)
        self.x_shape = tuple(task.x_shape)
        self.x_unit = task.x_unit
        self.seed_block_size = task.seed_block_size
        # The proposal's files are part of the definition: other files, other data.
        self.source_files = (*task.source_files, *map(Path, files))

    @property
    def prior(self) -> Prior:
        return self.task.prior

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.task.simulate(theta, rng)

    def failed_runs(self) -> tuple[int, int]:
        return self.task.failed_runs()

    def simulate_block(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        theta = self.region.sample(n, rng)
        return theta, self.task.simulate(theta.copy(), rng)  # theta is stored as drawn


def truncated_task(
    task: Task,
    spec: str,
    truncation_path: Path,
    model: Path,
    within_models: Sequence[Path] = (),
    min_prior_mass: float | None = None,
) -> TruncatedTask:
    """``task`` (given as ``spec``: its name or import path) simulating from the region of
    ``truncation_path``, defined by the posterior in ``model`` inside the regions of the
    earlier rounds' posteriors ``within_models`` (round 0's first), stopping below
    ``min_prior_mass`` (the truncation's own floor by default); raises naming the files if
    the truncation is of another task or was made from other posteriors."""
    truncated_for = Truncation.read(truncation_path).task
    if truncated_for != spec:
        raise ValueError(
            f"{truncation_path} is a region of task {truncated_for!r}, not of {spec!r}; "
            "simulate that task's rounds with its own truncation"
        )
    models = [*map(Path, within_models), Path(model)]
    region = load_region(truncation_path, models, task.prior, min_prior_mass=min_prior_mass)
    files = (Path(truncation_path), *(folder / WEIGHTS for folder in models))
    return TruncatedTask(task, region, files)


def load_region(
    truncation_path: Path,
    models: Sequence[Path],
    prior: Prior,
    loaded: dict[Path, tuple[NeuralPosterior, dict]] | None = None,
    min_prior_mass: float | None = None,
) -> TruncatedPrior:
    """The region of ``truncation_path`` for the posteriors in ``models`` (round 0's first, the
    one it was made from last); raises unless those are, in order, the weights that defined
    its levels. ``loaded``: posteriors already in memory (with their JSON), by folder;
    ``min_prior_mass``: as :class:`TruncatedPrior`'s."""
    truncation = Truncation.read(truncation_path)
    levels = truncation.levels
    if len(models) != len(levels):
        raise ValueError(
            f"{truncation_path} is the region of {len(levels)} rounds' posteriors (round 0 "
            f"first), but {len(models)} model folders were given; pass the earlier rounds' "
            "models with --region-models"
        )
    posteriors = []
    for round_index, (folder, level) in enumerate(zip(map(Path, models), levels, strict=True)):
        if file_digest(folder / WEIGHTS) != level["model_digest"]:
            raise ValueError(
                f"{truncation_path} was computed from other weights than {folder / WEIGHTS} "
                f"for its round {round_index} (digest {level['model_digest']}); pass that "
                "round's model, or rerun `pipeline truncate` on these models"
            )
        posterior, document = (loaded or {}).get(folder) or load_posterior(folder)
        if document["task"] != truncation.task:
            raise ValueError(
                f"{truncation_path} truncates task {truncation.task!r}, but {folder} is a "
                f"posterior of {document['task']!r}; pass the models the truncation was "
                "computed from"
            )
        posteriors.append(posterior)
    x_obs = np.asarray(truncation.x_obs, dtype=np.float32).reshape(posteriors[-1].spec.x_shape)
    return TruncatedPrior(prior, posteriors, x_obs, truncation, min_prior_mass)


def region_of_model(
    truncation_path: Path,
    model: Path,
    posterior: NeuralPosterior,
    document: dict,
    within_models: Sequence[Path] = (),
) -> tuple[TruncatedPrior, dict[str, object]]:
    """The region of ``truncation_path`` (its truncated prior), for the posterior loaded
    from ``model`` (which must be the one that defined it; ``document`` its JSON) inside the
    regions of ``within_models``, and what to record of it."""
    truncation = Truncation.read(truncation_path)
    models = [*map(Path, within_models), Path(model)]
    loaded = {Path(model): (posterior, document)}
    region = load_region(truncation_path, models, _prior_of(truncation.task), loaded)
    record = {
        "digest": file_digest(Path(truncation_path)),
        "threshold": truncation.threshold,
        "levels": len(truncation.levels),
    }
    return region, record


def _prior_of(task: str) -> Prior:
    prior = get_task(task).prior
    if prior is None:
        raise ValueError(f"task {task!r} has no prior, so it has no truncated region")
    return prior


def selected_index(observations: Path, index: int) -> int:
    """Which observation of the task's observations ``index`` of ``observations`` is: the
    index it had before ``pipeline select-observation`` picked it, else ``index`` itself."""
    import h5py

    if Path(observations).suffix == ".npy":
        return index
    with h5py.File(observations, "r") as f:
        chosen = f.attrs.get("selected_index")
    return index if chosen is None else int(chosen)


def truncate(
    model: Path,
    observations: Path,
    index: int,
    options: TruncateOptions,
    within: Path | None = None,
    within_models: Sequence[Path] = (),
) -> Truncation:
    """The truncate stage: the region the posterior in ``model`` leaves at observation
    ``index`` of ``observations``, its prior mass, and C2ST against the reference if any.

    With ``within`` (the previous round's truncation, made from ``within_models``, round 0's
    first), the region is the intersection of that region with this posterior's, and its
    prior mass is the intersection's.

    Raises:
        ValueError: If ``observations`` has no observation ``index``, or ``within`` is a
            region of another task or observation.
        TruncationError: If fewer than ``options.min_prior_mass`` of the prior draws fall in
            the region (the next round could not sample it).
        SamplingError: If an NLE posterior's chains at the observation do not converge.
    """
    posterior, document = load_posterior(model)
    task = get_task(document["task"])
    made_for = observation_task(observations)
    if made_for is not None and made_for != document["task"]:
        raise ValueError(
            f"{observations} holds observations of task {made_for!r}, but {model} is a "
            f"posterior of task {document['task']!r}; truncate with the model of that task"
        )
    if Path(observations).suffix == ".npy":
        raise ValueError(
            f"truncate reads an observations file, and {observations} is a NumPy array: make "
            f"one with `pipeline observe --task {document['task']} --from {observations} --out "
            "observations.h5`"
        )
    _, xs, references = read_reference(observations)
    if xs.shape[1:] != tuple(posterior.spec.x_shape):
        raise ValueError(
            f"{observations}: observations have shape {xs.shape}, expected (n_obs, "
            f"{', '.join(map(str, posterior.spec.x_shape))}) for the posterior in {model}"
        )
    if not 0 <= index < len(xs):
        raise ValueError(
            f"{observations} holds {len(xs)} observations; there is no observation {index} "
            f"(rounds.observation counts from 0)"
        )
    x_obs = xs[index].astype(np.float32)
    outer = None
    if within is not None:
        outer = load_region(within, within_models, task.prior)
        if outer.truncation.task != document["task"] or not np.array_equal(
            outer.x_obs.numpy().reshape(-1), x_obs.reshape(-1)
        ):
            raise ValueError(
                f"{within} is a region of task {outer.truncation.task!r} at another observation "
                f"than observation {index} of {observations}; truncate each round within the "
                "previous round's region of the same observation"
            )
    torch.manual_seed(options.seed)
    spec = posterior.spec
    low, high = spec.box()
    settings = EnsembleSettings(max_extensions=options.mcmc_extensions)
    draws = sample_posterior(
        posterior, x_obs[None], options.draws, low=low, high=high, mcmc=settings
    )
    if not draws.sampled[0]:
        rhat, ess = float(draws.mcmc["rhat"][0]), float(draws.mcmc["ess"][0])
        raise SamplingError(
            f"the MCMC chains of {model}'s posterior at observation {index} did not converge "
            f"(R-hat {rhat:.3f}, ESS {ess:.0f} of {options.draws} draws) after "
            f"{settings.max_extensions} extensions, so they cannot set the region's threshold; "
            "raise rounds.mcmc_extensions (each doubles the thinning), or train a smoother "
            "likelihood (an ensemble of flows)"
        )
    threshold = float(np.quantile(draws.log_prob[0].astype(np.float64), options.quantile))
    partial = Truncation(
        task=document["task"],
        threshold=threshold,
        quantile=options.quantile,
        prior_mass=1.0,
        num_draws=options.draws,
        num_prior_draws=options.prior_draws,
        min_prior_mass=options.min_prior_mass,
        model_digest=file_digest(Path(model) / WEIGHTS),
        observation={
            "file": file_digest(Path(observations)),
            "index": index,
            "selected_index": selected_index(observations, index),
        },
        x_obs=x_obs.reshape(-1).astype(float).tolist(),
        within=[] if outer is None else outer.truncation.levels,
    )
    posteriors = [posterior] if outer is None else [*outer.posteriors, posterior]
    region = TruncatedPrior(task.prior, posteriors, x_obs, partial)
    rng = np.random.default_rng([options.seed, 1])
    mass = float(region.accepts(task.prior.sample(options.prior_draws, rng)).mean())
    log.info(
        "threshold %.3f (quantile %g); prior mass of the region %.3g",
        threshold,
        options.quantile,
        mass,
    )
    if mass < options.min_prior_mass:
        raise TruncationError(
            f"{mass * options.prior_draws:.0f} of {options.prior_draws} prior draws fell in the "
            f"region of {model} at observation {index} (prior mass {mass:.2e}, below "
            f"min_prior_mass {options.min_prior_mass:g}): {region_advice(options.quantile)}"
        )
    accepted = round(mass * options.prior_draws)
    if accepted < PRECISE_MASS_DRAWS:
        # The next rounds' proposal weighs each round by one over its region's mass.
        log.warning(
            "the region's prior mass %.3g rests on %d of %d prior draws (relative standard "
            "error about %.0f %%), which the rounds' proposal weights inherit; raise "
            "rounds.prior_draws (truncate's prior_draws) to at least %d",
            mass,
            accepted,
            options.prior_draws,
            100 * math.sqrt((1 - mass) / max(accepted, 1)),
            math.ceil(PRECISE_MASS_DRAWS / mass),
        )
    score = None
    if references is not None:
        score = c2st(references[index], draws.samples[0], seed=options.seed)
        log.info("C2ST against the reference at observation %d: %.3f", index, score)
    return Truncation(**{**asdict(partial), "prior_mass": mass, "c2st": score})

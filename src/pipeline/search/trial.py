"""One trial of a hyperparameter search: propose options, train, score on held-out simulations.

Trials run in generations of ``parallel``: trial ``i`` is proposed by Optuna's TPE sampler,
seeded by ``(seed, i)``, from the results of every trial of the earlier generations, and of no
other. Its options therefore depend on the config and the data alone, never on which jobs
happened to finish first, so a search gives the same trials on a laptop, on a cluster, and after
a kill (Snakemake reruns only the trials without a score). The earlier results reach the trial as
files (their ``score.json``), so no database is shared between jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from pipeline import atomic
from pipeline.data import SimulationDataModule
from pipeline.diagnostics.coverage import DEFAULT_LEVELS, hpd_coverage, max_coverage_deviation
from pipeline.models.posterior import NeuralPosterior, load_posterior
from pipeline.options import SearchOptions
from pipeline.provenance import config_digest, provenance
from pipeline.sampling import SamplingError, log_prob_of, sample_posterior
from pipeline.search.records import SearchError, TrialRecord, history_of, read_trial
from pipeline.search.space import SearchSpace
from pipeline.storage import DataFileError, data_digest, read_attrs
from pipeline.training import TrainConfig, TrainingDiverged, train

__all__ = ["HeldOut", "held_out_score", "propose", "run_trial", "search_identity"]

# Held-out rows below which a trial's loss has no usable standard error.
MIN_HELD_OUT = 10

log = logging.getLogger(__name__)
SCORE, MODEL = "score.json", "model"


def search_identity(
    task: str, data_digest: str, base: TrainConfig, space: SearchSpace, options: SearchOptions
) -> dict[str, Any]:
    """Everything a trial's proposal and score depend on: a trial whose identity differs is of
    another search. ``trials`` and ``tolerance`` are left out: more trials or another tolerance
    keep the trials already run."""
    return {
        "task": task,
        "data_digest": data_digest,
        "base": json.loads(json.dumps(base.shaping(space.names))),
        "space": space.as_dict(),
        "seed": options.seed,
        "parallel": options.parallel,
        "startup": options.startup,
        "held_out": options.held_out,
        "coverage_samples": options.coverage_samples,
        "members": options.members,
    }


def propose(
    space: SearchSpace, history: list[TrialRecord], seed: int, trial: int, startup: int
) -> dict[str, Any]:
    """Optuna's proposal for trial ``trial`` given ``history``: TPE seeded by ``(seed, trial)``,
    at random while fewer than ``startup`` trials completed. Returns Optuna's params."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_seed = int(np.random.SeedSequence([seed, trial]).generate_state(1)[0])
    sampler = optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=startup)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    distributions = space.distributions()
    for record in history:
        # A trial that diverged, or gave a held-out truth zero density, tells TPE nothing to
        # model a loss on; Optuna keeps it as failed.
        scored = record.complete and math.isfinite(record.loss)
        state = optuna.trial.TrialState.COMPLETE if scored else optuna.trial.TrialState.FAIL
        value = record.loss if scored else None
        study.add_trial(
            optuna.trial.create_trial(
                state=state, value=value, params=record.params, distributions=distributions
            )
        )
    return study.ask(distributions).params


@dataclass(frozen=True)
class HeldOut:
    """A posterior's score on held-out simulations: the loss NPE minimises, and HPD coverage."""

    loss: float
    loss_se: float
    coverage: np.ndarray  # at DEFAULT_LEVELS
    num_rows: int
    rows_digest: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "loss_se": self.loss_se,
            "coverage_max_deviation": max_coverage_deviation(DEFAULT_LEVELS, self.coverage),
            "coverage": self.coverage.tolist(),
            "levels": DEFAULT_LEVELS.tolist(),
            "num_rows": self.num_rows,
            "rows_digest": self.rows_digest,
        }


def held_out_score(
    posterior: NeuralPosterior, theta: np.ndarray, x: np.ndarray, num_samples: int, seed: int
) -> HeldOut:
    """Scores ``posterior`` on held-out pairs ``theta`` (n, D), ``x`` (n, *x_shape): the mean
    negative log-density of the true theta with its standard error, and HPD coverage from
    ``num_samples`` draws per pair inside the prior."""
    torch.manual_seed(seed)
    log_q = log_prob_of(posterior, theta, x).astype(float)
    spec = posterior.spec
    low, high = spec.box()
    draws = sample_posterior(posterior, x, num_samples, low=low, high=high)
    nll = -log_q
    # A truth of zero density is as bad a score as there is; it must not be averaged away.
    loss = float(nll.mean()) if np.isfinite(nll).all() else math.inf
    return HeldOut(
        loss=loss,
        loss_se=float(nll.std(ddof=1) / math.sqrt(len(nll))) if math.isfinite(loss) else math.inf,
        coverage=hpd_coverage(draws.log_prob, log_q),
        num_rows=len(theta),
        rows_digest=hashlib.sha256(np.ascontiguousarray(theta, np.float32).tobytes()).hexdigest(),
    )


def validation_rows(data: Path, config: TrainConfig, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` pairs of the validation split that training with ``config`` held
    out: theta (n, D), x (n, *x_shape). The same rows for every trial that loads the data into
    memory (the split depends on ``seed`` and ``val_fraction``, which a search never varies)."""
    datamodule = SimulationDataModule(
        data, config.val_fraction, config.batch_size, config.seed, loading=config.loading
    )
    datamodule.setup("validate")
    thetas, xs, count = [], [], 0
    for theta, x in datamodule.val_dataloader():
        thetas.append(theta.numpy())
        xs.append(x.numpy())
        count += len(theta)
        if count >= limit:
            break
    if count < MIN_HELD_OUT:
        raise SearchError(
            f"{data}: training holds out {count} rows (val_fraction {config.val_fraction}), "
            f"and a trial's held-out loss needs at least {MIN_HELD_OUT} for its standard "
            "error, by which trials are compared; raise val_fraction or simulate more"
        )
    return np.concatenate(thetas)[:limit], np.concatenate(xs)[:limit]


def run_trial(
    data: Path,
    out: Path,
    base: TrainConfig,
    space: SearchSpace,
    options: SearchOptions,
    trial: int,
    history: list[Path],
    *,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Runs trial ``trial``: proposes its options from the ``history`` files (the earlier
    generations' ``score.json``), trains into ``out/model`` and writes ``out/score.json``.

    A trial whose training diverges is recorded as failed (the search goes on without it).
    Returns the score document on the global rank 0, ``None`` on other ranks.

    Raises:
        FileExistsError: If ``out/score.json`` exists and ``overwrite`` is false.
        SearchError: If the history is of another search or not exactly the earlier trials.
    """
    out = Path(out)
    atomic.check_new(out / SCORE, overwrite=overwrite)
    attrs = read_attrs(data)
    if "task" not in attrs:
        raise DataFileError(f"{data} names no task (attribute 'task'); simulate or import it")
    identity = search_identity(attrs["task"], data_digest(attrs), base, space, options)
    space.check_against(base, "search.space")
    digest = config_digest(identity)
    records = history_of([read_trial(p, digest) for p in history], trial, options.parallel)
    params = propose(space, records, options.seed, trial, options.startup)
    searched = space.options(params)
    # A trial trains `members` flows whatever `base.ensemble`: the options are searched for one
    # member, and the final model trains the task's ensemble of them.
    config = base.replaced(
        searched | {"ensemble": options.members}, source=f"search trial {trial}"
    )
    log.info("trial %d proposes %s", trial, json.dumps(searched, sort_keys=True))
    document: dict[str, Any] = {
        "kind": "search-trial",
        "task": attrs["task"],
        "trial": trial,
        "generation": trial // options.parallel,
        "search_digest": digest,
        "search": identity,
        "history": [r.trial for r in records],
        "params": params,
        "options": searched,
        "train_config": config.as_dict(),
        "provenance": provenance(identity),
    }
    try:
        metadata = train(data, out / MODEL, config, overwrite=overwrite)
    except TrainingDiverged as error:
        log.warning("trial %d failed: %s", trial, error)
        document |= {"status": "diverged", "message": str(error), "held_out": None}
        document["training"] = None
    else:
        if metadata is None:
            return None
        document["training"] = {
            k: metadata[k] for k in ("epochs", "best_val_loss", "train_seconds", "loading")
        }
        # The rows training held out, however it loaded the data (memory and streaming split
        # differently).
        held_out_config = config.replaced({"loading": metadata["loading"]})
        document |= _scored(out, data, held_out_config, options, trial)
        _check_same_rows(document, records)
    atomic.write_json(out / SCORE, document, indent=1, sort_keys=True)
    held_out = document["held_out"]
    if held_out is not None:
        log.info(
            "trial %d: held-out loss %.4f +- %.4f, HPD coverage off the diagonal by at most %.3f",
            trial,
            held_out["loss"],
            held_out["loss_se"],
            held_out["coverage_max_deviation"],
        )
    return document


def _scored(
    out: Path, data: Path, config: TrainConfig, options: SearchOptions, trial: int
) -> dict[str, Any]:
    """The trial's status and held-out score; a posterior that cannot be sampled inside the
    prior at a held-out simulation is a failed trial, as a diverged one is."""
    posterior, _ = load_posterior(out / MODEL)
    theta, x = validation_rows(data, config, options.held_out)
    try:
        score = held_out_score(posterior, theta, x, options.coverage_samples, options.seed)
    except SamplingError as error:
        log.warning("trial %d failed: %s", trial, error)
        return {"status": "unsampled", "message": str(error), "held_out": None}
    return {"status": "complete", "message": "", "held_out": score.as_dict()}


def _check_same_rows(document: dict[str, Any], records: list[TrialRecord]) -> None:
    """Refuses a trial scored on other held-out simulations than the earlier trials: their
    losses could not be compared."""
    held_out = document["held_out"]
    earlier = {r.held_out_digest for r in records if r.held_out_digest is not None}
    if held_out is not None and earlier and held_out["rows_digest"] not in earlier:
        raise SearchError(
            f"trial {document['trial']} held out other simulations than the earlier trials "
            "(streamed data are split by batch_size): remove batch_size from search.space or "
            "set train.loading to memory, and run the search again"
        )

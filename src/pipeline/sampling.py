"""The sample stage: posterior samples and their log-densities for many observations at once.

For a prior with bounded support the flow may put a little mass outside it; samples outside the
box are rejected and redrawn (as the ``sbi`` package does), vectorised over observations. A
likelihood estimator (NLE) is sampled by MCMC instead (:mod:`pipeline.ensemble`), which stays
inside the prior by construction and vouches for each observation's chains by R-hat and ESS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch

from pipeline import atomic, storage
from pipeline.ensemble import EnsembleSettings, Support, sample_ensemble
from pipeline.models.flow_matching import TOLERANCE as ODE_TOLERANCE
from pipeline.models.posterior import WEIGHTS, NeuralPosterior, load_posterior
from pipeline.options import SampleOptions
from pipeline.progress import Progress
from pipeline.provenance import file_digest, provenance
from pipeline.resources import require_room

log = logging.getLogger(__name__)

# Draws per flow call (observations x draws per observation): bounds memory, which the flow's
# intermediate tensors dominate, and sets how often progress is logged. On CPU, calls of 2**16
# draws of slcp's four spline flows peak at 1.7 GB where 2**18 peak at 3.8 GB, and run 1.1-1.5
# times faster (benchmarks/README.md); a GPU keeps the larger calls, as does an NLE posterior's
# MCMC, whose chains per call it bounds.
SAMPLES_PER_CALL = 2**18
CPU_SAMPLES_PER_CALL = 2**16
# An FMPE draw on CPU is an ODE solve (about 4 ms with its density at ten parameters): a call of
# CPU_SAMPLES_PER_CALL draws would log progress every four minutes. Its ODE is solved by
# chunks of one observation anyway, so smaller calls cost nothing there; a GPU solves a call at
# once and keeps the large calls.
FMPE_CPU_SAMPLES_PER_CALL = 2**14
# Give up on an observation when fewer than this fraction of its samples land in the prior box.
MIN_ACCEPTANCE = 1e-3
# Restricted to a round's region, a test simulation near the region's edge may keep only a sliver
# of its posterior inside: it is sampled down to this acceptance (after 1 / it draws), then left
# out of the samples and counted, rather than failing every other observation.
REGION_MIN_ACCEPTANCE = 1e-4
# Draws per observation of the first pass restricted to a region, which may accept few of them:
# larger passes reach a verdict in fewer of them.
REGION_FIRST_DRAWS = 4096
# Draws per observation of a pass after the first is at least this: a handful of missing samples
# would otherwise take several passes, each an ODE solve for FMPE.
MIN_REDRAW = 128
# Seconds between progress lines of a rejection from a region that goes on.
PROGRESS_SECONDS = 30.0


class SamplingError(RuntimeError):
    """A posterior puts (almost) no mass inside the prior at some observation."""


class OutsidePriorError(SamplingError):
    """Some observations' posteriors put under :data:`MIN_ACCEPTANCE` of their mass inside the
    prior: ``rows`` are theirs, in the file."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


class Region(Protocol):
    """A sequential round's truncated prior (:class:`pipeline.rounds.region.TruncatedPrior`):
    the region a posterior trained on its simulations is valid in."""

    def accepts(self, theta: np.ndarray) -> np.ndarray:
        """Which rows of ``theta`` (k, D) lie in the region: ``(k,)`` booleans."""
        ...

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws of the prior restricted to the region, shape ``(n, D)``."""
        ...


@dataclass
class PosteriorSamples:
    """Posterior draws for ``n`` observations.

    Attributes:
        samples: Shape ``(n, M, D)``.
        log_prob: log q(sample | x), shape ``(n, M)``.
        sampled: Which observations were sampled, shape ``(n,)``; observations whose
            posterior has too little mass in a region, or whose MCMC did not converge, are
            not (their rows are NaN).
        mcmc: For NLE, each observation's chain diagnostics, shape ``(n,)`` each: ``rhat``,
            ``ess``, ``acceptance``, ``thin``, ``converged``.
    """

    samples: np.ndarray
    log_prob: np.ndarray
    sampled: np.ndarray | None = None
    mcmc: dict[str, np.ndarray] | None = None


def read_observations(
    path: Path, x_shape: tuple[int, ...], num_parameters: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads observations ``x`` (n, *x_shape) and, from HDF5 files, true ``theta`` (n, D) if any.

    ``path`` is a ``.npy`` array or an HDF5 file with a dataset ``x`` (optionally ``theta``,
    checked to have ``num_parameters`` columns where given). A single observation of shape
    ``x_shape`` is promoted to a batch of one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"observation file {path} does not exist")
    theta = None
    if path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    else:
        try:
            with h5py.File(path, "r") as f:
                if "x" not in f:
                    raise storage.DataFileError(f"{path} has no dataset 'x'")
                x = f["x"][...]
                theta = f["theta"][...] if "theta" in f else None
        except OSError as error:
            raise storage.unreadable(path, error) from None
    if x.shape == tuple(x_shape):
        x = x[None]
    if len(x) == 0:
        raise ValueError(f"{path} holds no observations (x has 0 rows)")
    if x.shape[1:] != tuple(x_shape):
        raise ValueError(
            f"{path}: observations have shape {x.shape}, expected "
            f"(n_obs, {', '.join(map(str, x_shape))}) for this model"
        )
    expected = (len(x), num_parameters)
    if theta is not None and num_parameters is not None and theta.shape != expected:
        raise ValueError(
            f"{path}: theta has shape {theta.shape}, expected {expected} (one "
            f"row of the model's {num_parameters} parameters per observation); the file was "
            "not written for this model's task"
        )
    return x.astype(np.float32), theta


def recorded_attrs(path: Path) -> dict[str, Any]:
    """The decoded attributes of an HDF5 observation or simulation file: what made it; none
    for ``.npy`` arrays and missing files (read_observations names those)."""
    path = Path(path)
    if path.suffix == ".npy" or not path.exists():
        return {}
    try:
        with h5py.File(path, "r") as f:
            return {key: storage.decode_attr(value) for key, value in f.attrs.items()}
    except OSError as error:
        raise storage.unreadable(path, error) from None


def outside_prior(rows: list[int], observations: Path, drawn: bool) -> SamplingError:
    """The error for ``rows`` of ``observations`` whose posteriors lie outside the prior, with
    what it means where the simulator drew them from the prior (``drawn``: test simulations,
    synthetic observations; the model's failure) or for data (unlike the simulations)."""
    named = ", ".join(map(str, rows[:10])) + (
        f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    )
    where = f"fewer than {MIN_ACCEPTANCE:.0e} of the posterior samples at rows {named}"
    where += f" of {observations}"
    if drawn:
        return SamplingError(
            f"{where} fall inside the prior, though the simulator drew them from it: the model "
            "has not learned the posterior there. Check that they are drawn like the training "
            "simulations (an archive's rows in random order), and train on more simulations "
            "or longer"
        )
    return SamplingError(
        f"{where} fall inside the prior: those observations lie far outside what the simulator "
        "produces (a unit or scale mistake, a systematic the simulator lacks), so no posterior "
        "within the prior explains them. Fix them or the simulator, or leave them out of the "
        "observations file to sample the others"
    )


def task_definition(attrs: dict[str, Any]) -> str | None:
    """The digest of a user's task's definition a file (``attrs``: its attributes) records,
    None for a built-in task. Simulations drawn from a round's region record the task with the
    region's files; their proposal keeps the task's own, which a stack of rounds records."""
    proposal = attrs.get("proposal") if isinstance(attrs.get("proposal"), dict) else {}
    return proposal.get("task_digest") or attrs.get("task_digest")


def same_definition(digest: str | None, attrs: dict[str, Any]) -> bool | None:
    """Whether a file (``attrs``) holds data of the user's task definition ``digest`` (a
    model's or its samples'), whatever path named the task; None where either side records
    none (a built-in task, a file of an older version): then names tell tasks apart."""
    theirs = task_definition(attrs)
    return None if digest is None or theirs is None else digest == theirs


def check_same_task(
    recorded: dict[str, Any], document: dict[str, Any], observations: Path, model: Path
) -> None:
    """Refuses observations (``recorded``: their file's attributes) of another task than the
    posterior's (``document``: its ``posterior.json``). A user's task is one definition, its
    files' digest, whatever path named it; other tasks are told apart by name and parameters.
    """
    made_for = recorded_task(recorded)
    same = same_definition(document.get("task_digest"), recorded)
    if same is False:
        raise ValueError(
            f"{observations} holds observations of another definition of task {made_for!r} "
            f"(its files' digest {task_definition(recorded)}) than {model} was trained on "
            f"({document['task']!r}, digest {document['task_digest']}): the task's files "
            "changed since, or they are another project's of the same name; sample with a "
            "model of that definition"
        )
    if same:
        return
    if made_for is not None and made_for != document["task"]:
        raise ValueError(
            f"{observations} holds observations of task {made_for!r}, but {model} is a "
            f"posterior of task {document['task']!r}; sample with the model of that task"
        )
    names = recorded.get("parameter_names")
    if names is not None and list(names) != list(document["parameter_names"]):
        raise ValueError(
            f"{observations} holds observations of a task with parameters {list(names)}, but "
            f"{model} is a posterior of {list(document['parameter_names'])}; sample with the "
            "model of that task"
        )


def check_drawn_from(observations: Path, attrs: dict[str, Any], truncation: Path | None) -> None:
    """Refuses to sample test simulations (``attrs``: their file's) restricted to another
    region than the one their parameters were drawn from (``--truncation``; none for the
    prior): the posterior of a simulation drawn from a round's region is the posterior
    restricted to that region, and coverage scored against any other would be wrong without a
    sign of it."""
    drawn_from = (attrs.get("proposal") or {}).get("truncation")
    expected = None if truncation is None else file_digest(Path(truncation))
    if drawn_from == expected:
        return
    if expected is None:
        raise ValueError(
            f"{observations} holds simulations drawn from a round's region (its truncation "
            f"file's digest {drawn_from}), whose posterior is restricted to it: sample them "
            "with --truncation (that truncation file) and --region-models"
        )
    if drawn_from is None:
        raise ValueError(
            f"{observations} holds parameters drawn from the prior, not from the region of "
            f"{truncation}, so their posterior is not restricted to it: sample them without "
            f"--truncation, or simulate the test set with --truncation {truncation}"
        )
    raise ValueError(
        f"{observations} was drawn from another region (truncation digest {drawn_from}) than "
        f"{truncation} ({expected}): sample it with the truncation it was drawn from"
    )


def check_held_out(observations: Path, attrs: dict[str, Any], document: dict, model: Path) -> None:
    """Refuses test simulations (``attrs``: their file's) that share rows with the model's
    training data (``document`` its JSON): drawn with one of its seeds (a round's included), or
    imported from the same rows of the same archive. Coverage on them reads a fit to its own
    data as calibration. Synthetic observations drawn with a training seed are refused too."""
    trained = document.get("data", {})
    if not holds_simulations(attrs):
        # `pipeline observe`'s file: observation j draws its theta as block j's first row does.
        if "num_reference_samples" in attrs and attrs.get("seed") in trained.get("seeds", []):
            raise ValueError(
                f"{observations} was drawn with seed {attrs['seed']}, a seed of the data "
                f"{model} was trained on: its observation j repeats the parameters of training "
                "row j x seed_block_size. Draw the observations with another seed "
                "(observations.seed)"
            )
        return
    shared = sorted(set(storage.simulation_seeds(attrs)) & set(trained.get("seeds", [])))
    if shared:
        raise ValueError(
            f"{observations} was simulated with seed {shared[0]}, a seed of the data {model} "
            "was trained on: its rows repeat training rows. Sample held-out simulations "
            "(another seed: simulate.test_seed)"
        )
    mine, theirs = storage.imported_rows(attrs), trained.get("imported")
    if mine and theirs and _same_array(mine["x"], theirs["x"]):
        (start, stop), (low, high) = mine["rows"], theirs["rows"]
        if start < high and low < stop:
            raise ValueError(
                f"{observations} holds rows {start}-{stop - 1} of the archive whose rows "
                f"{low}-{high - 1} {model} was trained on: they share rows "
                f"{max(start, low)}-{min(stop, high) - 1}. Import held-out rows (--rows) as the "
                "test set"
            )


def _same_array(a: str, b: str) -> bool:
    """Whether two imports' ``x`` (``sha256:member``) may be one array: one file, and one
    member, or a member an earlier version recorded as typed (none, ``/x``, ``x.npy``) that
    may name it. Wrongly alike refuses a test set; wrongly apart would pass shared rows."""
    (sha_a, _, member_a), (sha_b, _, member_b) = a.partition(":"), b.partition(":")
    if sha_a != sha_b:
        return False
    member_a, member_b = (m.strip("/").removesuffix(".npy") for m in (member_a, member_b))
    return not member_a or not member_b or member_a == member_b


def holds_simulations(attrs: dict[str, Any]) -> bool:
    """Whether a file (``attrs``: its attributes) is a file of simulations (``pipeline
    simulate``'s, an import's or a round's, which record ``num_simulations``): a test set,
    whose unconverged MCMC chains are left out of coverage, not observations, where they are
    an error."""
    return "num_simulations" in attrs


def observation_task(path: Path) -> str | None:
    """The task an HDF5 observation or simulation file says it holds; None for ``.npy`` arrays
    and files that do not say."""
    return recorded_task(recorded_attrs(path))


def recorded_task(attrs: dict[str, Any]) -> str | None:
    """The task a file's attributes ``attrs`` name, or None."""
    task = attrs.get("task")
    return None if task is None else str(task)


def sample_posterior(
    posterior: NeuralPosterior,
    x: np.ndarray,
    num_samples: int,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    region: Region | None = None,
    mcmc: EnsembleSettings | None = None,
    iid: bool = False,
    densities: bool = True,
    rows: np.ndarray | None = None,
) -> PosteriorSamples:
    """Draws ``num_samples`` posterior samples per observation, restricted to ``[low, high]``
    and, if given, to ``region``; an NLE posterior by MCMC with the settings ``mcmc``, and with
    ``iid`` one posterior given all rows of ``x`` as independent observations (NLE only).

    Arguments:
        posterior: The trained estimator (eval mode).
        x: Observations, shape ``(n, *x_shape)``.
        num_samples: Samples ``M`` per observation.
        low, high: Prior box, shape ``(D,)``; ``None`` for unbounded priors.
        region: The region the posterior is valid in: a sequential round's truncated prior.
        mcmc: The ensemble sampler's settings (NLE only); default :class:`EnsembleSettings`.
        densities: With ``False``, draws without their densities (``log_prob`` is NaN), which
            for FMPE is several times faster; NPE and FMPE only.
        rows: Each observation's row in its file (``(n,)``; by default its index in ``x``), by
            which messages name it.
    """
    if posterior.is_likelihood:
        if not densities:
            raise ValueError("an NLE posterior's MCMC evaluates its density at every step")
        if iid and region is not None:
            raise ValueError("independent observations (iid) cannot be restricted to a region")
        settings = mcmc or EnsembleSettings()
        return sample_likelihood_posterior(
            posterior, x, num_samples, settings, iid=iid, region=region
        )
    if iid:
        raise ValueError(
            f"--iid combines independent observations into one posterior, which needs a "
            f"likelihood: this model is {posterior.spec.method}; train with method nle"
        )
    n, dim = len(x), len(posterior.spec.parameter_names)
    samples = np.empty((n, num_samples, dim), dtype=np.float32)
    log_prob = np.empty((n, num_samples), dtype=np.float32)
    sampled = np.ones(n, dtype=bool)
    # The first pass draws the most per observation; the call's size bounds it.
    per_call = max(1, _samples_per_call(posterior) // _first_draws(num_samples, region))
    progress = Progress(n, "observations", log)
    for start in range(0, n, per_call):
        stop = min(start + per_call, n)
        batch = torch.as_tensor(x[start:stop])
        s, lp, ok = _sample_batch(
            posterior,
            batch,
            num_samples,
            low,
            high,
            region,
            densities,
            rows=np.arange(start, stop) if rows is None else rows[start:stop],
        )
        samples[start:stop], log_prob[start:stop], sampled[start:stop] = s, lp, ok
        progress.update(stop - start)
    return PosteriorSamples(samples, log_prob, sampled)


def _samples_per_call(posterior: NeuralPosterior) -> int:
    """Draws per call of the posterior: fewer on CPU, fewest for FMPE there."""
    if posterior.theta_mean.device.type != "cpu":
        return SAMPLES_PER_CALL
    return FMPE_CPU_SAMPLES_PER_CALL if posterior.spec.method == "fmpe" else CPU_SAMPLES_PER_CALL


def sample_likelihood_posterior(
    posterior: NeuralPosterior,
    x: np.ndarray,
    num_samples: int,
    settings: EnsembleSettings,
    *,
    iid: bool = False,
    region: Region | None = None,
) -> PosteriorSamples:
    """``num_samples`` draws of ``q(x | theta) p(theta)`` per observation ``x`` (n, F) by the
    batched ensemble sampler, from the prior's draws; observations whose chains fail R-hat or
    ESS are marked not sampled (NaN rows), with their diagnostics kept.

    With ``iid``, the ``n`` rows are independent observations of one ``theta``: one posterior,
    ``prod_i q(x_i | theta) p(theta)``, of shape ``(1, M, D)``.

    With ``region`` (a round's truncated prior), the target is that posterior restricted to the
    region: it is zero outside, and the chains start from the truncated prior's draws. Unlike
    a flow's draws, nothing is rejected afterwards, so no observation is left out for lack of
    mass in the region.

    Raises:
        TruncationError: If the region is too small to draw the chains' starting points from
            by rejection (the truncated prior's own check).
    """
    if iid:
        return _sample_iid(posterior, x, num_samples, settings)
    n, dim = len(x), len(posterior.spec.parameter_names)
    prior = posterior.prior
    # The prior's draws come from NumPy: seed it from torch's generator, which the stage seeds.
    rng = np.random.default_rng(int(torch.randint(2**62, ())))
    # Observations per call, bounded by the draws and candidates of the smallest ensemble.
    per_call = max(1, SAMPLES_PER_CALL // max(num_samples, settings.sized(1, 0).candidates))
    inside, support = None, None
    if region is not None:
        support = _support_of(region)
        # Enough for the walkers of the largest call; smaller calls pick fewer among them.
        count = settings.sized(min(per_call, n), num_samples).candidates
        draws = region.sample(count, rng)
        inside = torch.as_tensor(draws, dtype=torch.float32)[None]  # (1, candidates, D)
    samples = np.empty((n, num_samples, dim), dtype=np.float32)
    log_prob = np.empty((n, num_samples), dtype=np.float32)
    mcmc: dict[str, np.ndarray] = {}
    progress = Progress(n, "observations", log)
    for start in range(0, n, per_call):
        stop = min(start + per_call, n)
        batch = torch.as_tensor(x[start:stop], dtype=torch.float32)
        sized = settings.sized(stop - start, num_samples)

        def target(theta: torch.Tensor, rows: torch.Tensor, batch: torch.Tensor = batch):
            # (n', W, D) walkers -> the posterior's (W, n', D) layout and back.
            return posterior.log_prob(theta.transpose(0, 1), batch[rows]).transpose(0, 1)

        if inside is None:
            candidates = prior.sample((stop - start) * sized.candidates, rng)
            candidates = torch.as_tensor(candidates, dtype=torch.float32)
            candidates = candidates.reshape(stop - start, sized.candidates, dim)
        else:
            # One set of draws in the region serves every observation: each picks its own
            # walkers among them by its own density.
            candidates = inside.expand(stop - start, -1, -1)
        result = sample_ensemble(target, candidates, num_samples, settings, support)
        samples[start:stop], log_prob[start:stop] = result.samples, result.log_prob
        for name, values in result.diagnostics.items():
            mcmc.setdefault(name, np.empty(n, dtype=values.dtype))[start:stop] = values
        progress.update(stop - start)
    return _flagged(samples, log_prob, mcmc)


def _support_of(region: Region) -> Support:
    """Which walkers ``(k, D)`` lie in ``region``, as the ensemble sampler asks."""

    def inside(theta: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(region.accepts(theta.numpy()))

    return inside


def _sample_iid(
    posterior: NeuralPosterior, x: np.ndarray, num_samples: int, settings: EnsembleSettings
) -> PosteriorSamples:
    """One posterior from the independent rows of ``x`` (see sample_likelihood_posterior)."""
    rng = np.random.default_rng(int(torch.randint(2**62, ())))
    x_all = torch.as_tensor(x, dtype=torch.float32)

    def target(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return posterior.iid_log_prob(theta, x_all)  # (1, W, D) -> (1, W)

    candidates = posterior.prior.sample(settings.sized(1, num_samples).candidates, rng)
    candidates = torch.as_tensor(candidates, dtype=torch.float32)[None]
    result = sample_ensemble(target, candidates, num_samples, settings)
    return _flagged(result.samples.copy(), result.log_prob.copy(), result.diagnostics)


def _flagged(
    samples: np.ndarray, log_prob: np.ndarray, mcmc: dict[str, np.ndarray]
) -> PosteriorSamples:
    """MCMC's samples with the rows of unconverged observations NaN and marked not sampled."""
    converged = mcmc["converged"]
    samples[~converged], log_prob[~converged] = np.nan, np.nan
    return PosteriorSamples(samples, log_prob, converged.copy(), mcmc)


@torch.no_grad()
def _sample_batch(
    posterior: NeuralPosterior,
    x: torch.Tensor,
    num_samples: int,
    low: np.ndarray | None,
    high: np.ndarray | None,
    region: Region | None = None,
    densities: bool = True,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples, log-densities (NaN without ``densities``) and which observations were sampled
    (see PosteriorSamples); ``rows``: each observation's row in its file, for messages."""
    n, dim = len(x), len(posterior.spec.parameter_names)
    named = np.arange(n) if rows is None else np.asarray(rows)
    samples = np.full((n, num_samples, dim), np.nan, dtype=np.float32)
    log_prob = np.full((n, num_samples), np.nan, dtype=np.float32)
    filled = np.zeros(n, dtype=np.int64)
    drawn = np.zeros(n, dtype=np.int64)
    sampled = np.ones(n, dtype=bool)
    short = np.arange(n)
    first = count = _first_draws(num_samples, region)
    start = last_log = time.monotonic()
    while len(short):
        # Only observations still missing samples are redrawn: one observation whose posterior
        # leans on the prior's edge must not make every other observation pay for it.
        # Each call's draws are kept as they come: a pass of 10^6 draws at one observation
        # never sits whole in memory beside the samples.
        for theta, lp in _draw(posterior, x[short], count, densities):
            inside = np.isfinite(lp) if densities else np.isfinite(theta).all(axis=-1)
            if low is not None:
                inside &= np.all((theta >= low) & (theta <= high), axis=-1)
            if region is not None:
                inside[inside] = region.accepts(theta[inside])
            _fill(samples, log_prob, filled, theta, lp, inside, short)
        drawn[short] += count
        if region is not None:
            hopeless = (filled < REGION_MIN_ACCEPTANCE * drawn) & (
                drawn >= 1 / REGION_MIN_ACCEPTANCE
            )
            sampled &= ~hopeless
        else:
            # Judged on enough draws to tell: 0 of 50 inside says nothing about 1e-3.
            hopeless = (filled < MIN_ACCEPTANCE * drawn) & (drawn >= 1 / MIN_ACCEPTANCE)
            if hopeless.any():
                rows = named[np.flatnonzero(hopeless)].tolist()
                raise OutsidePriorError(
                    f"fewer than {MIN_ACCEPTANCE:.0e} of the posterior samples of observation(s) "
                    f"{', '.join(map(str, rows[:10]))} fall inside the prior: the observations "
                    "are likely outside what the model was trained on (check their shape, "
                    "units and scale)",
                    rows,
                )
        short = np.flatnonzero((filled < num_samples) & sampled)
        if len(short):
            count = _redraw_count(num_samples - filled[short], filled[short], drawn[short], first)
        if region is not None and len(short) and time.monotonic() - last_log > PROGRESS_SECONDS:
            last_log = time.monotonic()
            _log_rejection(
                num_samples - filled[short], filled[short], drawn[short], last_log - start
            )
    samples[~sampled], log_prob[~sampled] = np.nan, np.nan
    return samples, log_prob, sampled


def _draw(
    posterior: NeuralPosterior, x: torch.Tensor, count: int, densities: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``count`` draws per observation of ``x`` (n', *x_shape) and their log-densities (NaN
    without ``densities``), one flow call at a time: shapes (n', k, D) and (n', k), ``k`` at
    most a call's draws. The observations per call already bound most calls; one observation
    asked for more draws than a call holds (``truncate``'s 10^5) is drawn in several."""
    step = max(1, _samples_per_call(posterior) // len(x))
    for start in range(0, count, step):
        size = min(step, count - start)
        if densities:
            theta, lp = posterior.sample_and_log_prob(x, size)
            lp = lp.transpose(0, 1).numpy()
        else:
            theta = posterior.sample(x, size)
            lp = np.full((len(x), size), np.nan, dtype=np.float32)
        yield theta.transpose(0, 1).numpy(), lp


def _first_draws(num_samples: int, region: Region | None) -> int:
    """Draws per observation of the first pass: ``num_samples``, or at least
    ``REGION_FIRST_DRAWS`` where a region may accept few of them."""
    return num_samples if region is None else max(num_samples, REGION_FIRST_DRAWS)


def _log_rejection(
    missing: np.ndarray, filled: np.ndarray, drawn: np.ndarray, seconds: float
) -> None:
    """Progress of observations whose posteriors a region accepts rarely, whose passes can go
    on for minutes: the slowest one's acceptance, the draws it still needs and when it should
    be done at its rate so far. Shapes (n',) of the observations still short."""
    acceptance = np.maximum(filled, 1) / drawn
    slowest = int(np.argmax(missing / acceptance))
    needed = missing[slowest] / acceptance[slowest]
    rate = drawn[slowest] / seconds
    log.info(
        "%d observation(s) still short of samples in the region; the slowest accepts %.1e of "
        "its draws and needs about %.3g more (%.0f draws/s, ETA %.0f s; left out below %.0e)",
        len(missing),
        acceptance[slowest],
        needed,
        rate,
        needed / rate,
        REGION_MIN_ACCEPTANCE,
    )


def _redraw_count(missing: np.ndarray, filled: np.ndarray, drawn: np.ndarray, first: int) -> int:
    """Draws per observation for the next pass: what the acceptance seen so far needs to fill
    the largest shortfall, with a fifth to spare, within ``[MIN_REDRAW, first]``.

    A full pass for a few missing samples would double the cost of a posterior with a percent
    of its mass outside the box (for FMPE, a second ODE solve of every draw). Shapes:
    ``missing``, ``filled``, ``drawn`` (n',), of the observations still short.
    """
    acceptance = np.maximum(filled, 1) / drawn
    needed = int(np.ceil(1.2 * np.max(missing / acceptance)))
    return min(first, max(MIN_REDRAW, needed))


def _fill(
    samples: np.ndarray,
    log_prob: np.ndarray,
    filled: np.ndarray,
    theta: np.ndarray,
    lp: np.ndarray,
    inside: np.ndarray,
    which: np.ndarray | None = None,
) -> None:
    """Appends the accepted draws ``theta`` (n', k, D), ``lp`` (n', k) (``inside``: which)
    after the ``filled`` ones of the observations ``which`` (n'; all n by default) of
    ``samples`` (n, M, D) and ``log_prob`` (n, M), in place."""
    which = np.arange(len(inside)) if which is None else which
    order = np.argsort(~inside, axis=1, kind="stable")  # accepted draws first, in draw order
    rank = np.arange(inside.shape[1])[None, :]
    target = filled[which][:, None] + rank
    keep = (rank < inside.sum(1, keepdims=True)) & (target < samples.shape[1])
    rows, cols = np.nonzero(keep)
    source = order[rows, cols]
    samples[which[rows], target[rows, cols]] = theta[rows, source]
    log_prob[which[rows], target[rows, cols]] = lp[rows, source]
    filled[which] += keep.sum(1)


@torch.no_grad()
def log_prob_of(posterior: NeuralPosterior, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log q(theta_i | x_i) for paired rows: ``theta`` (n, D), ``x`` (n, *x_shape) -> (n,)."""
    out = np.empty(len(theta), dtype=np.float32)
    step = 65536
    for start in range(0, len(theta), step):
        t = torch.as_tensor(theta[start : start + step], dtype=torch.float32)
        out[start : start + step] = posterior.log_prob(t, torch.as_tensor(x[start : start + step]))
    return out


def check_sample_size(num_observations: int, num_samples: int, dim: int, out: Path) -> None:
    """Refuses, before sampling, samples that memory or the disk holding ``out`` cannot hold."""
    require_room(
        num_observations * num_samples * (dim + 1) * 4,  # float32 samples and log_prob
        out,
        f"{num_samples} samples at each of {num_observations} observations",
        "lower --num-samples",
    )


def write_samples(
    out: Path,
    result: PosteriorSamples,
    attrs: dict[str, object],
    *,
    theta: np.ndarray | None = None,
    log_prob_true: np.ndarray | None = None,
    x: np.ndarray | None = None,
) -> None:
    """Writes ``samples`` (n, M, D), ``log_prob`` (n, M), the conditioning ``x`` (n, ...) when
    given, for test sets the truths ``theta`` (n, D) and ``log_prob_true`` (n,), and for NLE
    each observation's chain diagnostics ``mcmc_rhat``, ``mcmc_ess``, ... (n,)."""
    arrays = (result.samples, result.log_prob, x, theta, log_prob_true)
    size = sum(np.asarray(a).size * 4 for a in arrays if a is not None)
    with storage.atomic_h5(out, expected_bytes=size) as f:
        f.create_dataset("samples", data=result.samples, chunks=True)
        f.create_dataset("log_prob", data=result.log_prob, chunks=True)
        if x is not None:
            f["x"] = np.asarray(x, dtype=np.float32)
        if theta is not None:
            f["theta"] = theta.astype(np.float32)
            f["log_prob_true"] = log_prob_true
        for name, values in (result.mcmc or {}).items():
            f[f"mcmc_{name}"] = values
        for key, value in attrs.items():
            f.attrs[key] = storage.encode_attr(value)
        f.attrs["complete"] = True


def read_samples(path: Path) -> dict[str, np.ndarray | dict]:
    """Reads a file written by :func:`write_samples`: arrays by name plus ``attrs``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `pipeline sample` to create it")
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False) or "samples" not in f:
                raise storage.DataFileError(
                    f"{path} is incomplete or has no 'samples'; rerun `pipeline sample`"
                )
            data: dict = {name: f[name][...] for name in f}
            data["attrs"] = {k: storage.decode_attr(v) for k, v in f.attrs.items()}
    except OSError as error:
        raise storage.unreadable(path, error) from None
    return data


def sample(
    model: Path,
    observations: Path,
    out: Path,
    options: SampleOptions,
    *,
    overwrite: bool,
    truncation: Path | None = None,
    region_models: Sequence[Path] = (),
    iid: bool = False,
) -> PosteriorSamples:
    """The sample stage: ``options.num_samples`` posterior draws at each finite observation
    of ``observations`` (an observe file, HDF5 with ``x``, or ``.npy``) from the posterior
    saved in ``model``, written to ``out`` with their provenance; returns them.

    With ``iid`` (an NLE model), the finite rows are independent observations of one theta and
    get one posterior: ``samples`` (1, M, D), ``x`` (1, n, *x_shape), attribute ``iid`` = n and
    ``observation_index`` the n rows of ``observations`` it combines.

    With ``truncation`` (the region of this posterior from ``pipeline truncate``), the draws
    are restricted to that region (nested in the regions of the earlier rounds' posteriors
    ``region_models``, round 0's first): simulations drawn from a sequential round's truncated
    prior have the posterior ``p(theta | x)`` restricted to the region, and coverage must
    compare them with that.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
        ValueError: If the observations belong to another task than the model, hold no
            finite row, or the samples cannot fit in memory or on disk.
    """
    out = Path(out)
    atomic.check_new(out, overwrite=overwrite)
    posterior, document = load_posterior(model)
    posterior.set_ode_tolerance(options.ode_tolerance)
    spec = posterior.spec
    recorded = recorded_attrs(observations)
    check_same_task(recorded, document, observations, model)
    x, theta = read_observations(observations, spec.x_shape, len(spec.parameter_names))
    finite = storage.finite_rows(x)
    if theta is not None:
        finite &= storage.finite_rows(theta)
    if iid and not finite.all():
        # One posterior from all rows: dropping a data set would change it without a sign.
        raise ValueError(
            f"rows {np.flatnonzero(~finite)[:10].tolist()} of {observations} hold NaN or inf "
            "(or values beyond float32's range); --iid combines every row into one posterior, "
            "so remove or repair those rows first"
        )
    if not finite.all():
        log.warning("excluding %d observations with NaN or inf", int((~finite).sum()))
    x, theta = x[finite], None if theta is None else theta[finite]
    if len(x) == 0:
        raise ValueError(f"{observations} holds no finite observation")
    if iid and truncation is not None:
        raise ValueError("--iid and --truncation cannot be combined")
    if theta is not None:
        check_drawn_from(observations, recorded, truncation)
        check_held_out(observations, recorded, document, model)
    if region_models and truncation is None:
        raise ValueError("--region-models are the models of --truncation's region; pass both")
    if iid and theta is not None:
        if not np.all(theta == theta[:1]):
            raise ValueError(
                f"the rows of {observations} have different true theta, so they are not "
                "independent observations of one theta: sample them without --iid"
            )
        theta = theta[:1]
    check_sample_size(len(x), options.num_samples, len(spec.parameter_names), out)
    torch.manual_seed(options.seed)
    low, high = spec.box()
    region, restricted = None, None
    if truncation is not None:
        from pipeline.rounds.region import region_of_model

        judge = region_judge(posterior, model)
        region, restricted = region_of_model(truncation, model, judge, document, region_models)
    settings = EnsembleSettings(
        walkers=options.mcmc_walkers or None,
        burn_in=options.mcmc_burn_in,
        thin=options.mcmc_thin,
        max_extensions=options.mcmc_extensions,
    )
    try:
        result = sample_posterior(
            posterior,
            x,
            options.num_samples,
            low=low,
            high=high,
            region=region,
            mcmc=settings,
            iid=iid,
            rows=np.flatnonzero(finite),
        )
    except OutsidePriorError as error:
        # Test simulations and synthetic observations were drawn from the prior by the
        # simulator itself: a posterior that leaves the prior there is the model's failure.
        drawn = holds_simulations(recorded) or (theta is not None and "mock_of" not in recorded)
        raise outside_prior(error.rows, observations, drawn) from None
    index = np.flatnonzero(finite)
    if iid:
        log.info("one posterior from %d independent observations", len(x))
        x = x[None]
    if result.mcmc is not None:
        test_set = holds_simulations(recorded) and not iid
        rows = None if iid else index
        log_mcmc(result.mcmc, settings, observations, test_set=test_set, rows=rows)
    excluded = int((~result.sampled).sum())
    # MCMC samples a region exactly, so its observations are left out only for their chains.
    outside = excluded if spec.method != "nle" else 0
    if excluded:
        reason = (
            f"their posterior has under {REGION_MIN_ACCEPTANCE:.0e} of its mass in the region "
            f"of {truncation}"
            if outside
            else "their MCMC chains did not converge"
        )
        if excluded == len(x):
            raise SamplingError(f"no observation of {observations} could be sampled: {reason}")
        log.warning("excluding %d of %d observations: %s", excluded, len(x), reason)
        keep = result.sampled
        x, theta, index = x[keep], None if theta is None else theta[keep], index[keep]
        mcmc = None if result.mcmc is None else {k: v[keep] for k, v in result.mcmc.items()}
        result = PosteriorSamples(result.samples[keep], result.log_prob[keep], None, mcmc)
    attrs = {
        "task": document["task"],
        # The definition of a user's task the model was trained on (check_same_task's).
        "task_digest": document.get("task_digest"),
        "parameter_names": list(spec.parameter_names),
        "num_samples": options.num_samples,
        "seed": options.seed,
        "low": None if low is None else low.tolist(),
        "high": None if high is None else high.tolist(),
        "num_nonfinite_excluded": int((~finite).sum()),
        "truncation": restricted,
        "num_outside_region_excluded": outside if truncation is not None else None,
        "method": spec.method,
        # Recorded at save; weights saved before that are digested here.
        "model_digest": document.get("weights_digest") or file_digest(Path(model) / WEIGHTS),
        "mcmc": asdict(settings) if result.mcmc is not None else None,
        "ode_tolerance": options.ode_tolerance if spec.method == "fmpe" else None,
        "num_unconverged_excluded": excluded if spec.method == "nle" else None,
        "iid": len(x[0]) if iid else None,
        # What was sampled: validate takes only simulations' samples as the test set.
        "sampled": "simulations" if holds_simulations(recorded) else "observations",
        "observation_index": index.tolist(),
        "provenance": provenance({"model": document["provenance"], "seed": options.seed}),
    }
    attrs = {k: v for k, v in attrs.items() if v is not None}
    if theta is None:
        log_prob_true = None
    elif iid:
        with torch.no_grad():
            log_prob_true = posterior.iid_log_prob(torch.as_tensor(theta), torch.as_tensor(x[0]))
        log_prob_true = log_prob_true.numpy()
    else:
        log_prob_true = log_prob_of(posterior, theta, x)
    write_samples(out, result, attrs, theta=theta, log_prob_true=log_prob_true, x=x)
    log.info("wrote %s: samples %s", out, result.samples.shape)
    return result


def region_judge(posterior: NeuralPosterior, model: Path) -> NeuralPosterior:
    """The posterior whose densities decide which draws lie in a round's region: ``posterior``
    itself, unless its ODE solver was set to another tolerance than the default, at which
    ``truncate`` drew the region's threshold (and the round's simulate job tests its
    parameters): then the model loaded afresh, so that the draws are restricted to the region
    the test simulations came from."""
    tolerances = {m.flow.tolerance for m in posterior.members if hasattr(m.flow, "tolerance")}
    if tolerances <= {ODE_TOLERANCE}:
        return posterior
    return load_posterior(model)[0]


def log_mcmc(
    mcmc: dict[str, np.ndarray],
    settings: EnsembleSettings,
    observations: Path,
    *,
    test_set: bool,
    rows: np.ndarray | None = None,
) -> None:
    """Logs the chains' diagnostics; unconverged chains at real (not test) observations are an
    error, since their samples would be the result a user reads. ``rows``: each sampled
    observation's row in ``observations`` (rows of NaN or inf were not sampled), for messages.

    Raises:
        SamplingError: If an observation of a file without true ``theta`` did not converge,
            naming it, its R-hat and ESS, and the options that give the chains more steps.
    """
    log.info(
        "MCMC: R-hat up to %.3f, ESS down to %.0f, acceptance %.2f-%.2f over %d observations",
        float(mcmc["rhat"].max()),
        float(mcmc["ess"].min()),
        float(mcmc["acceptance"].min()),
        float(mcmc["acceptance"].max()),
        len(mcmc["rhat"]),
    )
    failed = np.flatnonzero(~mcmc["converged"])
    rows = np.arange(len(mcmc["rhat"])) if rows is None else rows
    if len(failed) and not test_set:
        worst = ", ".join(
            f"{rows[i]} (R-hat {mcmc['rhat'][i]:.3f}, ESS {mcmc['ess'][i]:.0f})"
            for i in failed[:5]
        )
        raise SamplingError(
            f"the MCMC chains at observations {worst} of {observations} did not converge "
            f"(R-hat above {settings.max_rhat} or ESS under {settings.min_ess_fraction:.0%} of "
            f"the draws kept after {settings.max_extensions} extensions); give them more steps: "
            "raise mcmc_thin, mcmc_burn_in or mcmc_extensions"
        )

"""Posterior samples of a neural likelihood: one affine-invariant ensemble per observation,
all observations stepped together.

An NLE posterior ``p(theta | x) ∝ q(x | theta) p(theta)`` has no sampler of its own. emcee
(:mod:`pipeline.mcmc`, for the reference posteriors) runs one ensemble per call in NumPy; a test
set needs a posterior at each of a thousand simulations, and a flow is cheap per row but dear per
call. So this module runs the move :mod:`pipeline.mcmc` uses with emcee (differential evolution,
ter Braak 2006, as emcee's ``DEMove``) on a tensor of ensembles ``(N, W, D)``: each half-step is
one call of the log-density for every walker of every observation.

Each observation's run

1. starts from ``W`` distinct draws of the prior picked by sampling-importance-resampling
   against the target (so every mode of the posterior holds walkers from the start);
2. discards ``burn_in`` steps, then keeps every ``thin``-th state of every walker until the
   pool holds at least ``M`` draws;
3. is checked as :mod:`pipeline.mcmc` checks the references: rank-normalised split R-hat over
   4 groups of walkers (Vehtari et al. 2021) and the bulk ESS with every walker as a chain;
4. is extended, while a check fails, from where it stopped with the thinning doubled, up to
   ``max_extensions`` times; what still fails is returned flagged as not converged, never as
   converged. Where only the ESS fell short (R-hat passed at every observation still running,
   so the chains are taken as stationary), the new pool keeps every other draw of the last one
   and adds as many new draws: the chain thinned twice as much over twice the steps, for half
   the steps of a fresh pool. Where R-hat failed, the new pool starts afresh, so that what the
   chains did before they settled leaves the pool.

References:
    | A Markov Chain Monte Carlo version of the genetic algorithm Differential Evolution
    | (ter Braak, 2006) https://doi.org/10.1007/s11222-006-8769-1
    | Rank-normalization, folding, and localization: An improved R-hat for assessing
    | convergence of MCMC (Vehtari et al., 2021) https://arxiv.org/abs/1903.08008
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.mcmc import batched_diagnostics
from pipeline.progress import Progress

log = logging.getLogger(__name__)

# Walkers ``(n, W, D)`` of the observations ``rows`` (n indices) to their log-densities
# ``(n, W)``, -inf outside the support.
BatchLogProb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Which rows ``(k, D)`` lie in the target's support ``(k,)``, where that is dearer to decide than
# the log-density (a sequential round's region, defined by earlier rounds' networks): it is
# asked only of the moves Metropolis accepts, which does not change a single draw.
Support = Callable[[torch.Tensor], torch.Tensor]
# Groups of walkers that R-hat compares as chains (as pipeline.mcmc does).
NUM_CHAINS = 4
# Relative jitter of differential evolution's step size (emcee's DEMove sigma), so that no two
# proposals are exactly degenerate.
JITTER = 1e-5
# Every this many steps the step size is 1, which carries a walker from one mode to another
# whenever its two partners sit in those modes (ter Braak 2006): multimodal posteriors (slcp)
# keep their walkers balanced between modes.
JUMP_EVERY = 10
# Fewest draws per walker in the pool, so that R-hat and ESS rest on enough draws per chain when
# few samples are asked for (pipeline.mcmc's default too).
MIN_DRAWS_PER_WALKER = 10
# Walkers per observation unless the settings fix them: at least MIN_WALKERS, more when few
# observations ask for many draws each (a truncate stage's 10^5 at one observation). A call of a
# flow costs nearly as much for 16 rows as for 500 (slcp's likelihood ensemble of eight MAFs on
# one core: 490 us per walker at 16, 16 us at 1024), so one large ensemble takes far fewer calls
# than a small one run for longer. Up to WALKERS_PER_CALL walkers are stepped together, and each
# walker's burn-in may cost at most 1 / BURN_IN_SHARE of the evaluations of the kept steps.
MIN_WALKERS = 32
WALKERS_PER_CALL = 2048
BURN_IN_SHARE = 3
# Prior draws per walker that sampling-importance-resampling picks the starting walkers from.
CANDIDATES_PER_WALKER = 32


@dataclass(frozen=True)
class EnsembleSettings:
    """How long each ensemble runs and what it must reach to be called converged.

    ``walkers`` and ``candidates`` (per observation) are chosen by :meth:`sized` where ``None``.
    """

    walkers: int | None = None
    burn_in: int = 300
    thin: int = 10
    max_extensions: int = 4
    max_rhat: float = 1.05
    min_ess_fraction: float = 0.1
    candidates: int | None = None

    def __post_init__(self) -> None:
        if self.walkers is not None and (self.walkers < 2 * NUM_CHAINS or self.walkers % 2):
            raise ValueError(f"walkers must be even and at least {2 * NUM_CHAINS}")
        if self.candidates is not None and self.candidates < (self.walkers or MIN_WALKERS):
            raise ValueError("candidates must be at least walkers")

    def sized(self, observations: int, num_samples: int) -> EnsembleSettings:
        """These settings with ``walkers`` and ``candidates`` fixed for ``observations``
        ensembles stepped together, ``num_samples`` draws each (module constants above)."""
        walkers = self.walkers
        if walkers is None:
            affordable = num_samples * self.thin // (BURN_IN_SHARE * max(self.burn_in, 1))
            walkers = min(affordable, WALKERS_PER_CALL // observations)
            if self.candidates is not None:
                walkers = min(walkers, self.candidates // CANDIDATES_PER_WALKER)
            # A multiple of 2 * NUM_CHAINS: two halves of equal groups.
            walkers = max(MIN_WALKERS, walkers // (2 * NUM_CHAINS) * 2 * NUM_CHAINS)
        candidates = self.candidates or CANDIDATES_PER_WALKER * walkers
        return replace(self, walkers=walkers, candidates=candidates)


@dataclass(frozen=True, eq=False)
class EnsembleResult:
    """Samples of N posteriors with their diagnostics (one number per observation).

    Attributes:
        samples: ``(N, M, D)``.
        log_prob: The target's log-density of each sample, ``(N, M)``.
        rhat: Largest split R-hat over parameters, ``(N,)``.
        ess: Smallest bulk ESS over parameters, ``(N,)``.
        acceptance: Fraction of accepted moves over the last pool's new steps, ``(N,)``.
        thin: Steps between kept draws of the last pool, ``(N,)``.
        converged: Whether R-hat and ESS passed, ``(N,)``.
        walkers: The ensemble's size, ``(N,)``.
    """

    samples: np.ndarray
    log_prob: np.ndarray
    rhat: np.ndarray
    ess: np.ndarray
    acceptance: np.ndarray
    thin: np.ndarray
    converged: np.ndarray
    walkers: np.ndarray

    @property
    def diagnostics(self) -> dict[str, np.ndarray]:
        """Everything but the samples, by name (what the samples file stores as ``mcmc_*``)."""
        names = ("rhat", "ess", "acceptance", "thin", "converged", "walkers")
        return {name: getattr(self, name) for name in names}


def initial_walkers(
    log_prob: BatchLogProb, candidates: torch.Tensor, walkers: int
) -> torch.Tensor:
    """``walkers`` distinct candidates per observation, picked with probability by the target
    (Gumbel top-k: sampling-importance-resampling without replacement, so the ensemble is not
    degenerate): ``candidates`` (N, C, D) -> (N, W, D).

    Raises:
        ValueError: If some observation has fewer than ``walkers`` candidates of finite density
            (its likelihood is zero or NaN at nearly every prior draw).
    """
    weights = log_prob(candidates, torch.arange(len(candidates)))
    finite = torch.isfinite(weights)
    short = torch.nonzero(finite.sum(dim=1) < walkers).flatten()
    if len(short):
        raise ValueError(
            f"observations {short.tolist()[:10]} have a finite likelihood at fewer than "
            f"{walkers} of {candidates.shape[1]} prior draws; the observations are likely not "
            "of this model (check their shape, units and scale)"
        )
    gumbel = -torch.log(-torch.log(torch.rand(weights.shape).clamp_min(1e-30)))
    keys = torch.where(finite, weights + gumbel, -math.inf)
    index = keys.topk(walkers, dim=1).indices
    return torch.gather(candidates, 1, index[..., None].expand(-1, -1, candidates.shape[-1]))


def de_step(
    log_prob: BatchLogProb,
    walkers: torch.Tensor,
    current: torch.Tensor,
    rows: torch.Tensor,
    jump: bool = False,
    support: Support | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of every walker of every ensemble: each half moves by the scaled difference of
    two distinct walkers of the other half, ``gamma = 2.38 / sqrt(2 D)`` (optimal for a
    Gaussian target) or 1 if ``jump``, and is accepted by Metropolis (the proposal is symmetric)
    if it lies in ``support``.

    Shapes: ``walkers`` (n, W, D) of the observations ``rows`` (n,), ``current`` (n, W) -> the
    new walkers, their log-densities and which moves were accepted (n, W).
    """
    n, w, dim = walkers.shape
    half = w // 2
    gamma = 1.0 if jump else 2.38 / math.sqrt(2 * dim)
    accepted = torch.zeros(n, w, dtype=torch.bool)
    walkers, current = walkers.clone(), current.clone()
    batch = torch.arange(n)[:, None]
    for moving, other in ((slice(0, half), slice(half, w)), (slice(half, w), slice(0, half))):
        pool = walkers[:, other]
        first = torch.randint(w - half, (n, half))
        second = torch.randint(w - half - 1, (n, half))
        second += second >= first  # two distinct partners
        step = gamma * (1 + JITTER * torch.randn(n, half, 1))
        difference = pool[batch, first] - pool[batch, second]
        proposal = walkers[:, moving] + step * difference
        proposed = log_prob(proposal, rows)
        accept = torch.log(torch.rand(n, half)) < proposed - current[:, moving]
        accept &= torch.isfinite(proposed)
        if support is not None and accept.any():
            accept[accept.clone()] = support(proposal[accept])
        walkers[:, moving] = torch.where(accept[..., None], proposal, walkers[:, moving])
        current[:, moving] = torch.where(accept, proposed, current[:, moving])
        accepted[:, moving] = accept
    return walkers, current, accepted


def diagnostics(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pipeline.mcmc.batched_diagnostics` of pools ``(N, W, draws, D)`` over
    :data:`NUM_CHAINS` walker groups; a chain that never moved has no R-hat or ESS and is
    scored as not converged (R-hat inf, ESS 0), and so is a pool with one walker that never
    moved (stuck on a spike of the density: its repeated draws hide among the other walkers'
    in a group's R-hat)."""
    rhat, ess = batched_diagnostics(pool, NUM_CHAINS)
    rhat = np.nan_to_num(rhat, nan=np.inf)
    frozen = (np.ptp(pool, axis=2) == 0).all(axis=-1).any(axis=1)  # (N,)
    rhat[frozen] = np.inf
    return rhat, np.nan_to_num(ess, nan=0.0)


@torch.no_grad()
def sample_ensemble(
    log_prob: BatchLogProb,
    candidates: torch.Tensor,
    num_samples: int,
    settings: EnsembleSettings,
    support: Support | None = None,
) -> EnsembleResult:
    """``num_samples`` draws of each of N targets by batched ensemble MCMC (module docstring).

    Arguments:
        log_prob: The targets' log-densities up to constants: walkers ``(n, W, D)`` of the
            observations ``rows`` (n indices into the N) -> ``(n, W)``.
        candidates: Prior draws to start from, ``(N, C, D)`` with ``C >= walkers``, inside
            ``support``.
        num_samples: Samples ``M`` per observation.
        settings: Ensemble size (where ``None``, :meth:`EnsembleSettings.sized` for these N
            and M, with ``CANDIDATES_PER_WALKER`` of the C per walker), burn-in, thinning and
            the convergence criteria.
        support: Where the targets are not zero besides where ``log_prob`` is finite.

    Randomness comes from torch's global generator: seed it for reproducible samples.
    """
    n, num_candidates, dim = candidates.shape
    if settings.candidates is None:
        settings = replace(settings, candidates=num_candidates)
    w = settings.sized(n, num_samples).walkers
    rows = torch.arange(n)
    walkers = initial_walkers(log_prob, candidates, w)
    current = log_prob(walkers, rows)
    clock = 0  # steps taken, for the jumps every JUMP_EVERY
    draws = max(math.ceil(num_samples / w), MIN_DRAWS_PER_WALKER)
    # A truncate stage's 10^5 draws at one observation are minutes of steps: log them.
    progress = Progress(settings.burn_in + draws * settings.thin, "MCMC steps", log)
    for _ in range(settings.burn_in):
        clock += 1
        jump = clock % JUMP_EVERY == 0
        walkers, current, _ = de_step(log_prob, walkers, current, rows, jump, support)
        progress.update(1)
    enough_ess = settings.min_ess_fraction * w * draws
    thin = np.full(n, settings.thin)
    pool = np.empty((n, w, draws, dim), dtype=np.float32)
    pool_log_prob = np.empty((n, w, draws), dtype=np.float32)
    acceptance, rhat, ess = np.zeros(n), np.full(n, np.inf), np.zeros(n)
    todo = np.arange(n)  # observations still running
    kept = 0  # draws of the last pool that the new one keeps
    for extension in range(settings.max_extensions + 1):
        steps = int(thin[todo[0]])  # every observation still running has the same thinning
        if kept:
            # Every other draw, ending at the last one, so the spacing stays ``steps``.
            first = (draws - 1) % 2
            pool[todo, :, :kept] = pool[todo, :, first::2]
            pool_log_prob[todo, :, :kept] = pool_log_prob[todo, :, first::2]
        if extension:
            total = (draws - kept) * steps
            progress = Progress(total, f"MCMC steps of extension {extension}", log)
        index = torch.as_tensor(todo)  # torch indexes tensors with tensors
        accepted = torch.zeros(len(todo))
        part_walkers, part_current = walkers[index], current[index]
        for draw in range(kept, draws):
            for _ in range(steps):
                clock += 1
                jump = clock % JUMP_EVERY == 0
                part_walkers, part_current, ok = de_step(
                    log_prob, part_walkers, part_current, index, jump, support
                )
                accepted += ok.float().mean(dim=1)
                progress.update(1)
            pool[todo, :, draw] = part_walkers.numpy()
            pool_log_prob[todo, :, draw] = part_current.numpy()
        walkers[index], current[index] = part_walkers, part_current
        acceptance[todo] = (accepted / ((draws - kept) * steps)).numpy()
        rhat[todo], ess[todo] = diagnostics(pool[todo])
        failing = np.flatnonzero((rhat > settings.max_rhat) | (ess < enough_ess))
        if len(failing) == 0 or extension == settings.max_extensions:
            break
        todo = failing
        thin[failing] *= 2
        stationary = bool((rhat[failing] <= settings.max_rhat).all())
        kept = math.ceil(draws / 2) if stationary else 0
        log.info(
            "MCMC: %d of %d observations not converged yet (R-hat up to %.3f, ESS down to %.0f "
            "of %.0f needed); extending them with thinning %d%s",
            len(failing),
            n,
            float(rhat[failing].max()),
            float(ess[failing].min()),
            enough_ess,
            int(thin[failing[0]]),
            ", keeping every other draw" if kept else " in a new pool",
        )
    # Time-major, so that the M kept are the earliest draws of all walkers alike.
    samples = pool.transpose(0, 2, 1, 3).reshape(n, w * draws, dim)[:, :num_samples]
    sample_log_prob = pool_log_prob.transpose(0, 2, 1).reshape(n, w * draws)[:, :num_samples]
    return EnsembleResult(
        samples=samples,
        log_prob=sample_log_prob,
        rhat=rhat,
        ess=ess,
        acceptance=acceptance,
        thin=thin,
        converged=(rhat <= settings.max_rhat) & (ess >= enough_ess),
        walkers=np.full(n, w),
    )

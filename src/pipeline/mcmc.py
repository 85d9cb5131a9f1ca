"""Reference posteriors by MCMC: emcee's ensemble sampler with checked convergence.

One function, :func:`sample_emcee`, turns a vectorised log-density and a starting ensemble into
posterior samples that come with the numbers that vouch for them, or fails loudly. It

1. runs the ensemble and discards as burn-in ``burn_in_factor`` integrated autocorrelation
   times (emcee's estimate, averaged over walkers) or ``burn_in`` steps, whichever is more;
2. keeps ``ceil(M / W)`` draws per walker (at least ``min_draws_per_walker``), spaced evenly
   over the rest of the chain and at least one autocorrelation time apart: the pool;
3. checks the pool with arviz-stats: the rank-normalised split R-hat (Vehtari et al. 2021)
   over ``num_chains`` groups of walkers, whose maximum over parameters must not exceed
   ``max_rhat``, and the bulk effective sample size with every walker as one chain (as
   ``arviz.from_emcee`` counts them), whose minimum over parameters must reach both an
   absolute floor and a fraction of the pool;
4. extends the run up to ``max_extensions`` times while the pool is too small or a check
   fails (topping it up, or doubling it, which doubles the spacing of the kept draws), then
   raises a :class:`RuntimeError` naming the target and the failing numbers.

The returned samples are drawn without replacement from the pool (at most ``W - 1`` fewer than
it, unless ``min_draws_per_walker`` makes it larger) with the caller's generator;
emcee's own ``RandomState`` is seeded from that generator, so equal generators give equal
samples.

References:
    | Ensemble samplers with affine invariance (Goodman & Weare, 2010)
    | https://doi.org/10.2140/camcos.2010.5.65
    | emcee: The MCMC Hammer (Foreman-Mackey et al., 2013) https://arxiv.org/abs/1202.3665
    | Rank-normalization, folding, and localization: An improved R-hat for assessing
    | convergence of MCMC (Vehtari et al., 2021) https://arxiv.org/abs/1903.08008
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import emcee

LogProb = Callable[[np.ndarray], np.ndarray]

# Vehtari et al. (2021) ask for a bulk ESS above 400 before R-hat and ESS themselves are to be
# trusted (100 per chain for their 4 chains); below it the estimates are too noisy to vouch.
MIN_ESS = 400.0


@dataclass(frozen=True, eq=False)  # arrays: no field-wise ==
class MCMCResult:
    """Posterior samples and their convergence diagnostics.

    Attributes:
        samples: Posterior samples, shape ``(M, D)``.
        rhat: Rank-normalised split R-hat of the thinned pool, maximum over parameters.
        ess: Bulk effective sample size of the thinned pool, minimum over parameters.
        pool_size: Thinned draws the diagnostics were computed on (walkers x draws, >= M).
        acceptance: Mean acceptance fraction of the walkers over the whole run.
        autocorr_time: Integrated autocorrelation time in steps, maximum over parameters.
        thin: Steps between kept draws.
        num_steps: Steps per walker, burn-in included.
        burn_in: Steps per walker discarded as burn-in.
        num_walkers: Walkers in the ensemble.
    """

    samples: np.ndarray
    rhat: float
    ess: float
    pool_size: int
    acceptance: float
    autocorr_time: float
    thin: int
    num_steps: int
    burn_in: int
    num_walkers: int

    @property
    def diagnostics(self) -> dict[str, float]:
        """The numbers as a flat JSON-friendly dict (everything but the samples)."""
        return {
            "rhat_max": self.rhat,
            "ess_bulk_min": self.ess,
            "pool_size": float(self.pool_size),
            "acceptance": self.acceptance,
            "autocorr_time": self.autocorr_time,
            "thin": float(self.thin),
            "num_steps": float(self.num_steps),
            "burn_in": float(self.burn_in),
            "num_walkers": float(self.num_walkers),
        }


def sample_emcee(
    log_prob: LogProb,
    initial: np.ndarray,
    num_samples: int,
    rng: np.random.Generator,
    *,
    label: str = "MCMC",
    moves: list | None = None,
    num_chains: int = 4,
    burn_in: int = 200,
    burn_in_factor: float = 5.0,
    min_draws_per_walker: int = 10,
    max_extensions: int = 6,
    max_rhat: float = 1.01,
    min_ess: float = MIN_ESS,
    min_ess_fraction: float = 0.5,
) -> MCMCResult:
    """Samples ``log_prob`` with emcee from the ensemble ``initial`` and checks convergence.

    Long because this docstring documents its fourteen arguments; the body is the loop of steps
    1-4 of the module docstring, each step a helper below.

    Arguments:
        log_prob: Vectorised log-density (up to a constant): ``(n, D)`` to ``(n,)``, ``-inf``
            outside the support.
        initial: Starting positions of the walkers, shape ``(W, D)`` with ``W >= 2 D`` even,
            inside the support and not all on a hyperplane; best drawn from (close to) the
            target, e.g. by sampling-importance-resampling.
        num_samples: Number of samples ``M`` to return.
        rng: The only source of randomness (it seeds emcee and draws the subset).
        label: What is sampled, e.g. ``"slcp reference for x_obs=[...]"``; errors name it.
        moves: emcee moves; default differential evolution (``emcee.moves.DEMove``). On the
            slcp and bernoulli_glm posteriors it has autocorrelation times 1.5-3 times shorter
            than emcee's default stretch move at about the same cost per step.
        num_chains: Walker groups that R-hat compares as chains (4, as Vehtari et al. use).
        burn_in: Fewest steps discarded as burn-in.
        burn_in_factor: Autocorrelation times discarded as burn-in when more than ``burn_in``.
            Walkers that start in the bulk forget their start in a few; the split R-hat
            catches those that do not (their early draws differ from their late ones).
        min_draws_per_walker: Fewest draws per walker in the pool (at least 4), so that the
            diagnostics rest on ``W x min_draws_per_walker`` draws even for small ``M``.
        max_extensions: How often the run may be extended: topped up when the re-estimated
            autocorrelation time leaves too few draws, doubled when R-hat or ESS fail.
        max_rhat: Largest acceptable R-hat (1.01, the threshold of Vehtari et al. 2021).
        min_ess: Absolute floor on the bulk ESS of the pool.
        min_ess_fraction: Floor on bulk ESS / pool size: each returned sample must be worth at
            least this fraction of an independent draw. Draws one autocorrelation time apart
            give ~0.7-0.9; where emcee's estimate falls short (slow tails of a ridge), the
            ratio drops below 0.5 and an extension spaces the draws further apart.

    Returns:
        The samples, shape ``(M, D)``, and their diagnostics.

    Raises:
        ValueError: If ``initial`` has the wrong shape or a walker starts outside the support.
        RuntimeError: If R-hat or ESS still fail after ``max_extensions`` extensions.
    """
    initial = _checked_initial(
        log_prob, initial, num_samples, label, num_chains, min_draws_per_walker
    )
    num_walkers = initial.shape[0]
    draws_per_walker = max(math.ceil(num_samples / num_walkers), min_draws_per_walker)
    sampler = _seeded_sampler(log_prob, initial, moves, rng)
    _first_run(sampler, initial, burn_in, burn_in_factor, draws_per_walker)
    for extension in range(max_extensions + 1):
        pool = _thinned_pool(
            sampler.get_chain(), burn_in, burn_in_factor, draws_per_walker, num_chains
        )
        ess_floor = max(min_ess, min_ess_fraction * pool.size)
        if pool.enough and pool.rhat <= max_rhat and pool.ess >= ess_floor:
            break
        if extension == max_extensions:
            raise _not_converged(label, sampler, pool, max_extensions, max_rhat, ess_floor)
        steps = _extension_steps(sampler.iteration, pool, draws_per_walker)
        sampler.run_mcmc(None, steps, progress=False)
    return _result(sampler, pool, num_samples, rng)


def _checked_initial(
    log_prob: LogProb,
    initial: np.ndarray,
    num_samples: int,
    label: str,
    num_chains: int,
    min_draws_per_walker: int,
) -> np.ndarray:
    """``initial`` as float64 ``(W, D)`` after checking it and the sizes against each other."""
    initial = np.asarray(initial, dtype=np.float64)
    if initial.ndim != 2 or initial.shape[0] < 2 * initial.shape[1] or initial.shape[0] % 2:
        raise ValueError(
            f"{label}: initial must be (W, D) with W >= 2 D even, got {initial.shape}"
        )
    if num_samples <= 0:
        raise ValueError(f"{label}: num_samples must be positive, got {num_samples}")
    if min_draws_per_walker < 4:
        raise ValueError(f"{label}: min_draws_per_walker must be at least 4 (split R-hat)")
    if initial.shape[0] < 2 * num_chains:
        raise ValueError(
            f"{label}: need at least {2 * num_chains} walkers for {num_chains} chains"
        )
    if not np.all(np.isfinite(log_prob(initial))):
        raise ValueError(f"{label}: some walkers start where the log-density is not finite")
    return initial


def _seeded_sampler(
    log_prob: LogProb, initial: np.ndarray, moves: list | None, rng: np.random.Generator
) -> emcee.EnsembleSampler:
    """An ensemble sampler for the walkers ``initial`` ``(W, D)``, its state seeded by ``rng``."""
    import emcee  # here, not at the top: importing the task registry stays fast

    num_walkers, dim = initial.shape
    if moves is None:
        moves = [emcee.moves.DEMove()]
    sampler = emcee.EnsembleSampler(num_walkers, dim, log_prob, vectorize=True, moves=moves)
    sampler.random_state = np.random.RandomState(rng.integers(0, 2**32, size=4)).get_state()
    return sampler


def _first_run(
    sampler: emcee.EnsembleSampler,
    initial: np.ndarray,
    burn_in: int,
    burn_in_factor: float,
    draws_per_walker: int,
) -> None:
    """Runs the initial burn-in from ``initial`` ``(W, D)``, then the production run.

    A rough autocorrelation time from the second half of the burn-in sets the length of the
    production run, which then re-estimates it.
    """
    sampler.run_mcmc(initial, burn_in, progress=False)
    tau = _autocorr_time(sampler.get_chain()[burn_in // 2 :])
    first = math.ceil(burn_in_factor * tau) + draws_per_walker * math.ceil(tau)
    sampler.run_mcmc(None, first, progress=False)


@dataclass(frozen=True, eq=False)  # arrays: no field-wise ==
class _Pool:
    """The thinned draws of the run so far and the numbers that judge them.

    Attributes:
        draws: The kept draws, shape ``(W, draws_per_walker, D)``.
        tau: Integrated autocorrelation time in steps, maximum over parameters.
        burned: Steps per walker discarded as burn-in.
        chain_length: Steps per walker after the burn-in.
        thin: Steps between kept draws.
        enough: Whether the chain holds ``draws_per_walker`` draws one ``tau`` apart.
        rhat: Rank-normalised split R-hat of ``draws``, maximum over parameters.
        ess: Bulk effective sample size of ``draws``, minimum over parameters.
    """

    draws: np.ndarray
    tau: float
    burned: int
    chain_length: int
    thin: int
    enough: bool
    rhat: float
    ess: float

    @property
    def size(self) -> int:
        """Number of kept draws, walkers x draws per walker."""
        return self.draws.shape[0] * self.draws.shape[1]


def _thinned_pool(
    full: np.ndarray,
    burn_in: int,
    burn_in_factor: float,
    draws_per_walker: int,
    num_chains: int,
) -> _Pool:
    """The pool of the chain ``full`` ``(steps, W, D)``, and its R-hat and ESS.

    After a burn-in of ``burn_in_factor`` autocorrelation times (at least ``burn_in`` steps),
    ``draws_per_walker`` draws per walker, spaced evenly over the rest of the chain, at least
    one autocorrelation time apart (further once the run has been extended), ending with the
    last step.
    """
    tau = _autocorr_time(full[burn_in:])
    burned = max(burn_in, math.ceil(burn_in_factor * tau))
    chain = full[burned:]
    available = len(chain) // max(1, math.ceil(tau))
    thin = max(1, math.ceil(tau)) * max(1, available // draws_per_walker)
    draws = chain[::-1][::thin][:draws_per_walker][::-1].transpose(1, 0, 2)
    rhat, ess = _diagnostics(draws, num_chains)
    return _Pool(
        draws=draws,
        tau=tau,
        burned=burned,
        chain_length=len(chain),
        thin=thin,
        enough=available >= draws_per_walker,
        rhat=rhat,
        ess=ess,
    )


def _extension_steps(iteration: int, pool: _Pool, draws_per_walker: int) -> int:
    """Steps to add to a run of ``iteration`` steps whose ``pool`` fell short.

    Too few draws one autocorrelation time apart: top up, by at least half the run, as the
    estimate grows with the chain (on narrow slcp posteriors, small top-ups chased a growing
    tau until the extensions ran out). A failed check: double the run, which doubles the
    spacing of the draws.
    """
    if pool.enough:
        return iteration
    missing = max(draws_per_walker * math.ceil(pool.tau) - pool.chain_length, 0)
    missing += pool.chain_length // 4
    return max(missing + pool.thin, iteration // 2)


def _not_converged(
    label: str,
    sampler: emcee.EnsembleSampler,
    pool: _Pool,
    max_extensions: int,
    max_rhat: float,
    ess_floor: float,
) -> RuntimeError:
    """The error that names the target and the numbers of the last ``pool`` that failed."""
    return RuntimeError(
        f"{label}: MCMC did not converge after {sampler.iteration} steps of "
        f"{pool.draws.shape[0]} walkers ({max_extensions} extensions): R-hat {pool.rhat:.4f} "
        f"(at most {max_rhat}), bulk ESS {pool.ess:.0f} of {pool.size} draws {pool.thin} steps "
        f"apart (at least {ess_floor:.0f}), autocorrelation time {pool.tau:.1f} steps, "
        f"acceptance {np.mean(sampler.acceptance_fraction):.3f}. The posterior may be "
        "multimodal or far narrower than the starting ensemble"
    )


def _result(
    sampler: emcee.EnsembleSampler, pool: _Pool, num_samples: int, rng: np.random.Generator
) -> MCMCResult:
    """``num_samples`` draws of the converged ``pool`` without replacement, and its numbers."""
    flat = pool.draws.reshape(-1, pool.draws.shape[2])
    samples = flat[rng.permutation(len(flat))[:num_samples]]
    return MCMCResult(
        samples=samples,
        rhat=pool.rhat,
        ess=pool.ess,
        pool_size=pool.size,
        acceptance=float(np.mean(sampler.acceptance_fraction)),
        autocorr_time=float(pool.tau),
        thin=pool.thin,
        num_steps=int(sampler.iteration),
        burn_in=int(pool.burned),
        num_walkers=pool.draws.shape[0],
    )


def _diagnostics(pool: np.ndarray, num_chains: int) -> tuple[float, float]:
    """Max R-hat over walker groups and min bulk ESS over walkers of a pool ``(W, draws, D)``.

    R-hat treats ``num_chains`` groups of walkers as chains, each group's draws in time order
    (all its walkers' first draws, then their second, ...): its split halves are the early and
    the late draws, so it detects drift as well as groups that disagree. Walkers as chains
    would give chains of a few dozen draws, for which R-hat exceeds 1 by about
    1 / (2 ESS per half chain) even when converged (~0.01 at 20 draws per half). ESS treats
    every walker as a chain, so that the autocorrelation it estimates is along one walker's
    path (within a group, consecutive draws come from different walkers); its estimate also
    falls when walkers disagree (the between-chain variance enters it), so walkers stuck in
    different modes fail the ESS check even where every group holds a balanced share of them.
    """
    if pool.shape[1] < 4:  # split R-hat and ESS need at least two draws per half chain
        return float("nan"), float("nan")
    rhat, ess = batched_diagnostics(pool[None], num_chains)
    return float(rhat[0]), float(ess[0])


def batched_diagnostics(pool: np.ndarray, num_chains: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_diagnostics` of ``N`` pools at once: ``(N, W, draws, D)`` -> max R-hat and min
    bulk ESS over parameters, each ``(N,)`` (NaN where a chain never moved)."""
    from arviz_stats.base import array_stats  # ~1 s to import (scipy.signal)

    n, walkers, draws, dim = pool.shape
    per_group = walkers // num_chains
    groups = pool[:, : num_chains * per_group].reshape(n, num_chains, per_group, draws, dim)
    groups = groups.transpose(0, 1, 3, 2, 4).reshape(n, num_chains, draws * per_group, dim)
    rhat = np.max(array_stats.rhat(groups, chain_axis=1, draw_axis=2), axis=-1)
    ess = np.min(array_stats.ess(pool, chain_axis=1, draw_axis=2, method="bulk"), axis=-1)
    return rhat, ess


def _autocorr_time(chain: np.ndarray) -> float:
    """Integrated autocorrelation time in steps, maximum over parameters: ``(T, W, D)``."""
    import emcee

    # Walkers that never moved in this stretch (stuck far out in the early burn-in) have no
    # autocorrelation function (0 / 0); the others estimate it. If none moved: the length.
    moving = np.all(np.ptp(chain, axis=0) > 0, axis=-1)
    if len(chain) < 2 or not np.any(moving):
        return float(len(chain))
    # tol=0: a short chain gives a (low) estimate instead of an error; the ESS check judges.
    tau = emcee.autocorr.integrated_time(chain[:, moving], tol=0)
    return float(np.max(tau))


def resample_distinct(
    candidates: np.ndarray, log_weights: np.ndarray, num: int, rng: np.random.Generator
) -> np.ndarray:
    """Picks ``num`` distinct rows of ``candidates`` with probability by ``exp(log_weights)``.

    Sampling-importance-resampling without replacement (the Gumbel-top-k trick: the ``num``
    largest ``log_weights + Gumbel noise``), so that an ensemble started from it has distinct,
    linearly independent walkers even when a few candidates carry almost all the weight; it
    then holds the heaviest candidates. Shapes ``(N, D)``, ``(N,)`` to ``(num, D)``.
    """
    if num > len(candidates):
        raise ValueError(f"cannot pick {num} distinct rows of {len(candidates)} candidates")
    keys = np.asarray(log_weights, dtype=np.float64) + rng.gumbel(size=len(candidates))
    keys = np.where(np.isnan(keys), -np.inf, keys)
    return candidates[np.argsort(-keys, kind="stable")[:num]]

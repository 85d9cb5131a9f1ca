"""The neural posterior q(theta | x): standardisation, embedding and flow in one ``nn.Module``.

With ``method: nle`` the flows model the likelihood ``q(x | theta)`` instead, and the posterior
is ``q(x | theta) p(theta)`` up to a constant: the prior travels in the spec, and samples come
from MCMC (:mod:`pipeline.ensemble`, driven by :func:`pipeline.sampling.sample_posterior`).

An ensemble of ``K`` members (each its own embedding and flow, from its own initialisation) is
the equal-weight mixture of their densities: deep ensembles widen a posterior that one network,
trained on few simulations, makes over-confident (Hermans et al. 2022, "A Trust Crisis In
Simulation-Based Inference?", https://arxiv.org/abs/2110.06581).

It is saved as a ``state_dict`` (loadable with ``torch.load(..., weights_only=True)``) beside a
JSON :class:`PosteriorSpec` that rebuilds the architecture: no pickled objects, no Lightning
needed to sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import atomic
from pipeline.models.embeddings import build_embedding
from pipeline.models.flow_matching import TIME_FEATURES, FlowMatching
from pipeline.models.flows import build_flow
from pipeline.provenance import file_digest
from pipeline.tasks.base import Prior, prior_from_document
from pipeline.train_config import METHODS

WEIGHTS = "posterior.pt"
# (theta, x) pairs of one likelihood call when independent observations are combined.
IID_PAIRS = 2**16
SPEC = "posterior.json"
# w(theta) of rows theta (n, D) -> (n,): a proposal's density relative to the prior.
Ratio = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PosteriorSpec:
    """Everything needed to rebuild a :class:`NeuralPosterior` before loading its weights."""

    parameter_names: tuple[str, ...]
    x_shape: tuple[int, ...]
    flow: str = "nsf"
    transforms: int = 3
    flow_hidden: tuple[int, ...] = (64, 64)
    components: int = 4
    embedding: str = "mlp"
    embedding_dim: int = 32
    embedding_hidden: tuple[int, ...] = (64, 64)
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    ensemble: int = 1
    method: str = "npe"
    time_features: int = TIME_FEATURES
    extra: dict[str, Any] = field(default_factory=dict)

    def box(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The prior's bounds ``(low, high)`` as float32 arrays of shape ``(D,)``; ``None``
        each for an unbounded prior."""
        low = None if self.low is None else np.asarray(self.low, dtype=np.float32)
        high = None if self.high is None else np.asarray(self.high, dtype=np.float32)
        return low, high

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PosteriorSpec:
        tuples = ("parameter_names", "x_shape", "flow_hidden", "embedding_hidden", "low", "high")
        fields = {k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()}
        return cls(**fields)


class Member(nn.Module):
    """One density estimator of the ensemble: an embedding of x feeding a conditional flow
    (``npe``) or a flow-matching vector field (``fmpe``); for ``nle`` a flow over x whose
    context is theta itself."""

    def __init__(self, spec: PosteriorSpec) -> None:
        super().__init__()
        if spec.method not in METHODS:
            raise ValueError(f"unknown method {spec.method!r}; choose one of {', '.join(METHODS)}")
        features = len(spec.parameter_names)
        if spec.method == "nle":
            if len(spec.x_shape) != 1:
                raise ValueError(
                    f"method nle models x itself, which must be a vector; this x has shape "
                    f"{spec.x_shape}: use npe or fmpe (with an embedding), or summaries of x"
                )
            self.embedding = nn.Identity()
            self.flow = build_flow(
                spec.flow,
                spec.x_shape[0],
                features,
                spec.transforms,
                spec.flow_hidden,
                spec.components,
            )
            return
        self.embedding, context = build_embedding(
            spec.embedding, spec.x_shape, spec.embedding_dim, spec.embedding_hidden
        )
        if spec.method == "fmpe":
            self.flow = FlowMatching(features, context, spec.flow_hidden, spec.time_features)
        else:
            self.flow = build_flow(
                spec.flow, features, context, spec.transforms, spec.flow_hidden, spec.components
            )

    def forward(self, x: torch.Tensor) -> torch.distributions.Distribution:
        """The distribution of standardised theta given standardised ``x`` (N, *x_shape); for
        ``nle``, of standardised x given standardised theta (N, D)."""
        return self.flow(self.embedding(x))


class NeuralPosterior(nn.Module):
    """q(theta | x) in physical units: the mixture of ``spec.ensemble`` members.

    The flows model ``z = (theta - theta_mean) / theta_std`` given the embedding of
    ``(x - x_mean) / x_std``; z-scoring makes one architecture work across tasks whose parameters
    differ by orders of magnitude.

    Arguments:
        spec: The architecture.
        theta_mean, theta_std: Shape ``(D,)``.
        x_mean, x_std: Shape ``x_shape``.
    """

    def __init__(
        self,
        spec: PosteriorSpec,
        theta_mean: torch.Tensor | None = None,
        theta_std: torch.Tensor | None = None,
        x_mean: torch.Tensor | None = None,
        x_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if spec.ensemble < 1:
            raise ValueError(f"ensemble must be at least 1, got {spec.ensemble}")
        self.spec = spec
        dim = len(spec.parameter_names)
        self.members = nn.ModuleList(Member(spec) for _ in range(spec.ensemble))
        self.register_buffer("theta_mean", _or(theta_mean, torch.zeros(dim)))
        self.register_buffer("theta_std", _or(theta_std, torch.ones(dim)))
        self.register_buffer("x_mean", _or(x_mean, torch.zeros(spec.x_shape)))
        self.register_buffer("x_std", _or(x_std, torch.ones(spec.x_shape)))
        self.prior: Prior | None = None
        if spec.method == "nle":
            if "prior" not in spec.extra:
                raise ValueError("method nle needs the prior in spec.extra['prior']")
            self.prior = prior_from_document(spec.extra["prior"])

    def set_ode_tolerance(self, tolerance: float) -> None:
        """The relative tolerance of an FMPE posterior's ODE solver in sampling and densities
        (its absolute tolerance a tenth of it); NPE and NLE have no ODE and are left as they
        are."""
        for member in self.members:
            if isinstance(member.flow, FlowMatching):
                member.flow.tolerance = tolerance

    @property
    def is_likelihood(self) -> bool:
        """Whether the members model ``q(x | theta)`` (NLE) rather than ``q(theta | x)``."""
        return self.spec.method == "nle"

    def member_log_prob(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log q_k(theta | x) of every member k; for NLE the likelihood log q_k(x | theta).

        Shapes: ``theta`` (..., N, D), ``x`` (N, *x_shape) -> (K, ..., N).
        """
        z = (theta - self.theta_mean) / self.theta_std
        x = (x - self.x_mean) / self.x_std
        log_q = torch.stack([self._member_log_q(member, z, x) for member in self.members])
        # zuko's ODE solver returns a graph over the weights even under no_grad (FMPE).
        return log_q if torch.is_grad_enabled() else log_q.detach()

    def _member_log_q(self, member: Member, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One member's log-density in the original units, of standardised ``z`` (..., N, D)
        and standardised ``x`` (N, *x_shape): log q_k(theta | x), or log q_k(x | theta) for
        NLE -> (..., N)."""
        if self.is_likelihood:
            x = x.expand(*z.shape[:-1], x.shape[-1])
            return member(z).log_prob(x) - self.x_std.log().sum()
        return member(x).log_prob(z) - self.theta_std.log().sum()

    @torch.no_grad()
    def log_prob_reaches(
        self, theta: torch.Tensor, x: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        """Whether ``log_prob(theta, x) >= threshold`` for rows ``theta`` (M, D) at one
        observation ``x`` (1, *x_shape): (M,) booleans.

        The members are evaluated one at a time, each on the rows still below ``threshold``:
        the mixture's density is at least the members' so far (the others only add to it), so
        a row they already put above it is inside whatever the rest say. Rows in a region's bulk
        are decided by the first member; only rows outside need them all (posterior draws were
        tested in half the time with four members: ``benchmarks/region.py``).
        """
        z = ((theta - self.theta_mean) / self.theta_std)[:, None]  # (M, 1, D)
        x = (x - self.x_mean) / self.x_std
        like = {"dtype": torch.float64, "device": theta.device}
        offset = torch.full((len(theta),), -math.log(len(self.members)), **like)
        if self.is_likelihood:
            offset = self._times_prior(offset, theta)
        total = torch.full((len(theta),), -math.inf, **like)
        below = torch.arange(len(theta), device=theta.device)
        for member in self.members:
            log_q = self._member_log_q(member, z[below], x)[:, 0].detach().double()
            total[below] = torch.logaddexp(total[below], log_q)
            below = below[total[below] + offset[below] < threshold]
            if not len(below):
                break
        return total + offset >= threshold

    def log_prob(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log q(theta | x): ``theta`` (..., N, D), ``x`` (N, *x_shape) -> (..., N).

        For NLE, ``log q(x | theta) + log p(theta)``: the posterior up to a constant that
        depends on x alone (HPD ranks and MCMC need no more); -inf outside the prior.
        """
        log_q = self._mixture_log_prob(theta, x)
        return self._times_prior(log_q, theta) if self.is_likelihood else log_q

    def iid_log_prob(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """NLE's posterior given ``n`` independent observations of one ``theta``, up to a
        constant: ``sum_i log q(x_i | theta) + log p(theta)``.

        Shapes: ``theta`` (..., D), ``x`` (n, *x_shape) -> (...).

        Raises:
            TypeError: For NPE and FMPE, whose ``q(theta | x)`` cannot combine observations.
        """
        if not self.is_likelihood:
            raise TypeError(
                f"a {self.spec.method} posterior q(theta | x) cannot combine independent "
                "observations after training; train with method nle"
            )
        # In slices of x: every theta at every observation at once grows with their product
        # (1024 starting walkers at 10^4 observations took 7.5 GB).
        step = max(1, IID_PAIRS // max(1, math.prod(theta.shape[:-1])))
        log_likelihood = sum(
            self._mixture_log_prob(
                theta[..., None, :].expand(*theta.shape[:-1], len(part), theta.shape[-1]), part
            ).sum(dim=-1)
            for part in x.split(step)
        )
        return self._times_prior(log_likelihood, theta)

    def _times_prior(self, log_likelihood: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``log_likelihood + log p(theta)`` (NLE), -inf outside the prior: a theta there may
        still get a finite (meaningless) likelihood. Shapes (...) and (..., D) -> (...)."""
        log_prior = self.prior.log_prob(theta.detach().cpu().double().numpy())
        log_prior = torch.as_tensor(
            log_prior, dtype=log_likelihood.dtype, device=log_likelihood.device
        )
        return torch.where(torch.isfinite(log_prior), log_likelihood + log_prior, -math.inf)

    def _mixture_log_prob(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The members' equal-weight mixture of :meth:`member_log_prob`: (..., N)."""
        log_q = self.member_log_prob(theta, x)
        return torch.logsumexp(log_q, dim=0) - math.log(len(self.members))

    def member_loss(
        self, theta: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Each member's training loss of each pair: ``theta`` (N, D), ``x`` (N, *x_shape) ->
        (K, N): ``-log q_k`` for NPE, the flow-matching loss for FMPE (``generator`` draws its
        times and noise)."""
        if self.spec.method != "fmpe":
            return -self.member_log_prob(theta, x)
        z = (theta - self.theta_mean) / self.theta_std
        x = (x - self.x_mean) / self.x_std
        return torch.stack(
            [member.flow.loss(z, member.embedding(x), generator) for member in self.members]
        )

    def validation_loss(
        self, theta: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The loss early stopping watches, per pair (N,): ``-log q`` of the mixture for NPE
        and NLE; for FMPE the members' mean flow-matching loss (a density needs an ODE solve)."""
        if self.spec.method == "fmpe":
            return self.member_loss(theta, x, generator).mean(dim=0)
        return -self._mixture_log_prob(theta, x)

    def member_log_normaliser(
        self, x: torch.Tensor, ratio: Ratio, draws: int, floor: float
    ) -> torch.Tensor:
        """``log E_{q_k(theta' | x)}[w(theta')]`` of each member ``k`` by ``draws`` of its own
        per ``x`` (N, *x_shape) -> (K, N): what normalises NPE's loss over a proposal of density
        ``prior * w`` (:mod:`pipeline.rounds.proposal`).

        Value and gradient as :func:`log_mean_weight` (``floor``: the smallest ``w`` inside the
        prior); the gradient is the score function's, as ``w`` is piecewise constant and the
        draws' reparametrisation carries none. Draws use torch's global generator: the caller
        seeds it.
        """
        normalisers = []
        for distribution, z in self._member_draws(x, draws):
            with torch.no_grad():
                theta = z * self.theta_std + self.theta_mean
                w = ratio(theta.flatten(0, 1)).view(draws, len(x))
            normalisers.append(log_mean_weight(w, distribution.log_prob(z), floor))
        return torch.stack(normalisers)

    def member_overconfidence(
        self, theta: torch.Tensor, x: torch.Tensor, draws: int
    ) -> torch.Tensor:
        """How far each member's highest-density regions undercover the pairs ``theta`` (N, D),
        ``x`` (N, *x_shape), by ``draws`` of its own per ``x`` -> (K,): :func:`overconfidence`.

        Each member is calibrated on its own, as each learns by its own loss; their mixture,
        which is sampled and tested, is wider than its members where they disagree.
        Draws use torch's global generator: the caller seeds it.
        """
        z = (theta - self.theta_mean) / self.theta_std
        return torch.stack(
            [
                overconfidence(distribution.log_prob(z), distribution.log_prob(draw))
                for distribution, draw in self._member_draws(x, draws)
            ]
        )

    def _member_draws(
        self, x: torch.Tensor, draws: int
    ) -> Iterator[tuple[torch.distributions.Distribution, torch.Tensor]]:
        """Each member's ``q_k(z | x)`` at ``x`` (N, *x_shape), with ``draws`` of it per ``x``
        in standardised units, (M, N, D), without a graph: the draws of
        :meth:`member_log_normaliser` and :meth:`member_overconfidence`, whose gradients come
        through the densities."""
        x_standard = (x - self.x_mean) / self.x_std
        for member in self.members:
            distribution = member(x_standard)
            with torch.no_grad():
                z = distribution.sample((draws,))
            yield distribution, z  # outside no_grad: the caller's densities need their graph

    @torch.no_grad()
    def log_normaliser(
        self, x: torch.Tensor, ratio: Ratio, draws: int, floor: float
    ) -> torch.Tensor:
        """``log E_{q(theta' | x)}[w(theta')]`` of the mixture, its value only (validation):
        ``x`` (N, *x_shape) -> (N,); as :meth:`member_log_normaliser`."""
        theta = self.sample(x, draws)
        return _log_mean(ratio(theta.flatten(0, 1)).view(draws, len(x)), floor)

    def sample_and_log_prob(
        self, x: torch.Tensor, num_samples: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws ``num_samples`` per observation: ``x`` (N, *x_shape) -> (M, N, D), (M, N).

        Raises:
            TypeError: For NLE, whose posterior is sampled by MCMC with diagnostics that this
                signature cannot return: use :func:`pipeline.sampling.sample_posterior`.
        """
        if self.is_likelihood:
            raise TypeError(
                "an NLE posterior is sampled by MCMC: use pipeline.sampling.sample_posterior"
            )
        if len(self.members) == 1:
            distribution = self.members[0]((x - self.x_mean) / self.x_std)
            z, log_q = _draws_with_log_prob(distribution, num_samples)
            theta, log_q = z * self.theta_std + self.theta_mean, log_q - self.theta_std.log().sum()
            return (theta, log_q) if torch.is_grad_enabled() else (theta.detach(), log_q.detach())
        theta = self.sample(x, num_samples)
        return theta, self.log_prob(theta, x)

    def sample(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Draws ``num_samples`` per observation without their densities: ``x`` (N, *x_shape)
        -> (M, N, D). For FMPE a density costs an ODE solve with the field's trace per member,
        several times the draw itself.

        Raises:
            TypeError: For NLE (see :meth:`sample_and_log_prob`).
        """
        if self.is_likelihood:
            raise TypeError(
                "an NLE posterior is sampled by MCMC: use pipeline.sampling.sample_posterior"
            )
        x_standard = (x - self.x_mean) / self.x_std
        if len(self.members) == 1:
            z = _draws(self.members[0](x_standard), (num_samples,))
        else:
            # Each draw comes from a member chosen uniformly; a member draws only its own share
            # (not M per observation, then discarded: that made sampling K times dearer), each
            # draw conditioned on its observation's embedding, computed once per observation.
            choice = torch.randint(len(self.members), (num_samples, len(x)), device=x.device)
            z = torch.empty(num_samples, len(x), len(self.spec.parameter_names), device=x.device)
            for k, member in enumerate(self.members):
                draw, observation = torch.nonzero(choice == k, as_tuple=True)
                if len(draw):
                    context = member.embedding(x_standard)[observation]  # (draws of k, C)
                    z[draw, observation] = _draws(member.flow(context), ())
        theta = z * self.theta_std + self.theta_mean
        return theta if torch.is_grad_enabled() else theta.detach()


def log_mean_weight(w: torch.Tensor, log_q: torch.Tensor, floor: float) -> torch.Tensor:
    """``log mean_m w_m`` per column of ``w`` (M, N), the weights of draws ``theta'_m`` of
    ``q``, with the score-function gradient of ``log E_q[w]``: ``log_q`` (M, N) holds
    ``log q(theta'_m)`` with its graph. The gradient is ``sum_m (w_m / sum w - 1 / M) grad
    log q(theta'_m)`` (the ``1 / M`` a baseline of expectation zero); a mean of 0 counts as
    one draw of weight ``floor``. -> (N,)"""
    coefficient = w / w.sum(dim=0).clamp_min(floor) - 1.0 / len(w)
    score = (coefficient.detach() * log_q).sum(dim=0)
    return _log_mean(w, floor).detach() + score - score.detach()


def overconfidence(log_q_true: torch.Tensor, log_q_draws: torch.Tensor) -> torch.Tensor:
    """Falkiewicz et al. 2023's conservativeness penalty ("Calibrating Neural Simulation-Based
    Inference with Differentiable Coverage Probability", https://arxiv.org/abs/2310.13402):
    ``log_q_true`` (N,) holds each pair's ``log q(theta_i | x_i)``, ``log_q_draws`` (M, N) the
    densities of ``M`` draws from ``q(. | x_i)``; both with their graphs.

    The credibility at which ``q``'s highest-density region first covers ``theta_i`` is the
    share of draws denser than it, ``c_i``; for a calibrated ``q`` it is uniform, and an
    over-confident one puts it near 1. The penalty is the mean squared excess of the sorted
    ``c_i`` over the uniform's quantiles ``i / (N + 1)``: it widens and never narrows. It leans
    to width even at calibration: the ``c_i`` take only ``M + 1`` values, whose quantiles sit
    above the uniform's, and ``N`` pairs' sorted values scatter around them, so a calibrated
    ``q`` still scores about 3e-3 (``M`` 8, ``N`` 64) and is widened a little; the weight sets
    how far that goes (``benchmarks/README.md``: weights above 3 made ``slcp`` under-confident).

    The indicator "denser" has a straight-through gradient, the log-density difference's. Its
    part through the draws' densities has expectation zero (the score's, under ``q``): what
    widens is the likelihood's gradient at the true parameters, weighted by how far each pair's
    credibility exceeds its quantile. -> ()"""
    difference = log_q_draws - log_q_true  # > 0 where a draw is denser than the truth
    denser = (difference > 0).to(difference.dtype)
    credibility = (denser + difference - difference.detach()).mean(dim=0)  # (N,)
    uniform = torch.arange(1, len(credibility) + 1, device=credibility.device) / (
        len(credibility) + 1
    )
    excess = torch.relu(torch.sort(credibility).values - uniform)
    return excess.square().mean()


def _log_mean(w: torch.Tensor, floor: float) -> torch.Tensor:
    """``log mean_m w_m`` per column of ``w`` (M, N) -> (N,), a mean of 0 counted as one draw
    of weight ``floor``."""
    return torch.log(w.mean(dim=0).clamp_min(floor / len(w)))


def _draws(distribution: torch.distributions.Distribution, shape: tuple[int, ...]) -> torch.Tensor:
    """Draws of ``shape`` from a flow (reparametrised: gradients reach the weights) or from a
    mixture density network, whose discrete choice of component has no reparametrisation."""
    if distribution.has_rsample:
        return distribution.rsample(shape)
    return distribution.sample(shape)


def _draws_with_log_prob(
    distribution: torch.distributions.Distribution, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` draws with their log-densities, as :func:`_draws`."""
    if distribution.has_rsample:
        return distribution.rsample_and_log_prob((num_samples,))
    draws = distribution.sample((num_samples,))
    return draws, distribution.log_prob(draws)


def _or(value: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if value is None else torch.as_tensor(value, dtype=torch.float32)


def save_posterior(posterior: NeuralPosterior, folder: Path, metadata: dict[str, Any]) -> None:
    """Writes ``posterior.pt`` (state dict) and ``posterior.json`` (spec + ``metadata`` + the
    weights' digest).

    Two files cannot be replaced at once: the JSON names the digest of its weights, so a save
    killed between the two renames leaves a pair that :func:`load_posterior` refuses, not new
    weights read as the old run's."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(folder / WEIGHTS) as temporary:
        torch.save(posterior.state_dict(), temporary)
        digest = file_digest(temporary)
    document = {"spec": asdict(posterior.spec), **metadata, "weights_digest": digest}
    atomic.write_json(folder / SPEC, document, indent=2, sort_keys=True)


def load_posterior(folder: Path) -> tuple[NeuralPosterior, dict[str, Any]]:
    """Rebuilds the posterior saved in ``folder``; returns it (eval mode) with its metadata.

    Raises:
        FileNotFoundError: If ``posterior.pt`` or ``posterior.json`` is missing.
    """
    folder = Path(folder)
    if folder.is_file():
        raise FileNotFoundError(
            f"{folder} is a file; a model is the folder that holds {WEIGHTS} and {SPEC}: give "
            f"{folder.parent}"
        )
    for name in (WEIGHTS, SPEC):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder / name} does not exist; run `pipeline train --out {folder}` first"
            )
    try:
        document = json.loads((folder / SPEC).read_text())
        spec = PosteriorSpec.from_json(document["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{folder / SPEC} is not a posterior description written by `pipeline train` "
            f"({type(error).__name__}: {error}); train again into {folder} with --overwrite"
        ) from None
    recorded = document.get("weights_digest")
    if recorded is not None and file_digest(folder / WEIGHTS) != recorded:
        raise ValueError(
            f"{folder / WEIGHTS} is not the file {folder / SPEC} was saved with (digest "
            f"{file_digest(folder / WEIGHTS)}, recorded {recorded}): a save was interrupted "
            f"or one file replaced; train again into {folder} with --overwrite"
        )
    posterior = NeuralPosterior(spec)
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    try:
        posterior.load_state_dict(state)
    except RuntimeError as error:
        first = " ".join(str(error).split("\n")[1:2]).strip() or str(error)  # torch lists all
        raise ValueError(
            f"{folder / WEIGHTS} does not hold the weights {folder / SPEC} describes ({first}); "
            f"train again into {folder} with --overwrite"
        ) from None
    return posterior.eval(), document

"""What a stack of rounds' simulations was drawn from, relative to the prior: the weight that
normalises NPE's loss over the rounds' proposal.

Round ``k`` of a stack of rounds ``0..r`` draws its ``n_k`` parameters from the prior restricted
to the nested region ``R_k`` (``R_0`` the prior's support) of prior mass ``m_k``, so the stack's
parameters follow ``proposal(theta) = prior(theta) w(theta)`` with

    w(theta) = sum_k (n_k / N) 1[theta in R_k] / m_k.

Trained by ``-log q(theta | x)`` on these pairs, the flow learns the posterior under that
proposal, ``p(theta | x) w(theta) / E_p(theta | x)[w]``: the true posterior cut at the regions'
edges wherever ``x``'s posterior reaches them. A flow that would represent the true posteriors
exactly (a Gaussian for ``gaussian_linear``) must bend to those cuts, and the bend reaches the
observation's posterior too. Adding ``log E_q(theta' | x)[w(theta')]`` to the loss (Greenberg et
al. 2019's correction for a proposal, with the proposal's density known up to the regions)
makes the true posterior the minimiser again for every ``x``.

Reference:
    | Automatic Posterior Transformation for Likelihood-Free Inference
    | (Greenberg, Nonnenmacher & Macke, ICML 2019) https://arxiv.org/abs/1905.07488
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.rounds.records import Truncation
from pipeline.rounds.region import TruncatedPrior, load_region
from pipeline.tasks import get_task

log = logging.getLogger(__name__)


class StackProposal:
    """The density ratio ``w(theta)`` of a stack's proposal to the prior.

    Arguments:
        region: The last round's region, whose levels ``0..r-1`` define ``R_1..R_r``.
        counts: Simulations of rounds ``0..r`` (``n_k``), those whose ``x`` is not finite
            included: training drops them by ``x`` alone, which leaves ``p(theta | x)`` of
            every finite ``x`` as it was, so the proposal to correct for is the one the
            parameters were drawn from, however unevenly the simulator fails across rounds.
        masses: Prior masses of ``R_1..R_r`` (``m_k``; the prior's own is 1).
    """

    def __init__(
        self, region: TruncatedPrior, counts: Sequence[int], masses: Sequence[float]
    ) -> None:
        if len(counts) != len(region.truncation.levels) + 1 or len(masses) != len(counts) - 1:
            raise ValueError(
                f"a stack of {len(counts)} rounds needs a region of {len(counts) - 1} levels "
                f"and as many prior masses; got {len(region.truncation.levels)} and {len(masses)}"
            )
        self.region = region
        shares = np.asarray(counts, dtype=np.float64) / sum(counts)
        # weights[d + 1]: w of a theta of depth d (TruncatedPrior.depth: inside the prior and
        # the regions R_1..R_d; -1 outside the prior, where the proposal never draws).
        self.weights = np.concatenate([[0.0], np.cumsum(shares / np.asarray([1.0, *masses]))])

    @property
    def smallest(self) -> float:
        """The smallest weight inside the prior: round 0's share (the prior's own draws)."""
        return float(self.weights[1])

    @torch.no_grad()
    def ratio(self, theta: torch.Tensor) -> torch.Tensor:
        """``w(theta)`` of rows ``theta`` (n, D) -> (n,), on ``theta``'s device and dtype (the
        region's posteriors are evaluated on the CPU)."""
        depth = self.region.depth(theta.detach().cpu().double().numpy())
        return torch.as_tensor(self.weights[depth + 1], dtype=theta.dtype, device=theta.device)


def stack_proposal(data: Path, truncation: Path, models: Sequence[Path]) -> StackProposal:
    """The proposal of the stacked rounds in ``data`` (``pipeline stack-rounds``' file), given
    the last round's region: ``truncation`` (the truncation made after round ``r-1``) and the
    posteriors of rounds ``0..r-1`` in ``models``.

    Raises:
        ValueError: If ``data`` is not a stack of rounds, or its rounds were drawn from other
            regions than ``truncation``'s levels (another run's truncation, or a stack of
            another number of rounds).
    """
    attrs = storage.read_attrs(data)
    rounds = attrs.get("rounds")
    if not rounds:
        raise ValueError(
            f"{data} is not a stack of rounds (`pipeline stack-rounds`' file), so it has no "
            "proposal to correct the loss for: train without --truncation"
        )
    missing = [index for index, entry in enumerate(rounds) if "num_simulations" not in entry]
    if missing:
        raise ValueError(
            f"{data} does not record how many simulations each round holds (round {missing[0]}); "
            "stack the rounds again with `pipeline stack-rounds --overwrite`"
        )
    record = Truncation.read(truncation)
    levels = record.levels
    if len(levels) != len(rounds) - 1:
        raise ValueError(
            f"{data} stacks {len(rounds)} rounds, so its last was drawn from a region of "
            f"{len(rounds) - 1} levels, but {truncation} has {len(levels)}: pass the "
            "truncation made after the stack's second-to-last round"
        )
    for index, entry in enumerate(rounds[1:], start=1):
        proposal = entry.get("proposal") or {}
        # The whole chain where the round records it: its last level alone may match a region
        # cut without the earlier ones (the same threshold, another region).
        last = {"model_digest": proposal.get("model"), "threshold": proposal.get("threshold")}
        if proposal.get("levels", [*levels[: index - 1], last]) != levels[:index]:
            raise ValueError(
                f"round {index} of {data} was drawn from another region than level "
                f"{index - 1} of {truncation} (model {proposal.get('model')}, threshold "
                f"{proposal.get('threshold')}); pass the truncation of this run's rounds"
            )
    aimed = {(entry.get("proposal") or {}).get("observation") for entry in rounds[1:]}
    if aimed - {None, record.observation_digest}:
        raise ValueError(
            f"the rounds of {data} were drawn from regions cut at another observation than "
            f"{truncation}'s: pass the truncation of this run's rounds"
        )
    region = load_region(truncation, models, get_task(record.task).prior)
    counts = [int(entry["num_simulations"]) for entry in rounds]
    masses = [float(entry["proposal"]["prior_mass"]) for entry in rounds[1:]]
    proposal = StackProposal(region, counts, masses)
    log.info(
        "proposal of %d rounds (%s simulations; regions' prior mass %s): the loss is "
        "normalised by E_q[w]",
        len(rounds),
        "+".join(map(str, counts)),
        ", ".join(f"{mass:.3g}" for mass in masses),
    )
    return proposal

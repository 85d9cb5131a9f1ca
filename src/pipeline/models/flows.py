"""Conditional normalizing flows from zuko, chosen by name."""

from __future__ import annotations

import zuko

FLOWS = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF, "naf": zuko.flows.NAF}


def build_flow(
    kind: str, features: int, context: int, transforms: int, hidden_features: tuple[int, ...]
) -> zuko.flows.Flow:
    """A zuko flow over ``features`` dimensions conditioned on a ``context``-wide embedding.

    Arguments:
        kind: ``"nsf"`` (neural spline flow, Durkan et al. 2019), ``"maf"`` (masked
            autoregressive flow, Papamakarios et al. 2017) or ``"naf"`` (neural autoregressive
            flow, Huang et al. 2018).
        features: Dimension of ``theta``.
        context: Width of the embedding of ``x``.
        transforms: Number of stacked transformations.
        hidden_features: Hidden widths of each transformation's conditioner.
    """
    try:
        flow = FLOWS[kind]
    except KeyError:
        raise ValueError(f"unknown flow {kind!r}; choose one of {', '.join(FLOWS)}") from None
    return flow(features, context, transforms=transforms, hidden_features=hidden_features)

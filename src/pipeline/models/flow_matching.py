"""Flow-matching posterior estimation (FMPE): a conditional vector field instead of a flow.

A network ``v(t, z | c)`` learns the velocity that carries each standardised parameter ``z`` at
``t = 0`` along a straight line to Gaussian noise at ``t = 1`` (conditional flow matching; the
training target needs no density, only draws). Integrating the field turns it into a density:
zuko's :class:`~zuko.transforms.FreeFormJacobianTransform` solves the ODE and its exact trace
gives ``log q`` (exact for the small ``theta`` of these tasks), so an FMPE member samples and
evaluates densities through the same ``forward(c) -> distribution`` as a zuko flow.

References:
    | Flow Matching for Scalable Simulation-Based Inference (Wildberger et al., 2023)
    | https://arxiv.org/abs/2305.17161
    | Flow Matching for Generative Modeling (Lipman et al., 2023)
    | https://arxiv.org/abs/2210.02747
"""

from __future__ import annotations

import math

import torch
import zuko
from torch import nn
from zuko.distributions import DiagNormal, NormalizingFlow
from zuko.transforms import FreeFormJacobianTransform

__all__ = ["FlowMatching", "VectorField"]

# Noise added at t = 0, so that the field stays smooth where the data are (Wildberger et al.).
ETA = 1e-3


class VectorField(nn.Module):
    """``v(t, z | c)``: an MLP on ``z``, the context ``c`` and Fourier features of ``t``.

    Shapes: ``t`` (...), ``z`` (..., D), ``c`` (..., C) -> (..., D) (broadcast over ``...``).
    """

    def __init__(
        self, features: int, context: int, hidden_features: tuple[int, ...], frequencies: int = 3
    ) -> None:
        super().__init__()
        self.net = zuko.nn.MLP(
            features + context + 2 * frequencies, features, hidden_features, activation=nn.ELU
        )
        self.register_buffer("frequencies", torch.arange(1, frequencies + 1) * math.pi)

    def forward(self, t: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        angle = self.frequencies * t[..., None]
        time = torch.cat((angle.cos(), angle.sin()), dim=-1)
        shape = torch.broadcast_shapes(z.shape[:-1], c.shape[:-1], time.shape[:-1])
        parts = [part.expand(*shape, part.shape[-1]) for part in (z, c, time)]
        return self.net(torch.cat(parts, dim=-1))


class FlowMatching(nn.Module):
    """The FMPE counterpart of a zuko flow: ``forward(c)`` is the distribution ``q(z | c)``.

    Arguments:
        features: Dimension ``D`` of ``z`` (standardised theta).
        context: Width ``C`` of the embedding of ``x``.
        hidden_features: Hidden widths of the vector field's MLP.
        atol, rtol: Tolerances of the ODE solver (sampling and densities).
    """

    def __init__(
        self,
        features: int,
        context: int,
        hidden_features: tuple[int, ...],
        atol: float = 1e-5,
        rtol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.field = VectorField(features, context, hidden_features)
        self.atol, self.rtol = atol, rtol
        self.register_buffer("zeros", torch.zeros(features))
        self.register_buffer("ones", torch.ones(features))

    def forward(self, c: torch.Tensor) -> NormalizingFlow:
        """``q(z | c)`` for ``c`` (N, C): the ODE from ``t = 0`` (z) to ``t = 1`` (noise)."""
        transform = FreeFormJacobianTransform(
            f=lambda t, z: self.field(t, z, c),
            t0=c.new_tensor(0.0),
            t1=c.new_tensor(1.0),
            phi=(c, *self.field.parameters()),
            atol=self.atol,
            rtol=self.rtol,
            exact=True,
        )
        return NormalizingFlow(transform, DiagNormal(self.zeros, self.ones).expand(c.shape[:-1]))

    def loss(
        self, z: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The conditional flow-matching loss of each pair: ``z`` (N, D), ``c`` (N, C) -> (N,).

        ``generator`` draws the times and the noise, so that a run resumed from a checkpoint,
        or a validation set scored every epoch, sees the same draws.
        """
        t = torch.rand(z.shape[:-1], generator=generator, device=z.device, dtype=z.dtype)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z_t = (1 - t[..., None]) * z + (t[..., None] + ETA) * noise
        return (self.field(t, z_t, c) - (noise - z)).square().mean(dim=-1)

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
import torch.nn.functional as F
from torch import nn
from zuko.distributions import DiagNormal, NormalizingFlow
from zuko.transforms import FreeFormJacobianTransform

__all__ = ["FlowMatching", "VectorField"]

# Noise added at t = 0, so that the field stays smooth where the data are (Wildberger et al.).
ETA = 1e-3
# Rows per evaluation of the field on CPU: past a few thousand rows the activations fall out of
# cache, and an ODE solve of 10^5 draws in one batch took 4.5 times as long as in chunks of 4096
# (benchmarks/README.md, FMPE). A GPU takes the whole batch.
CPU_CHUNK = 4096
# The ODE solver's relative tolerance (its absolute tolerance is a tenth of it). Draws are as good
# at 10^-3 (the learned field's error dominates), but densities, which HPD coverage ranks, move by
# a median 0.01-0.02 nats there against 0.001 here (benchmarks/README.md, FMPE).
TOLERANCE = 1e-4
# Sinusoidal features of the time the field sees (the option time_features).
TIME_FEATURES = 16


class VectorField(nn.Module):
    """``v(t, z | c)``: a residual MLP in which every block sees the time.

    ``z`` and ``c`` are projected and merged into ``width`` features; each of ``blocks``
    residual blocks adds ``GELU(W h) + T(e(t))`` and normalises (LayerNorm), where ``e(t)`` are
    sinusoidal features of ``t`` at ``frequencies`` frequencies from 1 to 100 half-turns. A
    plain MLP that sees ``t`` only at its input learns the field's change with ``t`` poorly
    (sbi's FMPE network is built the same way). The output layer starts at zero, so the initial
    field is constant.

    Shapes: ``t`` (...), ``z`` (..., D), ``c`` (..., C) -> (..., D) (broadcast over ``...``).
    """

    def __init__(
        self,
        features: int,
        context: int,
        hidden_features: tuple[int, ...],
        frequencies: int = TIME_FEATURES,
    ) -> None:
        super().__init__()
        width = max(hidden_features)
        self.input = nn.Linear(features + context, width)
        self.time = nn.Linear(2 * frequencies, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in hidden_features)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in hidden_features)
        self.output = nn.Linear(width, features)
        nn.init.zeros_(self.output.weight)
        self.register_buffer("frequencies", math.pi * torch.logspace(0, 2, frequencies))

    def forward(self, t: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        angle = self.frequencies * t[..., None]
        time = self.time(torch.cat((angle.cos(), angle.sin()), dim=-1))
        shape = torch.broadcast_shapes(z.shape[:-1], c.shape[:-1], time.shape[:-1])
        inputs = torch.cat((z.expand(*shape, z.shape[-1]), c.expand(*shape, c.shape[-1])), dim=-1)
        time = time.expand(*shape, time.shape[-1])
        if inputs.device.type != "cpu" or inputs[..., 0].numel() <= CPU_CHUNK:
            return self._field(inputs, time)
        rows = inputs.reshape(-1, inputs.shape[-1]).split(CPU_CHUNK)
        times = time.reshape(-1, time.shape[-1]).split(CPU_CHUNK)
        out = torch.cat([self._field(r, e) for r, e in zip(rows, times, strict=True)])
        return out.reshape(*shape, out.shape[-1])

    def _field(self, inputs: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The network on ``[z, c]`` (..., D + C) and the time's features (..., width)."""
        h = F.gelu(self.input(inputs))
        for block, norm in zip(self.blocks, self.norms, strict=True):
            h = norm(h + F.gelu(block(h)) + time)
        return self.output(h)


class FlowMatching(nn.Module):
    """The FMPE counterpart of a zuko flow: ``forward(c)`` is the distribution ``q(z | c)``.

    Arguments:
        features: Dimension ``D`` of ``z`` (standardised theta).
        context: Width ``C`` of the embedding of ``x``.
        hidden_features: One residual block of the vector field per entry, all of the largest
            width.
        time_features: Sinusoidal features of the time, at frequencies from 1 to 100 half-turns.
        tolerance: Relative tolerance of the ODE solver in sampling and densities (its absolute
            tolerance is a tenth of it); an attribute, so it can change after training.
    """

    def __init__(
        self,
        features: int,
        context: int,
        hidden_features: tuple[int, ...],
        time_features: int = TIME_FEATURES,
        tolerance: float = TOLERANCE,
    ) -> None:
        super().__init__()
        self.field = VectorField(features, context, hidden_features, time_features)
        self.tolerance = tolerance
        self.register_buffer("zeros", torch.zeros(features))
        self.register_buffer("ones", torch.ones(features))

    def forward(self, c: torch.Tensor) -> NormalizingFlow:
        """``q(z | c)`` for ``c`` (N, C): the ODE from ``t = 0`` (z) to ``t = 1`` (noise)."""
        transform = FreeFormJacobianTransform(
            f=lambda t, z: self.field(t, z, c),
            t0=c.new_tensor(0.0),
            t1=c.new_tensor(1.0),
            phi=(c, *self.field.parameters()),
            atol=self.tolerance / 10,
            rtol=self.tolerance,
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

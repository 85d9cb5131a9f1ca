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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution
from zuko.distributions import DiagNormal, NormalizingFlow
from zuko.transforms import FreeFormJacobianTransform

from pipeline.train_config import TIME_FEATURES

__all__ = ["FieldFlow", "FlowMatching", "VectorField"]

# Noise added at t = 0, so that the field stays smooth where the data are (Wildberger et al.).
ETA = 1e-3
# Rows per ODE solve on CPU. zuko's adaptive solver sizes every step by the worst row of its
# batch, so smaller batches take fewer steps each, and past a few thousand rows the field's
# activations fall out of cache (benchmarks/README.md, FMPE). A GPU solves the whole batch.
CPU_CHUNK = 4096
# The ODE solver's relative tolerance (its absolute tolerance is a tenth of it). Draws are as good
# at 10^-3 (the learned field's error dominates), but densities, which HPD coverage ranks, move by
# a median 0.001-0.003 nats there against 0.0001-0.0005 here (benchmarks/README.md, FMPE).
TOLERANCE = 1e-4
# Their frequencies, in half-turns over t in [0, 1]. Features up to 100 half-turns let the field
# wiggle in t where the flow is smooth (near the noise): the ODE solver took 2.7-3.5 times as many
# steps, for about the same C2ST at 10^4 simulations on four tasks (though 0.025 better on
# two_moons at 10^3; benchmarks/README.md, FMPE).
HALF_TURNS = (0.1, 10.0)


class VectorField(nn.Module):
    """``v(t, z | c)``: a residual MLP in which every block sees the time.

    ``z`` and ``c`` are projected and merged into ``width`` features; each of ``blocks``
    residual blocks adds ``GELU(W h) + T(e(t))`` and normalises (LayerNorm), where ``e(t)`` are
    sinusoidal features of ``t`` at ``frequencies`` frequencies over :data:`HALF_TURNS`. A
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
        # A buffer: a saved field keeps the frequencies it was trained with.
        low, high = (math.log10(h) for h in HALF_TURNS)
        self.register_buffer("frequencies", math.pi * torch.logspace(low, high, frequencies))

    def forward(self, t: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        angle = self.frequencies * t[..., None]
        time = self.time(torch.cat((angle.cos(), angle.sin()), dim=-1))
        shape = torch.broadcast_shapes(z.shape[:-1], c.shape[:-1], time.shape[:-1])
        inputs = torch.cat((z.expand(*shape, z.shape[-1]), c.expand(*shape, c.shape[-1])), dim=-1)
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
        time_features: Sinusoidal features of the time, at frequencies over :data:`HALF_TURNS`.
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

    def forward(self, c: torch.Tensor) -> FieldFlow:
        """``q(z | c)`` for ``c`` (N, C): the ODE from ``t = 0`` (z) to ``t = 1`` (noise)."""
        return FieldFlow(self, c)

    def transform(self, c: torch.Tensor) -> FreeFormJacobianTransform:
        """The ODE of the field at ``c`` (N, C), from ``z`` (N, D) at ``t = 0`` to noise at
        ``t = 1``, and its exact log-determinant (the field's trace integrated)."""
        return FreeFormJacobianTransform(
            f=lambda t, z: self.field(t, z, c),
            t0=c.new_tensor(0.0),
            t1=c.new_tensor(1.0),
            phi=(c, *self.field.parameters()),
            atol=self.tolerance / 10,
            rtol=self.tolerance,
            exact=True,
        )

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


class FieldFlow(Distribution):
    """``q(z | c)`` of a :class:`FlowMatching` field: zuko's ``NormalizingFlow`` of the field's
    ODE, solved :data:`CPU_CHUNK` rows at a time on CPU, each chunk with its own steps.

    Shapes: ``c`` (*B, C); ``log_prob(z)``: ``z`` (..., *B, D) -> (..., *B);
    ``rsample(shape)`` -> (*shape, *B, D).
    """

    has_rsample = True

    def __init__(self, flow: FlowMatching, c: torch.Tensor) -> None:
        super().__init__(c.shape[:-1], flow.zeros.shape, validate_args=False)
        self.flow, self.c = flow, c
        self.base = DiagNormal(flow.zeros, flow.ones).expand(c.shape[:-1])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self._by_chunks(lambda flow, rows: (flow.log_prob(rows),), z)[0]

    def rsample(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        noise = self.base.rsample(shape)
        return self._by_chunks(lambda flow, rows: (flow.transform.inv(rows),), noise)[0]

    def rsample_and_log_prob(
        self, shape: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_q = self._by_chunks(_solve_with_log_prob, self.base.rsample(shape))
        return z, log_q

    def _by_chunks(
        self,
        solve: Callable[[NormalizingFlow, torch.Tensor], tuple[torch.Tensor, ...]],
        z: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """``solve(flow, rows)`` for the rows of ``z`` (*S, *B, D) with their ``c``, a chunk
        at a time; each result's leading dimension (rows) back in shape (*S, *B).

        The rows of one ``c`` (one observation) are solved together: an observation whose
        posterior is hard to integrate then sets the steps of its own chunks only (19-22 %
        fewer field evaluations than chunks that interleave five observations).
        """
        shape = torch.broadcast_shapes(z.shape[:-1], self.c.shape[:-1])
        lead = len(shape) - (self.c.dim() - 1)  # the dimensions S of draws per c
        draws_last = tuple(range(len(shape) - lead, len(shape)))

        def rows(t: torch.Tensor) -> torch.Tensor:
            t = t.expand(*shape, t.shape[-1]).movedim(tuple(range(lead)), draws_last)
            return t.reshape(-1, t.shape[-1])

        z_rows, c_rows = rows(z), rows(self.c)
        size = CPU_CHUNK if z_rows.device.type == "cpu" else max(len(z_rows), 1)
        parts = []
        for z_part, c_part in zip(z_rows.split(size), c_rows.split(size), strict=True):
            base = DiagNormal(self.flow.zeros, self.flow.ones).expand(c_part.shape[:-1])
            parts.append(solve(NormalizingFlow(self.flow.transform(c_part), base), z_part))
        grouped = (*shape[lead:], *shape[:lead])
        return tuple(
            torch.cat(results)
            .reshape(*grouped, *results[0].shape[1:])
            .movedim(draws_last, tuple(range(lead)))
            for results in zip(*parts, strict=True)
        )


def _solve_with_log_prob(
    flow: NormalizingFlow, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws that ``noise`` (N, D) at ``t = 1`` solves to, and their log-densities."""
    z, ladj = flow.transform.inv.call_and_ladj(noise)
    return z, flow.base.log_prob(noise) - ladj

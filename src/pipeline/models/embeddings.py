"""Embedding networks: map an observation ``x`` of shape ``(N, *x_shape)`` to ``(N, C)``."""

from __future__ import annotations

import math

import torch
import zuko
from torch import nn

EMBEDDINGS = ("mlp", "identity")


class FlattenMLP(nn.Module):
    """Flattens ``x`` (N, *x_shape) and applies an MLP: output shape ``(N, out_features)``."""

    def __init__(
        self, x_shape: tuple[int, ...], out_features: int, hidden_features: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.mlp = zuko.nn.MLP(math.prod(x_shape), out_features, hidden_features=hidden_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(start_dim=1))


class Flatten(nn.Module):
    """Passes ``x`` through unchanged but flattened: ``(N, prod(x_shape))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(start_dim=1)


def build_embedding(
    kind: str, x_shape: tuple[int, ...], out_features: int, hidden_features: tuple[int, ...]
) -> tuple[nn.Module, int]:
    """Builds an embedding network; returns it with its output width ``C``.

    Arguments:
        kind: ``"mlp"`` (flatten + MLP) or ``"identity"`` (flatten only; ``C = prod(x_shape)``).
        x_shape: Shape of one observation.
        out_features: Width of the embedding for ``"mlp"``.
        hidden_features: Hidden widths of the MLP.
    """
    if kind == "mlp":
        return FlattenMLP(x_shape, out_features, hidden_features), out_features
    if kind == "identity":
        return Flatten(), math.prod(x_shape)
    raise ValueError(f"unknown embedding {kind!r}; choose one of {', '.join(EMBEDDINGS)}")

"""Embedding networks: map an observation ``x`` of shape ``(N, *x_shape)`` to ``(N, C)``."""

from __future__ import annotations

import math

import torch
import zuko
from torch import nn

EMBEDDINGS = ("mlp", "cnn", "identity")


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


class CNN(nn.Module):
    """Convolutional embedding of maps: ``x`` (N, H, W) or (N, C, H, W) -> (N, out_features).

    Each stage is a 3x3 convolution with circular padding (maps of a periodic box have no
    edges), a ReLU and 2x2 average pooling; then the mean over the remaining pixels and a linear
    layer. The global mean makes the output invariant to circular shifts of the map by multiples
    of ``2**stages`` pixels and independent of the map's size.

    Arguments:
        x_shape: ``(H, W)`` or ``(C, H, W)``.
        out_features: Width of the embedding.
        channels: Output channels of each stage.
    """

    def __init__(
        self, x_shape: tuple[int, ...], out_features: int, channels: tuple[int, ...]
    ) -> None:
        super().__init__()
        if len(x_shape) not in (2, 3):
            raise ValueError(
                f"the cnn embedding needs maps, x_shape (H, W) or (C, H, W); got {x_shape}. "
                "Use embedding: mlp for vectors"
            )
        side = min(x_shape[-2:])
        if side < 2 ** len(channels):
            raise ValueError(
                f"{len(channels)} cnn stages halve the map {len(channels)} times, but it is "
                f"{side} pixels wide; use at most {int(math.log2(side))} embedding_hidden entries"
            )
        layers: list[nn.Module] = []
        in_channels = 1 if len(x_shape) == 2 else x_shape[0]
        for width in channels:
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, padding_mode="circular"),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x).mean(dim=(-2, -1)))


def build_embedding(
    kind: str, x_shape: tuple[int, ...], out_features: int, hidden_features: tuple[int, ...]
) -> tuple[nn.Module, int]:
    """Builds an embedding network; returns it with its output width ``C``.

    Arguments:
        kind: ``"mlp"`` (flatten + MLP), ``"cnn"`` (maps; :class:`CNN`) or ``"identity"``
            (flatten only; ``C = prod(x_shape)``).
        x_shape: Shape of one observation.
        out_features: Width of the embedding for ``"mlp"`` and ``"cnn"``.
        hidden_features: Hidden widths of the MLP, or channels of the CNN's stages.
    """
    if kind == "mlp":
        return FlattenMLP(x_shape, out_features, hidden_features), out_features
    if kind == "cnn":
        return CNN(x_shape, out_features, hidden_features), out_features
    if kind == "identity":
        return Flatten(), math.prod(x_shape)
    raise ValueError(f"unknown embedding {kind!r}; choose one of {', '.join(EMBEDDINGS)}")

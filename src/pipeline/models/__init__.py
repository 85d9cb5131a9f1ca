"""Neural posterior estimators: embeddings, conditional flows and their Lightning module."""

from pipeline.models.embeddings import build_embedding
from pipeline.models.flows import FLOWS, build_flow
from pipeline.models.posterior import NeuralPosterior, PosteriorSpec

__all__ = ["FLOWS", "NeuralPosterior", "PosteriorSpec", "build_embedding", "build_flow"]

"""The contract every inference task fulfils: a prior, a simulator and, optionally, a reference.

A task is a pure description of a statistical model. It never touches files, MPI or torch; the
stages wrap it. All arrays are NumPy, float64 inside the task; storage casts to float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxUniform:
    """Independent uniform prior on a box ``[low, high]``.

    Arguments:
        low: Lower bounds, shape ``(D,)``.
        high: Upper bounds, shape ``(D,)``.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.low)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draws ``n`` parameters, shape ``(n, D)``."""
        return rng.uniform(np.asarray(self.low), np.asarray(self.high), size=(n, self.dim))

    def log_prob(self, theta: np.ndarray) -> np.ndarray:
        """Log-density of ``theta`` with shape ``(..., D)``; ``-inf`` outside the box."""
        low, high = np.asarray(self.low), np.asarray(self.high)
        inside = np.all((theta >= low) & (theta <= high), axis=-1)
        return np.where(inside, -np.sum(np.log(high - low)), -np.inf)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        return np.asarray(self.low), np.asarray(self.high)


@dataclass(frozen=True)
class DiagonalNormal:
    """Independent Gaussian prior ``N(loc, diag(scale**2))``.

    Arguments:
        loc: Means, shape ``(D,)``.
        scale: Standard deviations, shape ``(D,)``.
    """

    loc: tuple[float, ...]
    scale: tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.loc)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draws ``n`` parameters, shape ``(n, D)``."""
        return rng.normal(np.asarray(self.loc), np.asarray(self.scale), size=(n, self.dim))

    def log_prob(self, theta: np.ndarray) -> np.ndarray:
        """Log-density of ``theta`` with shape ``(..., D)``."""
        loc, scale = np.asarray(self.loc), np.asarray(self.scale)
        z = (theta - loc) / scale
        return np.sum(-0.5 * z**2 - np.log(scale) - 0.5 * np.log(2 * np.pi), axis=-1)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None


Prior = BoxUniform | DiagonalNormal


class Task(ABC):
    """A prior over ``theta``, a simulator of ``x`` given ``theta``, and optionally a reference.

    Class attributes every task sets:
        name: Registry key, e.g. ``"two_moons"``.
        parameter_names: One name per dimension of ``theta``.
        parameter_units: One astropy unit string per dimension (``""`` for dimensionless).
        x_shape: Shape of one simulation ``x`` (without the batch dimension).
        x_unit: Astropy unit string of ``x`` (``""`` for dimensionless).
        seed_block_size: Simulations drawn from one random generator. Simulation ``i`` belongs
            to block ``i // seed_block_size``, whose generator is seeded by ``(seed, block)``;
            the data therefore depend on the seed and the index alone, never on how the index
            range is split over ranks or chunks. Part of the task's definition: changing it
            changes the data.
    """

    name: str
    parameter_names: tuple[str, ...]
    parameter_units: tuple[str, ...]
    x_shape: tuple[int, ...]
    x_unit: str = ""
    seed_block_size: int = 1000

    @property
    @abstractmethod
    def prior(self) -> Prior:
        """The prior over ``theta``."""

    @abstractmethod
    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Simulates one ``x`` per row of ``theta``.

        Arguments:
            theta: Parameters, shape ``(n, D)``.
            rng: The only source of randomness.

        Returns:
            Simulations, shape ``(n, *x_shape)``, float64. Rows may hold NaN or inf where the
            model breaks down; the pipeline counts and excludes them.
        """

    @property
    def dim_theta(self) -> int:
        return len(self.parameter_names)

    @property
    def has_reference(self) -> bool:
        """Whether the task implements :meth:`reference_posterior` (overrides it)."""
        return type(self).reference_posterior is not Task.reference_posterior

    def reference_posterior(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Draws exact (or converged) posterior samples for one observation.

        Arguments:
            x_obs: One observation, shape ``x_shape``.
            num_samples: Number of samples ``M``.
            rng: The only source of randomness.

        Returns:
            Samples, shape ``(M, D)``.
        """
        raise NotImplementedError(f"task {self.name!r} has no reference posterior")

    def check_observation(self, x_obs: np.ndarray) -> np.ndarray:
        """Returns ``x_obs`` as float64 of shape ``x_shape``, or fails naming what is wrong."""
        x_obs = np.asarray(x_obs, dtype=np.float64)
        if x_obs.shape != tuple(self.x_shape):
            raise ValueError(f"x_obs has shape {x_obs.shape}, expected {tuple(self.x_shape)}")
        if not np.all(np.isfinite(x_obs)):
            raise ValueError("x_obs holds NaN or inf; the likelihood is undefined there")
        return x_obs

    def simulate_block(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``theta ~ prior`` then ``x ~ simulator``: ``(n, D)`` and ``(n, *x_shape)``."""
        theta = self.prior.sample(n, rng)
        return theta, self.simulate(theta, rng)

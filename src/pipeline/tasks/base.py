"""The contract every inference task fulfils: a prior, a simulator and, optionally, a reference.

A task is a pure description of a statistical model. It never touches files, MPI or torch; the
stages wrap it. All arrays are NumPy, float64 inside the task; storage casts to float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _finite_pair(
    first: Any, second: Any, prior: str, names: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """A prior's two parameter vectors as float64, refused unless finite and of one length:
    a prior with a NaN bound or a zero scale would give NaN densities, not an error."""
    arrays = tuple(np.asarray(values, dtype=np.float64) for values in (first, second))
    if any(a.ndim != 1 for a in arrays) or len(arrays[0]) != len(arrays[1]) or not len(arrays[0]):
        raise ValueError(
            f"{prior} needs {names[0]} and {names[1]} of one length, one per parameter"
        )
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{prior} needs finite {names[0]} and {names[1]}: {first}, {second}")
    return arrays


@dataclass(frozen=True)
class BoxUniform:
    """Independent uniform prior on a box ``[low, high]``.

    Arguments:
        low: Lower bounds, shape ``(D,)``.
        high: Upper bounds, shape ``(D,)``.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        low, high = _finite_pair(self.low, self.high, "BoxUniform", ("low", "high"))
        if not np.all(low < high):
            raise ValueError(f"BoxUniform needs low < high in every parameter: {low}, {high}")

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

    def __post_init__(self) -> None:
        _, scale = _finite_pair(self.loc, self.scale, "DiagonalNormal", ("loc", "scale"))
        if not np.all(scale > 0):
            raise ValueError(f"DiagonalNormal needs a positive scale in every parameter: {scale}")

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


@dataclass(frozen=True)
class MultivariateNormal:
    """Gaussian prior ``N(loc, precision^-1)`` given by its precision matrix.

    Arguments:
        loc: Mean, shape ``(D,)``.
        precision: Symmetric positive-definite precision matrix, ``D`` rows of ``D`` numbers.
    """

    loc: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...]

    @property
    def dim(self) -> int:
        return len(self.loc)

    @cached_property
    def _factors(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean ``(D,)``, the Cholesky factor ``L`` of the precision (``P = L L^T``) and the
        log-normaliser ``log det(P) / 2 - D log(2 pi) / 2``."""
        precision = np.asarray(self.precision, dtype=np.float64)
        chol = np.linalg.cholesky(precision)  # fails loudly unless positive definite
        log_norm = np.sum(np.log(np.diag(chol))) - 0.5 * self.dim * np.log(2 * np.pi)
        return np.asarray(self.loc, dtype=np.float64), chol, float(log_norm)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draws ``n`` parameters, shape ``(n, D)``: ``loc + L^-T z`` has covariance ``P^-1``."""
        loc, chol, _ = self._factors
        z = rng.standard_normal((n, self.dim))
        return loc + np.linalg.solve(chol.T, z.T).T

    def log_prob(self, theta: np.ndarray) -> np.ndarray:
        """Log-density of ``theta`` with shape ``(..., D)``."""
        loc, chol, log_norm = self._factors
        z = (np.asarray(theta) - loc) @ chol  # ||z||^2 = (theta - loc)^T P (theta - loc)
        return log_norm - 0.5 * np.sum(z**2, axis=-1)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None


Prior = BoxUniform | DiagonalNormal | MultivariateNormal
PRIORS = {kind.__name__: kind for kind in (BoxUniform, DiagonalNormal, MultivariateNormal)}


def prior_document(prior: Prior) -> dict:
    """The prior as JSON-ready data, e.g. ``{"kind": "BoxUniform", "low": [..], "high": [..]}``:
    what a saved likelihood estimator needs to turn into a posterior."""
    # The dataclass's fields only: vars() also holds what cached properties computed.
    values = {
        f.name: np.asarray(getattr(prior, f.name)).tolist() for f in dataclasses.fields(prior)
    }
    return {"kind": type(prior).__name__, **values}


def prior_from_document(document: dict) -> Prior:
    """Inverse of :func:`prior_document`.

    Raises:
        ValueError: If the kind is not one of :data:`PRIORS`.
    """
    fields = dict(document)
    kind = PRIORS.get(fields.pop("kind", None))
    if kind is None:
        raise ValueError(f"unknown prior {document.get('kind')!r}; one of {', '.join(PRIORS)}")
    return kind(**{k: _tuples(v) for k, v in fields.items()})


def _tuples(value: list) -> tuple:
    return tuple(_tuples(v) if isinstance(v, list) else v for v in value)


@dataclass(frozen=True, eq=False)  # arrays: no field-wise ==
class Reference:
    """Reference posterior samples for one observation, with how they were obtained.

    Attributes:
        samples: Posterior samples, shape ``(M, D)``, float64.
        method: How they were drawn, e.g. ``"exact (rejection)"``, ``"grid"`` or
            ``"mcmc (emcee)"``; the task's :attr:`Task.reference_method`.
        diagnostics: Numbers that vouch for them (e.g. ``rhat_max``, ``ess_bulk_min``,
            ``acceptance`` for MCMC); empty for exact methods.
    """

    samples: np.ndarray
    method: str
    diagnostics: dict[str, float] = field(default_factory=dict)


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
        reference_method: How the reference posterior is drawn (``"exact (analytic)"``,
            ``"exact (rejection)"``, ``"grid"``, ``"mcmc (emcee)"``), recorded beside the
            samples; ``""`` for tasks without a reference.
        summary_label: What :meth:`summary`'s values are, for figures.
        source_files: The files that define a user's task (its Python file, task file, program),
            set by :func:`~pipeline.tasks.get_task`; their digest is part of the data's identity,
            so editing them never leaves simulations of the old definition in use. Empty for
            built-in tasks, whose definition is the package's version.

    A task with a reference overrides :meth:`reference_posterior` (exact methods, whose samples
    need no diagnostics) or :meth:`reference` (methods that report diagnostics, such as MCMC);
    each default falls back on the other.
    """

    name: str
    parameter_names: tuple[str, ...]
    parameter_units: tuple[str, ...]
    x_shape: tuple[int, ...]
    x_unit: str = ""
    seed_block_size: int = 1000
    reference_method: str = ""
    summary_label: str = "feature of x"
    source_files: tuple[Path, ...] = ()

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
    def has_simulator(self) -> bool:
        """Whether :meth:`simulate` can run. Tasks made from existing simulations have none:
        the checks that simulate (posterior predictive) are then skipped."""
        return True

    def failed_runs(self) -> tuple[int, int]:
        """Simulations so far whose run failed, a program's crash, timeout or unreadable output
        (their x is NaN), and how many of those timed out: ``(0, 0)`` for a simulator that
        returns what it computes, for which a NaN row is the model's answer, not a failure."""
        return 0, 0

    @property
    def has_reference(self) -> bool:
        """Whether the task implements :meth:`reference_posterior` or :meth:`reference`."""
        cls = type(self)
        return (
            cls.reference_posterior is not Task.reference_posterior
            or cls.reference is not Task.reference
        )

    def reference_posterior(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Draws exact (or converged) posterior samples for one observation.

        The default returns the samples of :meth:`reference`, for tasks that override that.

        Arguments:
            x_obs: One observation, shape ``x_shape``.
            num_samples: Number of samples ``M``.
            rng: The only source of randomness.

        Returns:
            Samples, shape ``(M, D)``.
        """
        if type(self).reference is Task.reference:
            raise NotImplementedError(f"task {self.name!r} has no reference posterior")
        return self.reference(x_obs, num_samples, rng).samples

    def reference(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> Reference:
        """Reference posterior samples for one observation, with their method and diagnostics.

        The default wraps :meth:`reference_posterior` with :attr:`reference_method` and no
        diagnostics; tasks whose samples need vouching for (MCMC) override it. Arguments as for
        :meth:`reference_posterior`; for a given ``rng`` the samples are the same either way.
        """
        if type(self).reference_posterior is Task.reference_posterior:
            raise NotImplementedError(f"task {self.name!r} has no reference posterior")
        samples = self.reference_posterior(x_obs, num_samples, rng)
        return Reference(samples=samples, method=self.reference_method, diagnostics={})

    def summary(self, x: np.ndarray) -> np.ndarray:
        """The statistics of ``x`` that posterior predictive checks and local C2ST compare.

        ``(n, *x_shape)`` to ``(n, F)``; by default ``x`` itself, flattened. Tasks whose ``x`` is
        large (maps) return a few informative statistics instead (e.g. band powers), so that
        the checks' covariances and classifiers stay well determined.
        """
        x = np.asarray(x, dtype=np.float64)
        return x.reshape(len(x), -1)

    @property
    def summary_size(self) -> int:
        """``F``, the number of statistics :meth:`summary` returns per ``x``."""
        return math.prod(self.x_shape)

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
        # A copy: a simulator that converts its parameters in place must not change those stored.
        return theta, self.simulate(theta.copy(), rng)


# The name of a module imported from a user's file by path begins with this.
USER_MODULE_PREFIX = "pipeline_user_task_"


def python_sources(module_file: str | Path) -> tuple[Path, ...]:
    """A user's Python module and the modules beside it and in the packages beside it (at any
    depth, see :func:`_package_files`), which it may import (a helper, the simulator's
    implementation): the files that define its task, resolved and sorted."""
    path = Path(module_file).resolve()
    return (path, *sorted(p for p in _package_files(path.parent) if p != path))


def package_sources(module: Any) -> tuple[Path, ...]:
    """The files that define a task imported as ``package.module:Class``: every module of the
    top-level package it belongs to (``mypkg/task.py`` may import ``mypkg/physics.py``), under
    each of its roots (a namespace package, folders without ``__init__.py``, may have several),
    or the module alone outside a package, in an installed one (site-packages, whose files
    change only with its version) or in this pipeline's (whose revision every file records)."""
    source = Path(module.__file__).resolve()
    top = module.__name__.partition(".")[0]
    roots = [
        Path(root).resolve()
        for root in getattr(sys.modules.get(top), "__path__", [])
        if not any(part in INSTALLED for part in Path(root).parts)
    ]
    if not roots or top == "pipeline" or any(part in INSTALLED for part in source.parts):
        return (source,)
    files = {path for root in roots for path in _package_files(root)}
    return (source, *sorted(files - {source}))


# Folders of installed packages, whose modules change only with their version.
INSTALLED = ("site-packages", "dist-packages")


def _package_files(folder: Path) -> list[Path]:
    """The ``.py`` files in ``folder`` and in the packages below it: folders with an
    ``__init__.py``, and folders named as identifiers that hold modules of their own (``from
    physics.core import f`` imports ``physics/core.py`` without an ``__init__.py`` too). A
    folder of folders only (a project's ``src/``, ``results/``) is not followed, nor is a
    virtual environment."""
    found = [p.resolve() for p in folder.glob("*.py")]
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or (child / "pyvenv.cfg").exists():
            continue
        namespace = child.name.isidentifier() and any(child.glob("*.py"))
        if (child / "__init__.py").is_file() or namespace:
            found += _package_files(child)
    return found


def _check_unit(unit: str, what: str) -> None:
    """Refuses a unit string astropy cannot read: the report and the files state it as the
    quantity's unit (astropy is imported only for a task that names one)."""
    if not unit:
        return
    from astropy import units

    try:
        units.Unit(unit, parse_strict="raise")
    except ValueError as error:
        raise ValueError(
            f"{what}: {unit!r} is not a unit astropy reads ({error}); write it as astropy "
            "does (e.g. 'km / (Mpc s)', 'Msun', 'deg'), or '' for dimensionless"
        ) from None


def source_digest(task: Task) -> str | None:
    """SHA-256 (16 hex digits) of the contents of ``task.source_files``; None without any."""
    if not task.source_files:
        return None
    digest = hashlib.sha256()
    for path in task.source_files:
        with open(path, "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()[:16]


def check_recorded(task: Task, attrs: dict[str, Any], path: Path | str) -> None:
    """Refuses a file (``attrs``: its attributes) that names or measures the task's parameters
    otherwise than ``task`` does now: its columns would be read under the wrong names or units
    (a task file edited after simulating, or another project's file of the same name). Warns
    when a user's task's files changed since the file was simulated (``task_digest``): the data
    may come from another simulator than the one later stages run.
    """
    for key, now in (
        ("parameter_names", task.parameter_names),
        ("parameter_units", task.parameter_units),
    ):
        recorded = attrs.get(key)
        if recorded is not None and list(recorded) != list(now):
            raise ValueError(
                f"{path} records {key} {list(recorded)}, but task {task.name!r} now has "
                f"{list(now)}: its columns would be read under other names or units. Use the "
                "task definition the file was made with, or simulate (or import) it again"
            )
    recorded, now = attrs.get("task_digest"), source_digest(task)
    if recorded is not None and now is not None and recorded != now:
        log.warning(
            "%s was simulated by another definition of task %r (digest %s; its files now give "
            "%s): if the simulator changed, simulate the file again",
            path,
            task.name,
            recorded,
            now,
        )


def check_task(task: Task) -> None:
    """Raises ``ValueError`` naming the first way ``task`` breaks the contract of :class:`Task`.

    Checks what can be checked without simulating: names, units and prior agree in dimension,
    ``x_shape`` is a tuple of positive integers, ``seed_block_size`` is a positive integer.
    """
    names = getattr(task, "parameter_names", None)
    if not isinstance(names, tuple | list) or not names:
        raise ValueError("parameter_names must be a non-empty sequence of strings")
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"parameter_names must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"parameter_names repeat a name: {list(names)}")
    units = getattr(task, "parameter_units", None)
    if (
        not isinstance(units, tuple | list)
        or len(units) != len(names)
        or not all(isinstance(unit, str) for unit in units)
    ):
        raise ValueError(
            f"parameter_units must give one unit string per parameter ({len(names)}: "
            f"{', '.join(names)}), got {units!r}; use '' for dimensionless"
        )
    for name, unit in zip(names, units, strict=True):
        _check_unit(unit, f"parameter_units of {name}")
    if isinstance(x_unit := getattr(task, "x_unit", ""), str):
        _check_unit(x_unit, "x_unit")
    shape = getattr(task, "x_shape", None)
    if (
        not isinstance(shape, tuple | list)
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ValueError(f"x_shape must be a tuple of positive integers, got {shape!r}")
    block = getattr(task, "seed_block_size", None)
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"seed_block_size must be a positive integer, got {block!r}")
    prior = task.prior
    if prior is not None and not isinstance(
        prior, BoxUniform | DiagonalNormal | MultivariateNormal
    ):
        raise ValueError(
            f"prior is a {type(prior).__name__}; use BoxUniform, DiagonalNormal or "
            "MultivariateNormal from pipeline.tasks"
        )
    if prior is not None and prior.dim != len(names):
        raise ValueError(
            f"the prior has {prior.dim} dimensions but parameter_names has {len(names)} "
            f"({', '.join(names)}); they must agree"
        )


def sample_by_rejection(
    propose: Callable[[int], np.ndarray],
    prior: Prior,
    num_samples: int,
    *,
    min_acceptance: float,
    failure: str,
) -> np.ndarray:
    """Exact samples of a proposal restricted to the prior's support, by rejection.

    Arguments:
        propose: Draws ``n`` proposals, shape ``(n, D)``; rows may be NaN (no solution).
        prior: Proposals where its log-density is not finite are rejected.
        num_samples: Samples ``M`` to return.
        min_acceptance: Below this acceptance rate (after 10^5 proposals) sampling stops.
        failure: Start of the error message, naming the task and the observation.

    Returns:
        Samples, shape ``(M, D)``.

    Raises:
        ValueError: If the acceptance rate falls below ``min_acceptance``.
    """
    chunks, accepted, proposed = [], 0, 0
    while accepted < num_samples:
        batch = _batch_size(num_samples - accepted, accepted, proposed)
        theta = propose(batch)
        theta = theta[np.isfinite(prior.log_prob(theta))]
        chunks.append(theta)
        accepted, proposed = accepted + len(theta), proposed + batch
        # 10^5 proposals estimate a rate of 10^-4 to within a factor of ~2.
        if proposed >= 100_000 and accepted < min_acceptance * proposed:
            raise ValueError(f"{failure}: accepted {accepted} of {proposed} proposals")
    return np.concatenate(chunks)[:num_samples]


def sample_cells(
    centres: np.ndarray,
    widths: np.ndarray,
    mass: np.ndarray,
    num_samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Samples a piecewise-constant density on a regular grid: ``(M, D)``.

    Arguments:
        centres: Cell centres, shape ``(G, D)``.
        widths: Cell widths, shape ``(D,)``.
        mass: Probability of each cell, shape ``(G,)``, summing to one.
    """
    cells = rng.choice(len(centres), size=num_samples, p=mass)
    return centres[cells] + widths * rng.uniform(-0.5, 0.5, size=(num_samples, len(widths)))


def _batch_size(remaining: int, accepted: int, proposed: int) -> int:
    """Proposals for the next round: enough for ``remaining`` at the rate seen so far."""
    # Before any proposal, guess 1/2 (the prior predictive gives rates around that); the floor
    # of 10^-3 and the cap of 2^20 keep one round's memory bounded when the rate is tiny.
    rate = accepted / proposed if proposed else 0.5
    return int(min(max(1.2 * remaining / max(rate, 1e-3), 1024), 2**20))

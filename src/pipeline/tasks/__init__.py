"""Registry of inference tasks: ``get_task("two_moons")`` returns a fresh task instance."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipeline.tasks.base import (
    BoxUniform,
    DiagonalNormal,
    MultivariateNormal,
    Prior,
    Reference,
    Task,
)

__all__ = [
    "TASKS",
    "BoxUniform",
    "DiagonalNormal",
    "MultivariateNormal",
    "Prior",
    "Reference",
    "Task",
    "get_task",
    "register",
]


def _lazy(module: str, cls: str, **options: Any) -> Callable[[], Task]:
    """A factory of ``pipeline.tasks.<module>.<cls>(**options)`` that imports the module when
    first called.

    sn_cosmology and the field tasks import astropy (about 1.5 s and 70 MiB for its cosmology).
    Imported with the registry, that was paid by every MPI rank of every run, whatever the task,
    and cut the 2-rank parallel efficiency of simulate (see benchmarks/README.md).
    """
    path = f"pipeline.tasks.{module}"

    def factory() -> Task:
        return getattr(importlib.import_module(path), cls)(**options)

    factory.__name__ = cls + "".join(f"_{value}" for value in options.values())
    factory.__module__ = path
    return factory


# Map tasks, by name: 64^2 maps, and _32, _128, _256 for other sizes.
_FIELDS = {
    "grf_cosmology": "GaussianFieldCosmology",
    "lognormal_cosmology": "LognormalFieldCosmology",
}

TASKS: dict[str, Callable[[], Task]] = {
    "gaussian_linear": _lazy("gaussian_linear", "GaussianLinear"),
    "two_moons": _lazy("two_moons", "TwoMoons"),
    "sn_cosmology": _lazy("sn_cosmology", "SNCosmology"),
    "gaussian_mixture": _lazy("gaussian_mixture", "GaussianMixture"),
    "slcp": _lazy("slcp", "SLCP"),
    "bernoulli_glm": _lazy("bernoulli_glm", "BernoulliGLM"),
    **{name: _lazy("fields", cls) for name, cls in _FIELDS.items()},
    **{
        f"{name}_{size}": _lazy("fields", cls, num_pixels=size)
        for name, cls in _FIELDS.items()
        for size in (32, 128, 256)
    },
}


def register(name: str, factory: Callable[[], Task]) -> None:
    """Adds a task to the registry (used by tests and by downstream projects)."""
    TASKS[name] = factory


def get_task(name: str) -> Task:
    """Returns the task called ``name``; the error lists the known tasks."""
    try:
        return TASKS[name]()
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise KeyError(f"unknown task {name!r}; known tasks: {known}") from None

"""Registry of inference tasks: ``get_task("two_moons")`` returns a fresh task instance."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.tasks.base import (
    BoxUniform,
    DiagonalNormal,
    MultivariateNormal,
    Prior,
    Reference,
    Task,
)
from pipeline.tasks.bernoulli_glm import BernoulliGLM
from pipeline.tasks.fields import register_sizes
from pipeline.tasks.gaussian_linear import GaussianLinear
from pipeline.tasks.gaussian_mixture import GaussianMixture
from pipeline.tasks.slcp import SLCP
from pipeline.tasks.sn_cosmology import SNCosmology
from pipeline.tasks.two_moons import TwoMoons

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

TASKS: dict[str, Callable[[], Task]] = {
    "gaussian_linear": GaussianLinear,
    "two_moons": TwoMoons,
    "sn_cosmology": SNCosmology,
    "gaussian_mixture": GaussianMixture,
    "slcp": SLCP,
    "bernoulli_glm": BernoulliGLM,
}
# grf_cosmology and lognormal_cosmology (64^2 maps), and _32, _128, _256 for other map sizes.
register_sizes(TASKS)


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

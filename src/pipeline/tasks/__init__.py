"""Tasks by name or by import path: ``get_task(spec)`` returns a fresh task instance.

``spec`` is one of:

- a built-in task's name (``"two_moons"``, see :data:`TASKS`);
- ``package.module:Attribute``: an importable module (installed, or on ``PYTHONPATH``);
- ``path/to/file.py:Attribute``: a Python file, found relative to the working directory;
- ``path/to/task.yaml``: a task declared in YAML (prior, shapes and a Python function or an
  external program as simulator, or no simulator at all; see :mod:`pipeline.tasks.declared`).

``Attribute`` is a :class:`Task` subclass (instantiated without arguments), a task instance, or
a function without arguments returning one. A task resolved from a spec carries that spec as its
``name``: every file records it, so every later stage, job and MPI rank resolves the same task
the same way, without any registration step.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.tasks.base import (
    USER_MODULE_PREFIX,
    BoxUniform,
    DiagonalNormal,
    MultivariateNormal,
    Prior,
    Reference,
    Task,
    check_task,
    package_sources,
    python_sources,
)

__all__ = [
    "TASKS",
    "BoxUniform",
    "DiagonalNormal",
    "MultivariateNormal",
    "Prior",
    "Reference",
    "Task",
    "TaskError",
    "get_task",
    "register",
]


class TaskError(ValueError):
    """A task spec that does not resolve, or resolves to something that is not a valid task."""


def _lazy(module: str, cls: str, **options: Any) -> Callable[[], Task]:
    """A factory of ``pipeline.tasks.<module>.<cls>(**options)`` that imports the module when
    first called.

    sn_cosmology and the field tasks import astropy (about 1.5 s and 70 MiB for its cosmology).
    Imported with the registry, it would be paid by every MPI rank of every run, whatever the
    task, and cut the parallel efficiency of simulate (see benchmarks/README.md).
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
    "sn_cosmology_offset": _lazy("sn_cosmology", "SNCosmologyOffset"),
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
    """Adds a task to this process's registry (tests; a user's task is better given by its
    import path, which every process resolves without registering)."""
    TASKS[name] = factory


def get_task(spec: str) -> Task:
    """The task ``spec`` names (see the module docstring), checked against the Task contract.

    Raises:
        TaskError: If ``spec`` does not resolve, naming what was tried and how to fix it, or
            resolves to an object that breaks the contract (see :func:`check_task`).
    """
    if spec in TASKS:
        return TASKS[spec]()
    if spec.endswith((".yaml", ".yml")):
        from pipeline.tasks.declared import load_task_file

        try:
            task = load_task_file(Path(spec))
        except ValueError as error:
            raise TaskError(str(error)) from None
    elif ":" in spec:
        task, module = _from_import_path(spec)
        source = getattr(module, "__file__", None)
        # A file given by path may import the files beside it, a package's module the
        # package's other modules; a top-level module's folder holds other packages' files.
        beside = spec.rpartition(":")[0].endswith(".py")
        task.source_files = (
            () if not source else python_sources(source) if beside else package_sources(module)
        )
    else:
        known = ", ".join(sorted(TASKS))
        raise TaskError(
            f"unknown task {spec!r}: not a built-in task ({known}), nor an import path "
            "('package.module:Class' or 'path/to/file.py:Class') or a task file "
            "('path/to/task.yaml')"
        )
    task.name = spec
    try:
        check_task(task)
    except ValueError as error:
        raise TaskError(f"task {spec!r}: {error}") from None
    return task


def _from_import_path(spec: str) -> tuple[Task, Any]:
    """Imports ``module:attribute`` or ``file.py:attribute``; returns the task the attribute
    makes, and the module."""
    where, _, attribute = spec.rpartition(":")
    if not where or not attribute:
        raise TaskError(f"task {spec!r}: expected 'module:Attribute' or 'file.py:Attribute'")
    module = _load_file(Path(where), spec) if where.endswith(".py") else _import(where, spec)
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise TaskError(
            f"task {spec!r}: {where} defines no {attribute!r} (it defines "
            f"{', '.join(n for n in dir(module) if not n.startswith('_')) or 'nothing'})"
        ) from None
    if isinstance(target, Task):
        return copy.copy(target), module  # get_task names it: the module's object stays as is
    if callable(target) and not isinstance(target, type) and _needs_arguments(target):
        raise TaskError(
            f"task {spec!r}: {attribute} is a function that takes arguments, not a task. A "
            "simulator function simulate(theta, rng) becomes a task through a task file: "
            f"simulator: {{python: {where}:{attribute}}} beside its prior and shapes (see "
            "pipeline.tasks.declared)"
        )
    if callable(target):
        try:
            task = target()
        except Exception as error:  # a user's class or factory: any failure is theirs to fix
            raise TaskError(
                f"task {spec!r}: {attribute}() failed: {type(error).__name__}: {error} (a Task "
                "subclass is instantiated without arguments and must define prior and simulate)"
            ) from None
        if isinstance(task, Task):
            return task, module
        raise TaskError(
            f"task {spec!r}: {attribute}() returned {type(task).__name__}, not a "
            "pipeline.tasks.Task"
        )
    raise TaskError(
        f"task {spec!r}: {attribute} is a {type(target).__name__}; expected a subclass of "
        "pipeline.tasks.Task, an instance of one, or a function returning one"
    )


def _needs_arguments(function: Callable[..., Any]) -> bool:
    """Whether ``function`` has a parameter without a default (so it is not a task factory)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in parameters
    )


def _import(module: str, spec: str) -> Any:
    # As `python -m` and Snakemake do, the working directory is searched too: Snakemake's
    # process and the `pipeline` jobs it starts must find the same modules.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise TaskError(
            f"task {spec!r}: cannot import {module!r} ({error}); install the package that "
            "holds it, add its folder to PYTHONPATH, or name the file: 'path/to/file.py:Class'"
        ) from None
    except Exception as error:  # the user's module raised while importing
        raise TaskError(
            f"task {spec!r}: importing {module!r} failed: {type(error).__name__}: {error}"
        ) from error


# Folders of the user task files this process imported (each added to sys.path).
_USER_FOLDERS: set[Path] = set()


def _check_module_names(path: Path, spec: str) -> None:
    """Refuses a task file beside a module whose name this process already imported from
    another task file's folder (another task's ``impl.py``): Python imports a name once per
    process, so ``from impl import Model`` here would run the other task's code."""
    for module_file in sorted(path.parent.glob("*.py")):
        source = getattr(sys.modules.get(module_file.stem), "__file__", None)
        if source is None:
            continue
        source = Path(source).resolve()
        if source.parent in _USER_FOLDERS and source != module_file.resolve():
            raise TaskError(
                f"task {spec!r}: {module_file.name} beside it shares its module name with "
                f"{source}, which this run already imported (another task's), so importing "
                f"{module_file.stem!r} here would give that file; rename one of them"
            )


def _load_file(path: Path, spec: str) -> Any:
    """Imports a Python file by path, once per process (as a module named after its path)."""
    if not path.is_file():
        raise TaskError(
            f"task {spec!r}: {path} does not exist (relative paths start at the working "
            f"directory, here {Path.cwd()})"
        )
    resolved = path.resolve()
    name = USER_MODULE_PREFIX + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    _check_module_names(resolved, spec)
    loader = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    # As when the file runs as a script, it may import the modules beside it (searched after
    # the installed packages, so a user's file never shadows one of them).
    _USER_FOLDERS.add(resolved.parent)
    if str(resolved.parent) not in sys.path:
        sys.path.append(str(resolved.parent))
    # While it runs, the other task files' folders are off the path: its imports must find
    # the modules beside it, not a same-named one beside a task file imported earlier.
    others = [entry for entry in sys.path if Path(entry) in _USER_FOLDERS - {resolved.parent}]
    for entry in others:
        sys.path.remove(entry)
    try:
        loader.loader.exec_module(module)
    except Exception as error:  # the user's code: report it as theirs, not as a crash of ours
        del sys.modules[name]
        raise TaskError(
            f"task {spec!r}: importing {path} failed: {type(error).__name__}: {error}"
        ) from error
    finally:
        sys.path.extend(others)
    return module

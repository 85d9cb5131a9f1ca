"""Tasks declared in a YAML file: a prior and shapes, and a simulator that is a Python function,
an external program, or absent (a task of existing simulations).

A task file (paths in it are relative to the file's folder)::

    parameters:
      names: [omega, gamma]
      units: ["rad / s", "1 / s"]          # astropy unit strings; "" for dimensionless
    prior:
      uniform: {low: [0.5, 0.05], high: [3.0, 0.5]}   # or normal: {loc: [...], scale: [...]}
    x: {shape: [50], unit: ""}
    seed_block_size: 100                  # optional (default 1000); part of the data's identity
    simulator:
      python: oscillator.py:simulate      # simulate(theta (n, D), rng) -> x (n, *shape)
      # or an external program (see pipeline.tasks.external):
      # command: ["./oscillator", "{seed}", "{theta}"]

Without ``simulator:`` the task describes existing simulations (``pipeline import``): training
and every check that needs no new simulation work; ``prior:`` is then optional (it bounds the
posterior samples when given). ``title:`` is an optional human-readable name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.tasks.base import (
    USER_MODULE_PREFIX,
    BoxUniform,
    DiagonalNormal,
    Prior,
    Task,
    package_sources,
    python_sources,
)

KEYS = ("title", "parameters", "prior", "x", "seed_block_size", "simulator")
Simulator = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class DeclaredTask(Task):
    """A task assembled from its parts rather than subclassed.

    Arguments:
        parameter_names: One name per dimension of ``theta``.
        parameter_units: One astropy unit string per parameter.
        x_shape: Shape of one ``x``.
        prior: The prior over ``theta``; ``None`` for existing simulations of unknown prior.
        simulator: ``simulator(theta (n, D), rng) -> x (n, *x_shape)``, or ``None``.
        x_unit: Astropy unit string of ``x``.
        seed_block_size: Simulations drawn from one random generator (see :class:`Task`).
        title: What to call the task in messages and reports.
    """

    def __init__(
        self,
        parameter_names: tuple[str, ...],
        parameter_units: tuple[str, ...],
        x_shape: tuple[int, ...],
        prior: Prior | None,
        simulator: Simulator | None,
        *,
        x_unit: str = "",
        seed_block_size: int = 1000,
        title: str = "",
    ) -> None:
        self.name = title or "declared task"
        self.title = title
        self.parameter_names = tuple(parameter_names)
        self.parameter_units = tuple(parameter_units)
        self.x_shape = tuple(x_shape)
        self.x_unit = x_unit
        self.seed_block_size = seed_block_size
        self._prior = prior
        self._simulator = simulator

    @property
    def prior(self) -> Prior | None:
        return self._prior

    @property
    def has_simulator(self) -> bool:
        return self._simulator is not None

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self._simulator is None:
            raise ValueError(
                f"task {self.name!r} has no simulator (its task file declares none): it can "
                "train on imported simulations, but not simulate new ones"
            )
        return np.asarray(self._simulator(np.asarray(theta, dtype=np.float64), rng))

    def failed_runs(self) -> tuple[int, int]:
        count = getattr(self._simulator, "failures", None)
        return (0, 0) if count is None else (count.failed, count.timed_out)

    def simulate_block(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self._prior is None:
            raise ValueError(
                f"task {self.name!r} declares no prior, so it cannot draw parameters to "
                "simulate; add a prior: block to its task file"
            )
        return super().simulate_block(n, rng)


def load_task_file(path: Path) -> DeclaredTask:
    """Reads a task file (see the module docstring).

    Raises:
        ValueError: Naming the file, the key at fault and what it should hold.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"task file {path} does not exist (relative paths start at the working directory, "
            f"here {Path.cwd()})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"task file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"task file {path}: expected a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(
            f"task file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}"
        )
    where = f"task file {path}"
    names, units = _parameters(data.get("parameters"), where)
    x_shape, x_unit = _x(data.get("x"), where)
    simulator = _simulator(data.get("simulator"), path.parent, x_shape, where)
    if "prior" not in data and simulator is not None:
        raise ValueError(f"{where}: a task with a simulator needs a prior: block")
    prior = _prior(data["prior"], len(names), where) if "prior" in data else None
    block = data.get("seed_block_size", 1000)
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"{where}: seed_block_size must be a positive integer, got {block!r}")
    task = DeclaredTask(
        names,
        units,
        x_shape,
        prior,
        simulator,
        x_unit=x_unit,
        seed_block_size=block,
        title=str(data.get("title", "")),
    )
    task.source_files = (path.resolve(), *_simulator_files(simulator))
    return task


def _simulator_files(simulator: Simulator | None) -> tuple[Path, ...]:
    """The files a simulator's code lives in: a Python function's module and the modules
    beside it; a program's binary and every argument naming a file (a script an interpreter
    runs, ``python3 sim.py {seed} {theta}``, relative to the folder the program runs in), and
    for a Python script the modules beside it, which it may import."""
    command = getattr(simulator, "command", None)
    if command is not None:
        cwd = Path(getattr(simulator, "cwd", "."))
        named = [(cwd / a).resolve() for a in command if "{" not in a and (cwd / a).is_file()]
        scripts = [python_sources(path) for path in named if path.suffix == ".py"]
        return tuple(dict.fromkeys([*named, *(path for found in scripts for path in found)]))
    module = inspect.getmodule(simulator)
    source = getattr(module, "__file__", None)
    if not source:
        return ()
    # A file the task file names (loaded by path) may import the files beside it; an
    # importable module's folder holds other packages' files, so only the module counts.
    by_path = module.__name__.startswith(USER_MODULE_PREFIX)
    return python_sources(source) if by_path else package_sources(module)


def _parameters(block: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not isinstance(block, dict) or "names" not in block:
        raise ValueError(
            f"{where}: parameters: must be a mapping with names: [...] and optionally units: "
            "[...] (one astropy unit string per parameter)"
        )
    _known_keys(block, ("names", "units"), "parameters", where)
    names = block["names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: parameters.names must be a list of strings, got {names!r}")
    units = block.get("units", [""] * len(names))
    if (
        not isinstance(units, list)
        or len(units) != len(names)
        or not all(isinstance(u, str) for u in units)
    ):
        raise ValueError(
            f"{where}: parameters.units must list one unit string per name ({len(names)}; "
            f'"" for dimensionless), got {units!r}'
        )
    return tuple(names), tuple(units)


def _known_keys(block: dict, keys: tuple[str, ...], name: str, where: str) -> None:
    """Refuses a key the block does not have (``units`` misspelt ``unit``): it would be
    ignored, and the default (no unit, no prior) taken without a word."""
    unknown = sorted(set(block) - set(keys))
    if unknown:
        raise ValueError(
            f"{where}: {name}: unknown key(s) {', '.join(map(repr, unknown))}; {name} takes "
            f"{' and '.join(keys)}"
        )


def _x(block: Any, where: str) -> tuple[tuple[int, ...], str]:
    if not isinstance(block, dict) or "shape" not in block:
        raise ValueError(f"{where}: x: must be a mapping with shape: [...] and optionally unit:")
    _known_keys(block, ("shape", "unit"), "x", where)
    shape = block["shape"]
    if isinstance(shape, int):
        shape = [shape]
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ValueError(f"{where}: x.shape must be a list of positive integers, got {shape!r}")
    unit = block.get("unit", "")
    if not isinstance(unit, str):
        raise ValueError(f"{where}: x.unit must be an astropy unit string, got {unit!r}")
    return tuple(shape), unit


def _prior(block: Any, dim: int, where: str) -> Prior:
    kinds = {"uniform": ("low", "high"), "normal": ("loc", "scale")}
    if not isinstance(block, dict) or len(block) != 1 or next(iter(block)) not in kinds:
        raise ValueError(
            f"{where}: prior: must be one of uniform: {{low: [...], high: [...]}} or "
            f"normal: {{loc: [...], scale: [...]}}, got {block!r}"
        )
    kind, values = next(iter(block.items()))
    keys = kinds[kind]
    if not isinstance(values, dict) or set(values) != set(keys):
        raise ValueError(f"{where}: prior.{kind} needs exactly {' and '.join(keys)}")
    arrays = []
    for key in keys:
        value = values[key]
        value = [value] * dim if _is_finite_number(value) else value
        if (
            not isinstance(value, list)
            or len(value) != dim
            or not all(_is_finite_number(v) for v in value)
        ):
            raise ValueError(
                f"{where}: prior.{kind}.{key} must be {dim} finite numbers (one per "
                f"parameter), got {value!r}"
            )
        arrays.append(tuple(float(v) for v in value))
    first, second = arrays
    if kind == "uniform" and not all(a < b for a, b in zip(first, second, strict=True)):
        raise ValueError(f"{where}: prior.uniform needs low < high in every parameter")
    if kind == "normal" and not all(s > 0 for s in second):
        raise ValueError(f"{where}: prior.normal.scale must be positive")
    return BoxUniform(first, second) if kind == "uniform" else DiagonalNormal(first, second)


def _is_finite_number(value: Any) -> bool:
    """A YAML int or float that fits a float64 and is finite (true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _simulator(block: Any, base: Path, x_shape: tuple[int, ...], where: str) -> Simulator | None:
    if block is None:
        return None
    if isinstance(block, dict) and set(block) == {"python"}:
        return _python_simulator(str(block["python"]), base, where)
    if isinstance(block, dict) and "command" in block:
        from pipeline.tasks.external import ExternalSimulator

        try:
            return ExternalSimulator.from_options(block, base, x_shape)
        except ValueError as error:
            raise ValueError(f"{where}: simulator: {error}") from None
    raise ValueError(
        f"{where}: simulator: must be python: 'file.py:function' (or 'module:function'), or "
        f"an external program, command: [...]; got {block!r}"
    )


def _python_simulator(spec: str, base: Path, where: str) -> Simulator:
    """``file.py:function`` (relative to the task file) or ``module:function``."""
    from pipeline.tasks import TaskError, _import, _load_file

    module_part, _, attribute = spec.rpartition(":")
    if not module_part or not attribute:
        raise ValueError(f"{where}: simulator.python must be 'file.py:function', got {spec!r}")
    if module_part.endswith(".py") and not (base / module_part).is_file():
        raise ValueError(
            f"{where}: simulator.python: {base / module_part} does not exist (a file named "
            "here is relative to the task file's folder)"
        )
    try:
        if module_part.endswith(".py"):
            module = _load_file(base / module_part, spec)
        else:
            module = _import(module_part, spec)
    except TaskError as error:
        raise ValueError(f"{where}: simulator.python: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{where}: simulator.python: {module_part} has no function {attribute!r}")
    return function

"""An experiment's tasks, resolved and checked together before any job starts.

The workflow calls :func:`resolve_tasks` with the config's task keys, so a mistake in them stops
Snakemake with one message naming the key and the fix, instead of failing jobs later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.tasks import TASKS, Task, TaskError, get_task


def resolve_tasks(
    tasks: Sequence[str],
    task_modules: Mapping[str, str],
    data: Mapping[str, Any],
    observed: Mapping[str, str],
    task_train: Mapping[str, Any],
    budgets: Sequence[int],
    mocks: Mapping[str, str] | None = None,
    num_reference_samples: int = 1,
) -> dict[str, Task]:
    """Each of ``tasks`` resolved as every job will resolve it (``task_modules[name]`` or the
    name itself), after checking that the per-task keys fit together.

    Raises:
        ValueError: Naming the config key at fault and what to write instead.
    """
    mocks = mocks or {}
    shadowing = sorted(set(task_modules) & set(TASKS))
    if shadowing:
        # config.yaml's task_train block for that name would train the user's task with the
        # built-in task's options, unremarked.
        raise ValueError(
            f"config task_modules.{shadowing[0]}: {shadowing[0]} is the name of a built-in task, "
            "whose settings (its task_train block) would apply to yours; give your task a key "
            "of its own"
        )
    for key, block in (("data", data), ("observed", observed), ("mocks", mocks)):
        stray = sorted(set(block) - set(tasks))
        if stray:
            raise ValueError(
                f"config '{key}' names {', '.join(stray)}, which config 'tasks' does not list "
                f"(tasks: {', '.join(tasks)})"
            )
    # task_train is shared by experiments: it may name any task that resolves.
    for name in sorted(set(task_train) - set(tasks)):
        try:
            get_task(task_modules.get(name, name))
        except TaskError as error:
            raise ValueError(f"config 'task_train' names {name}: {error}") from None
    resolved = {name: _resolve(name, task_modules) for name in tasks}
    for name, task in resolved.items():
        _check_sources(name, task, data, observed, budgets)
        if budgets:
            _check_budgets(name, mocks, num_reference_samples)
        if name in data:
            _check_data(name, task, data[name])
        if name in mocks:
            _check_mock(name, task, mocks[name], observed)
        if name in observed:
            _check_observed(name, task, observed[name])
    return resolved


def _check_mock(name: str, task: Task, spec: str, observed: Mapping[str, str]) -> None:
    """The mock model resolves and can stand in for the task's simulator."""
    from pipeline.observations import check_mock

    if name in observed:
        raise ValueError(
            f"config observed.{name} and mocks.{name} both give {name}'s observations: real data "
            "or mocks of another model, not both"
        )
    try:
        check_mock(task, get_task(spec))
    except (TaskError, ValueError) as error:
        raise ValueError(f"config mocks.{name}: {error}") from None


def _check_data(name: str, task: Task, block: Mapping[str, Any]) -> None:
    """The archive's shapes against the task, and num_test against its rows, from the arrays'
    headers (nothing is read in full)."""
    from pipeline.importing import check_shapes, open_array

    where = f"config data.{name}"
    try:
        with open_array(block["theta"], "theta") as theta, open_array(block["x"], "x") as x:
            check_shapes(task, theta, x, {"theta": block["theta"], "x": block["x"]})
            rows = x.shape[0]
    except (ValueError, OSError) as error:
        raise ValueError(f"{where}: {error}") from None
    if not block["num_test"] < rows:
        raise ValueError(
            f"{where}.num_test is {block['num_test']}, but the archive holds {rows} rows: "
            "hold out fewer, so that some remain to train on"
        )


def _check_observed(name: str, task: Task, source: str) -> None:
    from pipeline.observations import read_observed_for

    try:
        read_observed_for(task, source)
    except (ValueError, OSError) as error:
        raise ValueError(f"config observed.{name}: {error}") from None


def _resolve(name: str, task_modules: Mapping[str, str]) -> Task:
    try:
        return get_task(task_modules.get(name, name))
    except TaskError as error:
        hint = (
            ""
            if name in task_modules
            else f"; for a task of your own add task_modules: {{{name}: 'path/to/file.py:Class'}}"
        )
        raise ValueError(f"config 'tasks': {name}: {error}{hint}") from None


def _check_sources(
    name: str,
    task: Task,
    data: Mapping[str, Any],
    observed: Mapping[str, str],
    budgets: Sequence[int],
) -> None:
    """Where a task's simulations and observations come from must exist for it."""
    if not task.has_simulator and name not in data:
        raise ValueError(
            f"task {name} has no simulator: give its existing simulations under "
            f"data: {{{name}: {{theta: ..., x: ..., num_test: ...}}}}"
        )
    if not task.has_simulator and name not in observed:
        raise ValueError(
            f"task {name} has no simulator to draw synthetic observations from: give its "
            f"observed data under observed: {{{name}: path/to/x_obs.npy}}"
        )
    if budgets and (name in data or name in observed or not task.has_reference):
        raise ValueError(
            f"simulate.budgets scores each budget by C2ST against reference posteriors at "
            f"synthetic observations, which task {name} lacks (imported data, real "
            "observations or no reference posterior); run the budget study in an experiment "
            "without it, or set simulate.budgets: []"
        )


def _check_budgets(name: str, mocks: Mapping[str, str], num_reference_samples: int) -> None:
    """A budget study's C2ST needs reference samples at the task's own observations."""
    if name in mocks:
        raise ValueError(
            f"simulate.budgets scores each budget by C2ST against reference posteriors, and "
            f"mocks.{name} draws task {name}'s observations from another model, where it has "
            "none; run the budget study in an experiment without the mocks"
        )
    if num_reference_samples == 0:
        raise ValueError(
            "simulate.budgets scores each budget by C2ST against reference posteriors, and "
            "observations.num_reference_samples is 0; draw some (e.g. 10000) or set "
            "simulate.budgets: []"
        )

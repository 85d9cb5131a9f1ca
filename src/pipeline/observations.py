"""Observations with known truth and, where the task has one, reference posterior samples.

The file holds ``theta`` (n_obs, D) drawn from the prior, ``x`` (n_obs, *x_shape) simulated from
them, and ``reference_samples`` (n_obs, R, D) for tasks with a reference posterior. The attribute
``reference`` then says how those were drawn: JSON ``{"method": ..., "diagnostics": [...]}`` with
the task's :attr:`~pipeline.tasks.Task.reference_method` and one dict of numbers per observation
(for MCMC R-hat, ESS and acceptance; for every method ``seconds``, the time it took).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import atomic, importing, storage
from pipeline.progress import Progress
from pipeline.provenance import provenance
from pipeline.resources import require_room
from pipeline.simulation import (
    check_own_randomness,
    check_shapes,
    global_random_state,
    simulator_errors,
)
from pipeline.tasks import Task
from pipeline.tasks.base import source_digest

log = logging.getLogger(__name__)


def make_observations(
    task: Task,
    num_observations: int,
    num_reference_samples: int,
    seed: int,
    out: Path,
    *,
    overwrite: bool = False,
    mock: Task | None = None,
) -> None:
    """Draws observations (and reference posteriors) and writes them atomically to ``out``.

    Observation ``j`` uses the generator ``default_rng([seed, j])``, its reference posterior
    ``default_rng([seed, j, 1])``: adding observations never changes the earlier ones.

    With ``mock``, another forward model of the same parameters: ``theta`` from ``task``'s
    prior, ``x`` from ``mock``'s simulator, no reference posterior (``task``'s would answer
    another question), and the file records ``mock_of``: mock observations that test what a
    model of ``task`` concludes from data it does not describe.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
        ValueError: If ``mock`` has other parameters or another shape of ``x`` than ``task``.
    """
    atomic.check_new(Path(out), overwrite=overwrite)
    if num_observations <= 0:
        raise ValueError(f"--num-observations must be positive, got {num_observations}")
    if mock is not None:
        check_mock(task, mock)
        num_reference_samples = 0
    check_size(task, num_observations, num_reference_samples, Path(out))
    thetas, xs, references, diagnostics = [], [], [], []
    progress = Progress(num_observations, "observations", log)
    for j in range(num_observations):
        theta, x = _draw_finite(task, np.random.default_rng([seed, j]), j, mock)
        thetas.append(theta)
        xs.append(x)
        if task.has_reference and num_reference_samples > 0:
            rng = np.random.default_rng([seed, j, 1])
            start = time.perf_counter()
            reference = task.reference(x, num_reference_samples, rng)
            seconds = time.perf_counter() - start
            references.append(reference.samples)
            method = reference.method
            diagnostics.append({**reference.diagnostics, "seconds": seconds})
            log.info("observation %d: %s reference, %s", j, reference.method, diagnostics[-1])
        progress.update(1)
    write_observations(
        out,
        task,
        np.asarray(thetas),
        np.asarray(xs),
        _identity(task, seed, num_reference_samples, mock),
        np.asarray(references) if references else None,
        {"method": method, "diagnostics": diagnostics} if references else None,
    )


def write_observations(
    out: Path,
    task: Task,
    theta: np.ndarray,
    x: np.ndarray,
    identity: dict[str, Any],
    references: np.ndarray | None = None,
    reference_info: dict[str, Any] | None = None,
) -> None:
    """Writes observations atomically to ``out`` in the layout every stage reads
    (:func:`read_reference`): ``theta`` (n, D) and ``x`` (n, *x_shape) as float32, reference
    posterior samples ``references`` (n, S, D) with ``reference_info`` (how they were drawn)
    where there are some, and ``identity`` (what the observations depend on) as attributes and
    in the provenance."""
    with storage.atomic_h5(out) as f:
        f["theta"] = np.asarray(theta, dtype=np.float32)
        f["x"] = np.asarray(x, dtype=np.float32)
        if references is not None:
            f.create_dataset("reference_samples", data=np.asarray(references, dtype=np.float32))
            f.attrs["reference"] = storage.encode_attr(reference_info or {})
        for key, value in identity.items():
            f.attrs[key] = storage.encode_attr(value)
        f.attrs["parameter_names"] = storage.encode_attr(list(task.parameter_names))
        f.attrs["provenance"] = storage.encode_attr(provenance(identity))
        f.attrs["complete"] = True


def _identity(
    task: Task, seed: int, num_reference_samples: int, mock: Task | None
) -> dict[str, Any]:
    """What the observations depend on: the task (and its definition's digest), the seed, the
    reference size, and the mock model where there is one."""
    identity = {"task": task.name, "seed": seed, "num_reference_samples": num_reference_samples}
    if (digest := source_digest(task)) is not None:
        identity["task_digest"] = digest
    if mock is not None:
        identity["mock_of"] = mock.name
        if (digest := source_digest(mock)) is not None:
            identity["mock_digest"] = digest
    return identity


def check_size(task: Task, num_observations: int, num_reference_samples: int, out: Path) -> None:
    """Refuses, before any reference is drawn, observations and reference samples that memory
    or the disk holding ``out`` cannot hold."""
    references = num_reference_samples if task.has_reference else 0
    row = task.dim_theta * (1 + references) + math.prod(task.x_shape)
    require_room(
        num_observations * row * 4,  # float32
        out,
        f"{num_observations} observations with {references} reference samples each",
        "lower observations.num_reference_samples or observations.num_observations",
    )


def import_observations(task: Task, source: str, out: Path, *, overwrite: bool = False) -> None:
    """Writes a user's observed data to ``out`` in the layout of :func:`make_observations`,
    without true ``theta`` or reference samples (attribute ``real = True``).

    Arguments:
        source: ``file.npy`` holding ``(n_obs, *x_shape)`` or one ``x_shape``, or
            ``file.h5[:dataset]`` (dataset ``x`` by default).

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
        ValueError: If the data cannot be read, have the wrong shape for ``task``, or hold NaN
            or inf (naming the observation).
    """
    out = Path(out)
    atomic.check_new(out, overwrite=overwrite)
    path, x = read_observed_for(task, source)
    shape = tuple(task.x_shape)
    identity = {
        "task": task.name,
        "source": {"path": str(source), "sha256": importing.file_sha256(path)},
    }
    with storage.atomic_h5(out) as f:
        f["x"] = x.astype(np.float32)
        f.attrs["task"] = task.name
        f.attrs["real"] = True
        f.attrs["source"] = storage.encode_attr(identity["source"])
        f.attrs["parameter_names"] = storage.encode_attr(list(task.parameter_names))
        f.attrs["provenance"] = storage.encode_attr(provenance(identity))
        f.attrs["complete"] = True
    log.info("wrote %s: %d real observation(s) of shape %s from %s", out, len(x), shape, source)


def read_observed_for(task: Task, source: str) -> tuple[Path, np.ndarray]:
    """The file of ``source`` and its observations ``(n_obs, *x_shape)``, float64, checked for
    ``task``'s shape and for NaN or inf (naming the observations)."""
    path, x, made_for = read_observed(source)
    if made_for is not None and made_for != task.name:
        raise ValueError(
            f"{source} holds observations of task {made_for!r}, not of {task.name!r}: give "
            "this task's observed data"
        )
    x = np.asarray(x, dtype=np.float64)
    shape = tuple(task.x_shape)
    if x.shape == shape:
        x = x[None]
    if x.ndim < 1 or x.shape[1:] != shape or len(x) == 0:
        raise ValueError(
            f"{source}: observed data of shape {x.shape} do not fit task {task.name!r}, whose x "
            f"has shape {shape}: expected ({', '.join(map(str, ('n_obs', *shape)))}) or {shape}"
        )
    # Stored as float32, as every stage reads x: a value beyond its range becomes inf.
    bad = np.flatnonzero(~finite_in_float32(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{source}: observation(s) {', '.join(map(str, bad[:10]))} hold NaN or inf (or "
            "values beyond float32's range, 3.4e38); the posterior is undefined there. Remove "
            "or repair them (e.g. mask bad pixels by interpolation), or rescale x, before "
            "running the pipeline"
        )
    return path, x


def finite_in_float32(values: np.ndarray) -> np.ndarray:
    """Which of ``values`` stay finite stored as float32 (elementwise, same shape)."""
    with np.errstate(over="ignore"):
        return np.isfinite(np.asarray(values).astype(np.float32))


def read_observed(source: str) -> tuple[Path, np.ndarray, str | None]:
    """The file and the array of a source as :mod:`pipeline.importing` reads them
    (``file.npy``, ``archive.npz[:member]``, ``file.h5[:dataset]``), and the task an HDF5 file
    of the pipeline records. An HDF5 file's ``x`` is taken by default where the file is the
    pipeline's or holds no other dataset: in another file ``x`` may be a grid beside the data.
    Refuses what is not an array of real numbers."""
    parsed, made_for = importing.parse_source(source), None
    if parsed.kind == "hdf5" and parsed.path.is_file():
        with contextlib.suppress(OSError), h5py.File(parsed.path, "r") as f:
            if "task" in f.attrs:
                made_for = storage.decode_attr(f.attrs["task"])
            datasets = sorted(name for name in f if isinstance(f[name], h5py.Dataset))
            if parsed.member is None and "x" in datasets:
                if made_for is None and len(datasets) > 1:
                    raise ValueError(
                        f"{source} holds the datasets {', '.join(datasets)}: name the one of "
                        f"the observations ({parsed.path}:x, or another)"
                    )
                parsed = importing.Source(parsed.path, "x", "hdf5")
    if not parsed.path.is_file():
        raise FileNotFoundError(f"observed data {parsed.path} does not exist")
    with importing.open_array(parsed, "observed x") as rows:
        return parsed.path, np.array(rows[0 : rows.shape[0]]), made_for


def check_mock(task: Task, mock: Task) -> None:
    """Refuses a mock model that cannot stand in for ``task``'s simulator."""
    if not mock.has_simulator:
        raise ValueError(f"mock model {mock.name!r} has no simulator to draw observations with")
    if tuple(mock.parameter_names) != tuple(task.parameter_names):
        raise ValueError(
            f"mock model {mock.name!r} has parameters {list(mock.parameter_names)}, task "
            f"{task.name!r} {list(task.parameter_names)}: mocks must share the parameters "
            "whose recovery they test"
        )
    if tuple(mock.parameter_units) != tuple(task.parameter_units):
        raise ValueError(
            f"mock model {mock.name!r} measures its parameters in {list(mock.parameter_units)}, "
            f"task {task.name!r} in {list(task.parameter_units)}: the truths it draws would be "
            "read in the task's units"
        )
    if tuple(mock.x_shape) != tuple(task.x_shape):
        raise ValueError(
            f"mock model {mock.name!r} makes x of shape {tuple(mock.x_shape)}, task "
            f"{task.name!r} expects {tuple(task.x_shape)}"
        )


def _draw_finite(
    task: Task, rng: np.random.Generator, j: int, mock: Task | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(theta, x)``, ``x`` from ``mock`` if given; retried (a few times) if the simulator
    returns NaN or inf."""
    for _ in range(100):
        before = global_random_state()
        with simulator_errors(mock or task, 1, f"drawing synthetic observation {j}"):
            if mock is None:
                theta, x = task.simulate_block(1, rng)
            else:
                theta = task.prior.sample(1, rng)
                x = mock.simulate(theta.copy(), rng)  # the truths stay the prior's draws
        check_own_randomness(mock or task, before)
        theta, x = np.asarray(theta), np.asarray(x)
        check_shapes(mock or task, theta, x, 1)
        # Beyond float32's range is no bad luck to draw again: those observations would
        # never be drawn, and the simulations that train for them are refused the same way.
        storage.check_float32(x, f"x of task {(mock or task).name!r}", range_only=True)
        if np.isfinite(x).all():
            return theta[0], x[0]
    raise RuntimeError(f"task {task.name!r}: observation {j} stayed non-finite in 100 draws")


def read_mock_of(path: Path) -> str | None:
    """The mock model an observation file's ``x`` came from (None: the task's own simulator,
    or real data)."""
    try:
        with h5py.File(path, "r") as f:
            return storage.decode_attr(f.attrs["mock_of"]) if "mock_of" in f.attrs else None
    except OSError as error:
        raise storage.unreadable(Path(path), error) from None


def read_reference(path: Path) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """``theta`` (n_obs, D) or None (real data), ``x`` (n_obs, ...), ``reference_samples``
    (n_obs, R, D) or None."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `pipeline observe` to create it")
    try:
        with h5py.File(path, "r") as f:
            real = bool(f.attrs.get("real", False))
            if not f.attrs.get("complete", False) or "x" not in f or not (real or "theta" in f):
                raise storage.DataFileError(
                    f"{path} is incomplete or lacks 'theta'/'x'; rerun `pipeline observe`"
                )
            theta = f["theta"][...] if "theta" in f else None
            reference = f["reference_samples"][...] if "reference_samples" in f else None
            return theta, f["x"][...], reference
    except OSError as error:
        raise storage.unreadable(path, error) from None


def read_reference_info(path: Path) -> dict[str, Any] | None:
    """How the reference samples of ``path`` were drawn, or None where it has none.

    Returns:
        ``{"method": str, "diagnostics": [dict, ...]}`` with one dict of numbers per observation
        (e.g. ``rhat_max``, ``ess_bulk_min``, ``acceptance``, ``seconds``). None for files
        without reference samples and for files written before the attribute existed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `pipeline observe` to create it")
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise storage.DataFileError(f"{path} is incomplete; rerun `pipeline observe`")
            if "reference" not in f.attrs:
                return None
            info = storage.decode_attr(f.attrs["reference"])
    except OSError as error:
        raise storage.unreadable(path, error) from None
    if not isinstance(info, dict) or "method" not in info or "diagnostics" not in info:
        raise storage.DataFileError(
            f"{path}: attribute 'reference' is not a JSON object with 'method' and "
            "'diagnostics'; rerun `pipeline observe`"
        )
    return info


def select_observation(path: Path, index: int, out: Path, *, overwrite: bool = False) -> None:
    """Writes observation ``index`` of ``path`` (an observe file) alone to ``out``, with its
    truth and reference where there are any: the one observation sequential rounds aim at.

    ``out`` records ``selected_index`` and the source's digest, so its provenance stays whole.

    Raises:
        ValueError: If ``path`` has no observation ``index``.
    """
    path, out = Path(path), Path(out)
    atomic.check_new(out, overwrite=overwrite)
    read_reference(path)  # complete, with the datasets an observe file has
    try:
        with h5py.File(path, "r") as f:
            count = len(f["x"])
            if not 0 <= index < count:
                raise ValueError(
                    f"{path} holds {count} observations; there is no observation {index} "
                    "(observations count from 0; in the config, rounds.observation)"
                )
            rows = {name: f[name][index : index + 1] for name in f}
            attrs = {key: storage.decode_attr(value) for key, value in f.attrs.items()}
    except OSError as error:
        raise storage.unreadable(path, error) from None
    if "num_simulations" in attrs or "sampled" in attrs:
        raise ValueError(
            f"{path} is a file of {'simulations' if 'num_simulations' in attrs else 'samples'}, "
            "not of observations: select from the observations `pipeline observe` wrote "
            "(results/EXPERIMENT/TASK/observations.h5)"
        )
    if "reference" in attrs:
        attrs["reference"]["diagnostics"] = attrs["reference"]["diagnostics"][index : index + 1]
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()[:16]
    attrs["selected_from"] = {"digest": digest, "provenance": attrs.pop("provenance", None)}
    # A selection of a selection is still the task's observation its source was.
    attrs["selected_index"] = attrs.get("selected_index", index)
    attrs["provenance"] = provenance({"selected_from": digest, "index": index})
    with storage.atomic_h5(out) as f:
        for name, data in rows.items():
            f[name] = data
        for key, value in attrs.items():
            f.attrs[key] = storage.encode_attr(value)

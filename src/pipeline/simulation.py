"""The simulate stage: draws ``(theta, x)`` for an index range, in chunks spread over MPI ranks.

Randomness: simulation ``i`` lies in seed block ``i // B`` (``B`` = the task's
``seed_block_size``) whose generator is ``np.random.default_rng([seed, block])``. A block is
always simulated whole, so the data depend on ``(seed, i)`` alone: not on the number of ranks,
the chunk size, or even the total count ``N`` (the first 10^4 simulations of a 10^5 run equal a
10^4 run).

Work: the range ``[0, N)`` is cut into chunks of ``chunk_size`` simulations, independent of the
number of ranks; rank ``r`` takes chunks ``r, r + K, r + 2K, ...``. Each chunk is written to its
own shard beside the output (``OUT.shards/``); a rerun keeps verified shards and recomputes the
rest. Rank 0 merges the shards into ``OUT`` and removes them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.parallel import Comm
from pipeline.progress import Progress
from pipeline.provenance import provenance
from pipeline.tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationPlan:
    """What to simulate; every field shapes the data (or its provenance)."""

    task: str
    num_simulations: int
    seed: int
    chunk_size: int

    def chunks(self) -> list[tuple[int, int]]:
        """Index ranges ``[start, stop)`` of the chunks, in order."""
        n, size = self.num_simulations, self.chunk_size
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def identity(self, task: Task) -> dict[str, object]:
        """The fields that determine each simulation (not their count), recorded in every file."""
        return {"task": self.task, "seed": self.seed, "seed_block_size": task.seed_block_size}


def check_plan(plan: SimulationPlan, num_ranks: int) -> None:
    """Raises ``ValueError`` for plans that cannot run, naming the option to change."""
    if plan.num_simulations <= 0:
        raise ValueError(f"--num-simulations must be positive, got {plan.num_simulations}")
    if plan.chunk_size <= 0:
        raise ValueError(f"--chunk-size must be positive, got {plan.chunk_size}")
    num_chunks = len(plan.chunks())
    if num_ranks > num_chunks:
        raise ValueError(
            f"{num_ranks} MPI ranks but only {num_chunks} chunk(s) of {plan.chunk_size} "
            f"simulations: ranks would sit idle. Use at most {num_chunks} ranks or a "
            f"--chunk-size of at most {max(plan.num_simulations // num_ranks, 1)}."
        )


def simulate_range(task: Task, seed: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Simulations ``start <= i < stop``: ``theta`` (n, D) and ``x`` (n, *x_shape), float64."""
    size = task.seed_block_size
    thetas, xs = [], []
    for block in range(start // size, (stop - 1) // size + 1):
        rng = np.random.default_rng([seed, block])
        theta, x = task.simulate_block(size, rng)
        _check_shapes(task, theta, x, size)
        lo, hi = max(start - block * size, 0), min(stop - block * size, size)
        thetas.append(theta[lo:hi])
        xs.append(x[lo:hi])
    return np.concatenate(thetas), np.concatenate(xs)


def _check_shapes(task: Task, theta: np.ndarray, x: np.ndarray, n: int) -> None:
    expected_theta, expected_x = (n, task.dim_theta), (n, *task.x_shape)
    if theta.shape != expected_theta or x.shape != expected_x:
        raise ValueError(
            f"task {task.name!r} returned theta {theta.shape} and x {x.shape} for {n} "
            f"simulations; expected {expected_theta} and {expected_x}. Fix the task's prior "
            "or simulator (or its x_shape)."
        )


def shard_dir(out: Path) -> Path:
    """Folder of the per-chunk shards of ``out``; kept until the merge succeeds."""
    return out.with_name(out.name + ".shards")


def shard_path(out: Path, start: int, stop: int) -> Path:
    return shard_dir(out) / f"chunk-{start:012d}-{stop:012d}.h5"


def shard_is_valid(path: Path, identity: dict[str, object], start: int, stop: int) -> bool:
    """Whether ``path`` is a complete shard of this plan's chunk ``[start, stop)``."""
    try:
        attrs = storage.read_attrs(path)
    except (FileNotFoundError, storage.SimulationFileError):
        return False
    expected = {**identity, "index_start": start, "index_stop": stop}
    return all(attrs.get(k) == v for k, v in expected.items()) and attrs.get(
        "num_simulations"
    ) == (stop - start)


def run(plan: SimulationPlan, task: Task, out: Path, comm: Comm, *, overwrite: bool) -> None:
    """Simulates ``plan`` on this rank's chunks; rank 0 then merges everything into ``out``."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; delete it or pass --overwrite to replace it")
    check_plan(plan, size)
    identity = plan.identity(task)
    mine = plan.chunks()[rank::size]
    # Static round-robin chunks advance in step on every rank: rank 0's share stands for all.
    progress = Progress(sum(stop - start for start, stop in mine), "simulations on rank 0", log)
    for start, stop in mine:
        path = shard_path(out, start, stop)
        if shard_is_valid(path, identity, start, stop):
            log.info("rank %d: chunk [%d, %d) already simulated, kept", rank, start, stop)
        else:
            write_shard(task, plan, identity, path, start, stop)
        if rank == 0:
            progress.update(stop - start)
    comm.Barrier()
    if rank == 0:
        merge_shards(plan, task, out, identity)
    comm.Barrier()


def write_shard(
    task: Task,
    plan: SimulationPlan,
    identity: dict[str, object],
    path: Path,
    start: int,
    stop: int,
) -> None:
    theta, x = simulate_range(task, plan.seed, start, stop)
    attrs = {**identity, "index_start": start, "index_stop": stop}
    storage.write_simulations(path, theta, x, attrs, overwrite=True)


def merge_shards(plan: SimulationPlan, task: Task, out: Path, identity: dict[str, object]) -> None:
    """Copies the shards, in index order, into one chunked file; then removes the shards."""
    chunks = plan.chunks()
    theta = np.empty((plan.num_simulations, task.dim_theta), dtype=np.float32)
    x = np.empty((plan.num_simulations, *task.x_shape), dtype=np.float32)
    for start, stop in chunks:
        shard = storage.read_simulations(shard_path(out, start, stop), task=plan.task)
        theta[start:stop], x[start:stop] = shard.theta, shard.x
    num_nonfinite = int(np.sum(~(storage.finite_rows(theta) & storage.finite_rows(x))))
    if num_nonfinite:
        log.warning(
            "%d of %d simulations contain NaN or inf; they are kept in %s, flagged by "
            "'num_nonfinite', and excluded from training and validation",
            num_nonfinite,
            plan.num_simulations,
            out,
        )
    made_by = provenance({**identity, "num_simulations": plan.num_simulations})
    attrs = {
        **identity,
        "index_start": 0,
        "index_stop": plan.num_simulations,
        "num_nonfinite": num_nonfinite,
        "parameter_names": list(task.parameter_names),
        "parameter_units": list(task.parameter_units),
        "x_unit": task.x_unit,
        "provenance": made_by,
        "config_digest": made_by["config_digest"],
    }
    storage.write_simulations(out, theta, x, attrs, overwrite=True)
    shutil.rmtree(shard_dir(out))
    log.info("wrote %s: theta %s, x %s", out, theta.shape, x.shape)

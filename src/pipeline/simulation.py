"""The simulate stage: draws ``(theta, x)`` for an index range, in chunks spread over MPI ranks.

Randomness: simulation ``i`` lies in seed block ``i // B`` (``B`` = the task's
``seed_block_size``) whose generator is ``np.random.default_rng([seed, block])``. A block is
always simulated whole, so the data depend on ``(seed, i)`` alone: not on the number of ranks,
the chunk size, or even the total count ``N`` (the first 10^4 simulations of a 10^5 run equal a
10^4 run).

Work: the range ``[0, N)`` is cut into chunks of ``chunk_size`` simulations, independent of the
number of ranks; rank ``r`` takes chunks ``r, r + K, r + 2K, ...``. The split is static: a
dynamic queue on an MPI window stalls while the rank holding the counter computes (measured
with the mpich wheel: a claim waited the target's whole 3 s busy loop), so balance comes from
many small chunks instead. Each chunk is written to its own shard beside the output
(``OUT.shards/``) by a background thread while the rank simulates its next chunk (so a rank
holds at most two chunks in memory); a rerun keeps verified shards and recomputes the rest.
Rank 0 then merges the shards into ``OUT``: by copying, one shard at a time (compressed chunks
as they are), after which the shards are removed; or as a virtual dataset that maps them.

Scatter/gather: :func:`run_chunk` simulates one chunk into its shard (one job per chunk, no MPI)
and :func:`merge` joins finished shards (keeping them: they are the jobs' outputs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import site
import sysconfig
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from pipeline import atomic, parallel, storage
from pipeline.locking import OutputBusyError, OutputLock
from pipeline.parallel import Comm
from pipeline.progress import Progress
from pipeline.provenance import provenance
from pipeline.resources import available_memory, free_disk, size_text
from pipeline.tasks import Task
from pipeline.tasks.base import source_digest
from pipeline.writer import BackgroundWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationPlan:
    """What to simulate; every field shapes the data (or its provenance)."""

    task: str
    num_simulations: int
    seed: int
    chunk_size: int
    # Where theta comes from when not the prior: a sequential round's region (pipeline.rounds).
    proposal: dict[str, Any] | None = None

    def chunks(self) -> list[tuple[int, int]]:
        """Index ranges ``[start, stop)`` of the chunks, in order."""
        n, size = self.num_simulations, self.chunk_size
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def chunk_at(self, start: int) -> tuple[int, int]:
        """The chunk ``[start, stop)`` that begins at ``start``; raises for any other index."""
        if start < 0 or start >= self.num_simulations or start % self.chunk_size:
            raise ValueError(
                f"--chunk {start} is not the start of a chunk: chunks of {self.chunk_size} "
                f"simulations start at multiples of {self.chunk_size} below {self.num_simulations}"
            )
        return start, min(start + self.chunk_size, self.num_simulations)

    def fitted_to(self, num_ranks: int, seed_block_size: int = 1) -> SimulationPlan:
        """This plan with chunks small enough that each of ``num_ranks`` ranks gets one, in
        whole seed blocks of ``seed_block_size`` where the plan has enough of them.

        The data do not depend on the chunk size, so this only changes how work is cut. A chunk
        simulates every seed block it touches in full (its generator draws the whole block), so
        a block cut between two chunks is simulated twice: fitted chunks are rounded up to whole
        blocks, and ranks beyond the blocks' count stay idle.
        """
        if self.num_simulations <= 0 or self.chunk_size <= 0:
            return self  # check_plan names the bad option
        chunk = min(self.chunk_size, -(-self.num_simulations // num_ranks))
        # Rounded up, not down: a chunk's memory is its blocks' anyway (each drawn whole).
        return replace(self, chunk_size=-(-chunk // seed_block_size) * seed_block_size)

    def identity(self, task: Task) -> dict[str, object]:
        """The fields that determine each simulation (not their count), recorded in every file:
        for a user's task also the digest of the files that define it."""
        identity = {"task": self.task, "seed": self.seed, "seed_block_size": task.seed_block_size}
        if self.proposal is not None:
            identity["proposal"] = self.proposal
        digest = source_digest(task)
        return identity if digest is None else {**identity, "task_digest": digest}


def check_resources(plan: SimulationPlan, task: Task, out: Path, merge: str = "virtual") -> None:
    """Refuses, before any work, a plan whose file cannot fit on the disk holding ``out`` or
    whose two chunk buffers cannot fit in memory, with the sizes and the option to change.

    A ``copy`` merge needs room for the shards and the copy at once.
    """
    row = 4 * (task.dim_theta + math.prod(task.x_shape))  # float32 theta and x
    needed = plan.num_simulations * row * (2 if merge == "copy" else 1)
    folder, free = free_disk(out)
    if needed > free:
        raise ValueError(
            f"{plan.num_simulations} simulations of {task.name} take about {size_text(needed)} "
            f"(float32, before compression{', twice for a copy merge' if merge == 'copy' else ''}"
            f"), but {folder} has {size_text(free)} free; lower --num-simulations or write --out "
            "to a larger file system"
        )
    buffers = 2 * min(plan.chunk_size, plan.num_simulations) * row
    available = available_memory()
    if buffers > available / 2:
        raise ValueError(
            f"chunks of {plan.chunk_size} simulations of {task.name} need {size_text(buffers)} "
            f"of memory (two chunk buffers), more than half the {size_text(available)} "
            "available; lower --chunk-size"
        )


def drawn_rows(plan: SimulationPlan, seed_block_size: int) -> int:
    """How many simulations the plan's chunks draw in all: each draws every seed block it
    touches in full (:func:`simulate_range`), so a block cut between chunks is drawn twice."""
    size = seed_block_size
    return sum(((stop - 1) // size - start // size + 1) * size for start, stop in plan.chunks())


def warn_cut_blocks(plan: SimulationPlan, task: Task) -> None:
    """Logs what chunks that cut the task's seed blocks cost: a simulator that takes minutes
    a run would spend that many more minutes for the same data."""
    size = task.seed_block_size
    if plan.chunk_size % size == 0:
        return
    needed = drawn_rows(replace(plan, chunk_size=-(-plan.chunk_size // size) * size), size)
    drawn = drawn_rows(plan, size)
    if drawn > needed:
        log.warning(
            "chunks of %d simulations cut %s's seed blocks of %d, and a chunk draws every block "
            "it touches in full: this run simulates %d rows for %d kept (%.1f times what chunks "
            "of whole blocks would); use a --chunk-size that is a multiple of %d",
            plan.chunk_size,
            task.name,
            size,
            drawn,
            plan.num_simulations,
            drawn / needed,
            size,
        )


def check_plan(plan: SimulationPlan, num_ranks: int) -> None:
    """Raises ``ValueError`` for plans that cannot run, naming the option to change."""
    if plan.num_simulations <= 0:
        raise ValueError(f"--num-simulations must be positive, got {plan.num_simulations}")
    if plan.chunk_size <= 0:
        raise ValueError(f"--chunk-size must be positive, got {plan.chunk_size}")
    num_chunks = -(-plan.num_simulations // plan.chunk_size)
    if num_ranks > num_chunks:
        raise ValueError(
            f"{num_ranks} MPI ranks but only {num_chunks} chunk(s) of {plan.chunk_size} "
            f"simulations: ranks would sit idle. Use at most {num_chunks} ranks or a "
            f"--chunk-size of at most {max(plan.num_simulations // num_ranks, 1)}."
        )


def simulate_range(
    task: Task,
    seed: int,
    start: int,
    stop: int,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulations ``start <= i < stop``: ``theta`` (n, D) and ``x`` (n, *x_shape), float32.

    ``out``: arrays of those shapes and dtype to fill (and return) instead of new ones.
    """
    size = task.seed_block_size
    if out is None:
        out = (
            np.empty((stop - start, task.dim_theta), dtype=np.float32),
            np.empty((stop - start, *task.x_shape), dtype=np.float32),
        )
    theta, x = out
    precision = PrecisionCheck(task)
    first = start // size
    # A user's simulator may draw from a global generator in some blocks only (for some
    # parameters), so each of its blocks is checked; the built-in simulators, tested not to,
    # at the first block only: reading the states (about 60 microseconds) costs as much as a
    # block of two_moons.
    every = bool(task.source_files)
    for block in range(first, (stop - 1) // size + 1):
        rng = np.random.default_rng([seed, block])
        before = global_random_state() if every or block == first else None
        doing = (
            f"simulating seed block {block} (simulations {block * size} to {(block + 1) * size})"
        )
        with simulator_errors(task, size, doing):
            theta_block, x_block = map(np.asarray, task.simulate_block(size, rng))
        if before is not None:
            check_own_randomness(task, before)
        check_shapes(task, theta_block, x_block, size)
        precision.add(theta_block, x_block)
        lo, hi = max(start - block * size, 0), min(stop - block * size, size)
        rows = slice(block * size + lo - start, block * size + hi - start)
        theta[rows], x[rows] = theta_block[lo:hi], x_block[lo:hi]
    precision.finish()
    return theta, x


class PrecisionCheck:
    """:func:`pipeline.storage.check_float32` on what a chunk draws, before anything is stored:
    the range of every block, the precision over its first :attr:`ROWS` rows or more (blocks of
    one simulation have no spread of their own)."""

    ROWS = 64

    def __init__(self, task: Task) -> None:
        self.precision = {
            name: storage.Float32Precision(f"{name} of task {task.name!r}")
            for name in ("theta", "x")
        }
        self.rows = 0

    def add(self, theta: np.ndarray, x: np.ndarray) -> None:
        """One block's ``theta`` (n, D) and ``x`` (n, *x_shape), as the simulator returned them."""
        gathering = self.rows < self.ROWS
        for name, values in (("theta", theta), ("x", x)):
            storage.check_float32(values, self.precision[name].what, range_only=True)
            if gathering:
                self.precision[name].add(values)
        self.rows += len(theta)
        if gathering and self.rows >= self.ROWS:
            self.finish()

    def finish(self) -> None:
        """The precision check over the rows gathered (again, if it has run: nothing new)."""
        for precision in self.precision.values():
            precision.check()


class ChunkBuffers:
    """Two pairs of ``(theta, x)`` arrays of one chunk each, handed out in turn.

    Filling the same memory again spares the page faults of fresh arrays (14 ms per 10^6
    two_moons simulations, 6 % of the simulator's time, on the 2-core CI VM). A pair is handed
    out again two calls later: by then :class:`~pipeline.writer.BackgroundWriter` has finished
    writing it.
    """

    def __init__(self, task: Task, rows: int) -> None:
        self._shapes = ((rows, task.dim_theta), (rows, *task.x_shape))
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._turn = 0

    def next(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next pair, as views of its first ``n`` rows (``n`` at most a chunk)."""
        turn, self._turn = self._turn % 2, self._turn + 1
        if turn == len(self._pairs):  # allocated on first use: a resumed run may need none
            theta_shape, x_shape = self._shapes
            self._pairs.append((np.empty(theta_shape, np.float32), np.empty(x_shape, np.float32)))
        theta, x = self._pairs[turn]
        return theta[:n], x[:n]


class SimulatorError(RuntimeError):
    """A user's simulator (or prior) raised: the message names where in their code."""


# Folders that hold no user's code: the pipeline's own, the standard library's and every site
# of installed packages (numpy, scipy; the user's and the system's too), which a user's
# simulator calls into.
_NOT_USER_CODE = tuple(
    {
        Path(path).resolve()
        for path in (
            Path(__file__).parent,
            *(
                sysconfig.get_paths()[key]
                for key in ("stdlib", "platstdlib", "purelib", "platlib")
            ),
            *site.getsitepackages(),
            site.getusersitepackages(),
        )
    }
)


def _user_frame(trace: TracebackType | None) -> traceback.FrameSummary | None:
    """The innermost frame of ``trace`` in a user's code (None if it has none)."""
    frames = [
        frame
        for frame in traceback.extract_tb(trace)
        if not frame.filename.startswith("<")
        and not any(Path(frame.filename).resolve().is_relative_to(root) for root in _NOT_USER_CODE)
    ]
    return frames[-1] if frames else None


@contextlib.contextmanager
def simulator_errors(task: Task, n: int, doing: str) -> Iterator[None]:
    """Re-raises what a user's simulator raises while ``doing`` (a call on ``n`` rows) as a
    :class:`SimulatorError` naming the file and line of their code and the call's contract, and
    logs the whole traceback; errors raised by the pipeline's own code pass unchanged."""
    try:
        yield
    except Exception as error:
        frame = _user_frame(error.__traceback__)
        if frame is None:
            raise
        log.error(
            "the simulator of task %r raised while %s:\n%s",
            task.name,
            doing,
            "".join(traceback.format_exception(error)).rstrip(),
        )
        raise SimulatorError(
            f"the simulator of task {task.name!r} raised {type(error).__name__}: {error} while "
            f"{doing}, at {frame.filename}:{frame.lineno} in {frame.name} ({frame.line!r}). "
            f"simulate(theta, rng) gets theta of shape (n, {task.dim_theta}) (here n = {n}) and "
            f"returns x of shape (n, {', '.join(map(str, task.x_shape))}); the log holds the "
            "whole traceback"
        ) from error


def global_random_state() -> tuple[Any, ...]:
    """The states of NumPy's and Python's global generators, which a simulator must not use."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    return keys.tobytes(), position, has_gauss, cached, random.getstate()


def check_own_randomness(task: Task, before: tuple[Any, ...]) -> None:
    """Raises naming the fix if simulating a block moved a global generator (``before``: its
    state then): its draws would depend on what the process simulated before, not on
    ``(seed, i)``, so that ranks and chunks repeat one another's noise."""
    if global_random_state() != before:
        raise ValueError(
            f"task {task.name!r} drew from a global random generator (np.random.* or the "
            "random module) while simulating, so its simulations would not depend on (seed, i) "
            "alone: 1 and 2 MPI ranks would give different data, and chunks would repeat each "
            "other's noise. Draw every random number from the rng the simulator is given "
            "(rng.normal(...)), or from generators of your own seeded from it "
            "(np.random.default_rng(rng.integers(2**63)), "
            "random.Random(int(rng.integers(2**63))))."
        )


def check_shapes(task: Task, theta: np.ndarray, x: np.ndarray, n: int) -> None:
    """Raises naming the fix unless ``task`` returned ``n`` rows of ``theta`` (n, D) and
    ``x`` (n, *x_shape) of real numbers."""
    expected_theta, expected_x = (n, task.dim_theta), (n, *task.x_shape)
    if theta.shape != expected_theta or x.shape != expected_x:
        raise ValueError(
            f"task {task.name!r} returned theta {theta.shape} and x {x.shape} for a seed block "
            f"of {n} simulations; expected {expected_theta} and {expected_x}. Fix the task's "
            "prior or simulator (or its x_shape)."
        )
    for name, array in (("theta", theta), ("x", x)):
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(
                f"task {task.name!r} returned {name} of dtype {array.dtype}; expected real "
                "numbers (float64). Make the simulator return a numeric NumPy array."
            )


def shard_dir(out: Path) -> Path:
    """Folder of the per-chunk shards of ``out``; kept until the merge succeeds."""
    return out.with_name(out.name + ".shards")


def shard_path(out: Path, start: int, stop: int) -> Path:
    return shard_dir(out) / f"chunk-{start:012d}-{stop:012d}.h5"


# Identity keys a run records only where they apply (SimulationPlan.identity).
OPTIONAL_IDENTITY = ("proposal", "task_digest")


def valid_shard_attrs(
    path: Path, identity: dict[str, object], start: int, stop: int
) -> dict[str, Any] | None:
    """The attributes of ``path`` if it is a complete shard of this plan's chunk, else ``None``."""
    try:
        attrs = storage.read_attrs(path)
    except (FileNotFoundError, storage.DataFileError):
        return None
    # Keys only some runs record count when absent too: a shard drawn from a round's region
    # is not a shard of a run from the prior.
    optional = dict.fromkeys(OPTIONAL_IDENTITY)
    expected = {**optional, **identity, "index_start": start, "index_stop": stop}
    matches = all(attrs.get(k) == v for k, v in expected.items())
    return attrs if matches and attrs.get("num_simulations") == (stop - start) else None


def reusable_shard(
    path: Path,
    identity: dict[str, object],
    start: int,
    stop: int,
    listing: tuple[set[str], dict[str, list[Path]]],
) -> dict[str, Any] | None:
    """The attributes of a complete shard of chunk ``[start, stop)`` at ``path``, else ``None``;
    first deletes what killed writes of ``path`` left (``listing``: its folder's
    :func:`pipeline.storage.list_folder`). Call only for a chunk this process owns."""
    finished, temporaries = listing
    for stale in temporaries.get(path.name, []):
        stale.unlink(missing_ok=True)
    if path.name not in finished:
        return None
    return valid_shard_attrs(path, identity, start, stop)


# Per shard and merged file: simulations whose program run failed, and of those timed out.
FAILURE_KEYS = ("num_failed_runs", "num_timed_out")


def failure_counts(attrs: dict[str, Any]) -> np.ndarray:
    """``attrs``' counts of :data:`FAILURE_KEYS` (0 where a file of a simulator that cannot
    fail, or of an earlier version, has none), shape (2,)."""
    return np.array([int(attrs.get(key, 0)) for key in FAILURE_KEYS])


def simulated_again(attrs: dict[str, Any], path: Path) -> bool:
    """Whether a complete shard of this run is simulated again rather than kept: every one of
    its program runs failed (a crash, a timeout, unreadable output), as where a node lacked a
    library since installed; kept, its rows would stay NaN in every resumed run. A shard where
    some runs failed is kept: such failures are mostly the parameters' (a region where the
    program breaks), and simulating it again on every resume would undo what resuming saves."""
    failed = int(attrs.get("num_failed_runs", 0))
    if failed and failed >= int(attrs["num_simulations"]):
        log.info("every run of %s failed: simulating it again", path)
        return True
    return False


def simulate_counted(
    task: Task, seed: int, start: int, stop: int, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """:func:`simulate_range`, and its chunk's attributes that count NaN rows and failed runs."""
    before = np.array(task.failed_runs())
    theta, x = simulate_range(task, seed, start, stop, out)
    failed = np.array(task.failed_runs()) - before
    counts = {"num_nonfinite": storage.count_nonfinite_rows(theta, x)}
    return theta, x, counts | dict(zip(FAILURE_KEYS, map(int, failed), strict=True))


MERGE_MODES = ("copy", "virtual")


def check_output(out: Path, *, overwrite: bool, merge: str, compression: str) -> None:
    """Raises for a merge mode or filter that does not exist, or an output not to replace."""
    if merge not in MERGE_MODES:
        raise ValueError(f"--merge must be one of {', '.join(MERGE_MODES)}, got {merge!r}")
    if compression not in storage.COMPRESSIONS:
        raise ValueError(
            f"--compression must be one of {', '.join(storage.COMPRESSIONS)}, got {compression!r}"
        )
    atomic.check_new(out, overwrite=overwrite)


def simulate(
    plan: SimulationPlan,
    task: Task,
    out: Path,
    *,
    overwrite: bool,
    merge: str,
    compression: str,
    chunk: int | None = None,
    fit_chunks: bool = False,
) -> None:
    """The simulate stage in this process's MPI world (one process without a launcher).

    With ``chunk``, only the chunk starting at that index, into its shard, with no merge (one
    job per chunk, then :func:`merge`); otherwise every chunk spread over the ranks and merged
    into ``out`` (:func:`run`), the chunks shrunk to give every rank one with ``fit_chunks``.
    A failure on one rank aborts them all, so that none waits for it forever.
    """
    comm = parallel.world()
    if chunk is not None:
        if comm.Get_size() > 1:
            raise ValueError(
                f"--chunk computes one chunk in one process, but {comm.Get_size()} MPI ranks "
                "started; run it without mpiexec/srun (or drop --chunk to spread all chunks)"
            )
        run_chunk(plan, task, out, chunk, compression=compression, overwrite=overwrite)
        return
    if fit_chunks:
        plan = plan.fitted_to(comm.Get_size(), task.seed_block_size)
    try:
        run(
            plan,
            task,
            out,
            comm,
            overwrite=overwrite,
            merge=merge,
            compression=compression,
            allow_idle=fit_chunks,
        )
    except Exception as error:
        if comm.Get_size() > 1:
            parallel.abort_on_error(comm, error)
        raise


def run(
    plan: SimulationPlan,
    task: Task,
    out: Path,
    comm: Comm,
    *,
    overwrite: bool,
    merge: str = "copy",
    compression: str = "gzip",
    allow_idle: bool = False,
) -> None:
    """Simulates ``plan`` on this rank's chunks; rank 0 then merges everything into ``out``.

    Arguments:
        merge: ``"copy"`` (a self-contained ``out``; the shards are removed) or ``"virtual"``
            (``out`` maps the shards, which stay in ``OUT.shards/``).
        compression: HDF5 filter of the shards and the copy, a key of
            :data:`pipeline.storage.COMPRESSIONS`.
        allow_idle: Let ranks beyond the chunks' count wait (``--fit-chunks``: a workflow's
            ranks are set once for splits of any size); otherwise that is an error.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    check_output(out, overwrite=overwrite, merge=merge, compression=compression)
    valid = plan.num_simulations > 0 and plan.chunk_size > 0
    num_chunks = len(plan.chunks()) if valid else 0
    if allow_idle and 0 < num_chunks < size:
        if rank == 0:
            log.warning(
                "%d simulations make %d chunk(s) for %d MPI ranks: %d rank(s) stay idle",
                plan.num_simulations,
                num_chunks,
                size,
                size - num_chunks,
            )
        check_plan(plan, num_chunks)
    else:
        check_plan(plan, size)
    check_resources(plan, task, out, merge)
    check_writable(shard_dir(out))
    if rank == 0:
        warn_cut_blocks(plan, task)
    # Rank 0 holds the output's lock until the merge is done; every rank learns if it failed.
    with contextlib.ExitStack() as held:
        held.callback(_remove_if_empty, shard_dir(out))  # after the lock's release
        busy = None
        if rank == 0:
            what = f"{out} ({plan.task}, seed {plan.seed})"
            try:
                held.enter_context(OutputLock(shard_dir(out), what))
            except OutputBusyError as error:
                busy = str(error)
        busy = comm.bcast(busy)
        if busy is not None:
            raise OutputBusyError(busy)
        _simulate_and_merge(plan, task, out, comm, merge, compression)


def _simulate_and_merge(
    plan: SimulationPlan, task: Task, out: Path, comm: Comm, merge: str, compression: str
) -> None:
    """:func:`run` once its checks passed and the output is locked."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        log.info(
            "simulating %d of %s (seed %d) in %d chunks of at most %d on %d MPI rank(s)",
            plan.num_simulations,
            plan.task,
            plan.seed,
            len(plan.chunks()),
            plan.chunk_size,
            size,
        )
    identity, attrs = plan.identity(task), shard_attrs(plan, task)
    mine = plan.chunks()[rank::size]
    # Static round-robin chunks advance in step on every rank: rank 0's share stands for all.
    progress = Progress(sum(stop - start for start, stop in mine), "simulations on rank 0", log)
    num_nonfinite, failed = 0, np.zeros(len(FAILURE_KEYS), dtype=int)
    listing = storage.list_folder(shard_dir(out))
    buffers = ChunkBuffers(task, min(plan.chunk_size, plan.num_simulations))
    with BackgroundWriter() as writer:
        for start, stop in mine:
            path = shard_path(out, start, stop)
            kept = reusable_shard(path, identity, start, stop, listing)
            if kept is not None and not simulated_again(kept, path):
                log.info("rank %d: chunk [%d, %d) already simulated, kept", rank, start, stop)
                num_nonfinite += kept["num_nonfinite"]
                failed += failure_counts(kept)
            else:
                buffer = buffers.next(stop - start)
                theta, x, counts = simulate_counted(task, plan.seed, start, stop, buffer)
                num_nonfinite += counts["num_nonfinite"]
                failed += failure_counts(counts)
                chunk_attrs = {**attrs, **counts}
                writer.submit(
                    partial(write_shard, path, theta, x, chunk_attrs, start, stop, compression)
                )
            if rank == 0:
                progress.update(stop - start)
    num_nonfinite = comm.allreduce(num_nonfinite)
    failed = [comm.allreduce(int(count)) for count in failed]
    if rank == 0:
        check_some_finite(plan, num_nonfinite, out)
        attrs = {**attrs, "num_nonfinite": num_nonfinite, "mpi_ranks": size}
        attrs |= dict(zip(FAILURE_KEYS, failed, strict=True))
        merge_shards(plan, task, out, attrs, merge, compression)
    comm.Barrier()


def run_chunk(
    plan: SimulationPlan,
    task: Task,
    out: Path,
    start: int,
    *,
    compression: str = "gzip",
    overwrite: bool = False,
) -> Path:
    """Simulates the one chunk of ``plan`` that starts at ``start`` into its shard of ``out``.

    A shard already there and complete is kept; a complete shard of another run (another
    seed, task or region) is replaced only with ``overwrite``, since a merged file of that run
    may read it. Returns the shard's path.
    """
    check_plan(plan, 1)
    check_resources(plan, task, out)
    warn_cut_blocks(plan, task)
    start, stop = plan.chunk_at(start)
    path = shard_path(out, start, stop)
    check_writable(shard_dir(out))
    listing = storage.list_folder(shard_dir(out))
    identity = plan.identity(task)
    ours = reusable_shard(path, identity, start, stop, listing)
    if ours is not None and not simulated_again(ours, path):
        log.info("chunk [%d, %d) already simulated: %s kept", start, stop, path)
        return path
    if ours is None and path.name in listing[0] and not overwrite:
        try:
            other = storage.read_attrs(path)
        except storage.DataFileError:
            other = None  # unreadable: no run's data to keep
        if other is not None:
            theirs, mine = describe_runs(other, identity, start)
            raise storage.DataFileError(
                f"shard {path} holds a chunk of another run ({theirs}), not of this one "
                f"({mine}), and a file merged from that run may read it: give each run its "
                "own --out, or replace the shard with --overwrite"
            )
    theta, x, counts = simulate_counted(task, plan.seed, start, stop)
    write_shard(path, theta, x, {**shard_attrs(plan, task), **counts}, start, stop, compression)
    log.info("wrote chunk [%d, %d) to %s", start, stop, path)
    return path


def merge(
    plan: SimulationPlan,
    task: Task,
    out: Path,
    *,
    overwrite: bool,
    merge: str = "copy",
    compression: str = "gzip",
) -> None:
    """Joins the finished shards of ``plan`` into ``out`` and keeps them (scatter/gather).

    Raises naming the missing or incomplete shards, before writing anything.
    """
    check_output(out, overwrite=overwrite, merge=merge, compression=compression)
    check_plan(plan, 1)
    identity = plan.identity(task)
    paths = [shard_path(out, a, b) for a, b in plan.chunks()]
    found = [
        valid_shard_attrs(p, identity, a, b)
        for p, (a, b) in zip(paths, plan.chunks(), strict=True)
    ]
    missing = [path for path, attrs in zip(paths, found, strict=True) if attrs is None]
    for path, (start, _) in zip(paths, plan.chunks(), strict=True):
        if path in missing and path.exists():
            try:
                other = storage.read_attrs(path)
            except storage.DataFileError:
                continue  # a shard whose writing was cut: missing, as said below
            differ = [k for k in identity if other.get(k) != identity[k]]
            if differ == ["task_digest"]:
                raise storage.DataFileError(
                    f"shard {path} was simulated by an earlier definition of task {plan.task!r} "
                    f"(its files changed since): simulate that chunk again (pipeline simulate "
                    f"--chunk {start}), then merge"
                )
            raise foreign_shard(path, other, identity, start, out)
    if missing:
        raise storage.DataFileError(
            f"{len(missing)} of {len(found)} shards of {out} are missing or incomplete "
            f"(first: {missing[0]}); simulate those chunks (pipeline simulate --chunk START) "
            "before merging"
        )
    num_nonfinite = sum(attrs["num_nonfinite"] for attrs in found)
    check_some_finite(plan, num_nonfinite, out)
    failed = sum(failure_counts(attrs) for attrs in found)
    attrs = {**shard_attrs(plan, task), "num_nonfinite": num_nonfinite}
    attrs |= dict(zip(FAILURE_KEYS, map(int, failed), strict=True))
    merge_shards(plan, task, out, attrs, merge, compression, keep_shards=True)


def check_some_finite(plan: SimulationPlan, num_nonfinite: int, out: Path) -> None:
    """Refuses to merge a run in which every simulation returned NaN or inf: the simulator is
    broken, not unlucky (its shards stay, for a look and for the rerun once it is fixed)."""
    if num_nonfinite == plan.num_simulations:
        raise ValueError(
            f"all {plan.num_simulations} simulations of {plan.task} returned NaN or inf, so "
            f"{out} would hold nothing to train on; the log's warnings (or a run of the "
            "simulator by hand) show why. Fix the simulator, then rerun: a run simulates "
            "again the chunks whose every program run failed (under simulate.scatter, whose "
            f"chunk jobs' shards Snakemake keeps, delete {shard_dir(out)} first)"
        )


def check_writable(folder: Path) -> None:
    """Creates ``folder`` and writes a probe file in it, failing with the folder named."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A name of its own: ranks and concurrent chunk jobs probe the same folder at once.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write simulations to {folder}: {error.strerror or error}. "
            "Choose an --out in a folder you can write to."
        ) from None


def _remove_if_empty(folder: Path) -> None:
    """Leaves nothing behind when a failed run wrote no shard (other ranks may race us)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def shard_attrs(plan: SimulationPlan, task: Task) -> dict[str, Any]:
    """Attributes every shard carries besides its index range: what made it, and how."""
    made_by = provenance({**plan.identity(task), "num_simulations": plan.num_simulations})
    return {
        **plan.identity(task),
        "parameter_names": list(task.parameter_names),
        "parameter_units": list(task.parameter_units),
        "x_unit": task.x_unit,
        "provenance": made_by,
        "config_digest": made_by["config_digest"],
    }


def write_shard(
    path: Path,
    theta: np.ndarray,
    x: np.ndarray,
    attrs: dict[str, Any],
    start: int,
    stop: int,
    compression: str = "gzip",
) -> None:
    """Writes chunk ``[start, stop)`` (``theta`` (n, D), ``x`` (n, *x_shape)) to its shard.

    ``attrs`` are the run's :func:`shard_attrs` with the chunk's ``num_nonfinite`` (counted by
    the caller, which sums them over the run).
    """
    attrs = {**attrs, "index_start": start, "index_stop": stop}
    # The run cleaned the shard folder's temporaries once, under its lock (reusable_shard).
    storage.write_simulations(
        path, theta, x, attrs, overwrite=True, compression=compression, clean=False
    )


def check_shards_belong(
    plan: SimulationPlan, task: Task, out: Path, shards: list[Path]
) -> list[dict[str, Any]]:
    """Each shard's attributes; raises naming the first shard that is not this plan's chunk:
    another run (another seed or task) wrote into the same folder, and merging it would mix two
    runs' data."""
    identity = plan.identity(task)
    found = []
    for path, (start, stop) in zip(shards, plan.chunks(), strict=True):
        attrs = valid_shard_attrs(path, identity, start, stop)
        if attrs is not None:
            found.append(attrs)
            continue
        try:
            other = storage.read_attrs(path)
        except (FileNotFoundError, storage.DataFileError) as error:
            raise storage.DataFileError(
                f"shard {path} of {out} disappeared or broke before the merge ({error}); "
                "another run may be writing the same --out. Rerun to recompute it"
            ) from None
        raise foreign_shard(path, other, identity, start, out)
    return found


def foreign_shard(
    path: Path, other: dict[str, Any], identity: dict[str, Any], start: int, out: Path
) -> storage.DataFileError:
    """The error for a complete shard at ``path`` (``other``: its attributes) of another run
    than the one of ``identity`` whose chunk starts at ``start``."""
    theirs, mine = describe_runs(other, identity, start)
    return storage.DataFileError(
        f"shard {path} belongs to another run ({theirs}), not to this one ({mine}): two runs "
        f"wrote into {shard_dir(out)}. Nothing was merged; give each run its own --out, then "
        "rerun this one to recompute that chunk"
    )


def describe_runs(other: dict[str, Any], identity: dict[str, Any], start: int) -> tuple[str, str]:
    """The identities of a shard's run (``other``: its attributes) and of this run's chunk at
    ``start``, as text for an error."""
    keys = dict.fromkeys([*identity, *OPTIONAL_IDENTITY, "index_start"])
    theirs = ", ".join(f"{key} {other.get(key)!r}" for key in keys)
    mine = f"{', '.join(f'{k} {v!r}' for k, v in identity.items())}, index_start {start}"
    return theirs, mine


def shard_revisions(found: list[dict[str, Any]], out: Path, revision: str) -> list[str]:
    """The code revisions the shards ``found`` (their attributes) were simulated at, sorted;
    warns when any is not ``revision``, this run's. A shard is kept by its task, seed, chunk and
    region, not by the code that drew it (a user's task files are in its identity, the package's
    own simulators are not), so a built-in simulator changed between a killed run and its resume
    would mix its old and new draws in one file: the merged file names every revision."""
    revisions = [shard.get("provenance", {}).get("code_revision", "unknown") for shard in found]
    other = sum(r != revision for r in revisions)
    if other:
        log.warning(
            "%d of %d shards of %s were simulated at code revision %s, not this run's %s, and "
            "were kept (same task, seed, chunk and region); if the simulator changed between "
            "them, delete %s and rerun",
            other,
            len(found),
            out,
            " and ".join(sorted(set(revisions) - {revision})),
            revision,
            shard_dir(out),
        )
    return sorted(set(revisions))


def merge_shards(
    plan: SimulationPlan,
    task: Task,
    out: Path,
    attrs: dict[str, Any],
    merge: str = "copy",
    compression: str = "gzip",
    *,
    keep_shards: bool = False,
) -> None:
    """Joins the shards, in index order, into ``out`` (by copy or as a virtual dataset).

    ``attrs`` are the run's :func:`shard_attrs` with the total ``num_nonfinite`` of all ranks;
    ``out`` gets them with the whole index range. A copy removes the shards unless
    ``keep_shards``.
    """
    chunks = plan.chunks()
    shards = [shard_path(out, start, stop) for start, stop in chunks]
    found = check_shards_belong(plan, task, out, shards)
    num_nonfinite = attrs["num_nonfinite"]
    if num_nonfinite:
        log.warning(
            "%d of %d simulations contain NaN or inf; they are kept in %s, flagged by "
            "'num_nonfinite', and excluded from training and validation",
            num_nonfinite,
            plan.num_simulations,
            out,
        )
    timed_out = int(attrs.get("num_timed_out", 0))
    if timed_out:
        log.warning(
            "%d of these simulations timed out: which ones depends on how loaded the machines "
            "were, so another run with the same seed may differ in them (and MPI ranks no "
            "longer give identical files); raise the simulator's timeout above its slowest run",
            timed_out,
        )
    attrs = {
        **attrs,
        "index_start": 0,
        "index_stop": plan.num_simulations,
        "merge": merge,
        "compression": compression,
        "shard_code_revisions": shard_revisions(found, out, attrs["provenance"]["code_revision"]),
    }
    if merge == "copy":
        storage.merge_copy(out, shards, attrs, compression)
        if not keep_shards:
            shutil.rmtree(shard_dir(out))
    else:
        # The file reads the shards as they are: shards kept from a run with another
        # compression keep theirs, which the file must state (lzf is h5py's alone).
        found = sorted({storage.compression_of(shard) for shard in shards})
        attrs["compression"] = found[0] if len(found) == 1 else "mixed: " + ", ".join(found)
        if found != [compression]:
            log.warning(
                "%s maps shards compressed with %s (kept from an earlier run), not %s; "
                "rerun with --merge copy for one compression",
                out,
                ", ".join(found),
                compression,
            )
        # Every rank wrote or verified its shards: their shapes follow from the plan.
        storage.merge_virtual(out, shards, attrs, (chunks, (task.dim_theta,), task.x_shape))
        # Shards of an earlier plan (another chunk size or count) would only take up space.
        for stale in set(shard_dir(out).glob("chunk-*.h5")) - set(shards):
            stale.unlink()
    log.info(
        "wrote %s (%s merge of %d shards): theta (%d, %d), x (%d, %s)",
        out,
        merge,
        len(shards),
        plan.num_simulations,
        task.dim_theta,
        plan.num_simulations,
        ", ".join(map(str, task.x_shape)),
    )

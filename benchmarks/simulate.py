"""Benchmarks of the simulate stage (issue: simulations at cluster scale).

Run from the repository root with the project's environment:

    .venv/bin/python benchmarks/simulate.py [--quick]

It measures, side by side in this one script:

1. throughput of each task's bare vectorised simulator loop (simulations/s on one core);
2. overhead of the pipeline (``simulation.run``: shards, HDF5, merge, bookkeeping) over that
   bare loop, in one process, for two_moons at N = 10^6 (each compression and merge mode) and
   sn_cosmology at N = 10^5; once free to use a second core (the shard writer thread's
   compression runs beside the simulation) and once pinned to one core (the CPU cost);
3. parallel efficiency of ``pipeline simulate``: ``mpiexec -n 1`` pinned to one core against
   ``mpiexec -n 2`` on two, beside the machine's ceiling: one bare loop alone against two at
   once, each on its own core;
4. HDF5 write bandwidth as a fraction of ``dd``'s on the same disk (both flushed to disk);
5. peak resident memory of ``pipeline simulate`` against N (one rank);
6. where the overhead goes: the bare two_moons loop, then its blocks kept as float32 arrays,
   then also written with plain ``write`` on the pipeline's writer thread, then the pipeline.

Timings take the median of ``--repeats`` runs (three times as many for 3 and 6, whose figures
are ratios of a few per cent), interleaving the peers so that drifts in the machine's speed hit
both alike. Results are printed and written to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import simulation, storage
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from pipeline.writer import BackgroundWriter

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def bare_loop(task_name: str, n: int, seed: int = 1) -> float:
    """Seconds to draw ``n`` simulations block by block, keeping nothing: the floor."""
    task = get_task(task_name)
    size = task.seed_block_size
    start = time.perf_counter()
    for block in range(n // size):
        task.simulate_block(size, np.random.default_rng([seed, block]))
    return time.perf_counter() - start


def pipeline_run(task_name: str, n: int, chunk: int, folder: Path, **options: str) -> float:
    """Seconds of ``simulation.run`` (simulate, write shards, merge) in this process."""
    out = folder / "sims.h5"
    plan = simulation.SimulationPlan(task_name, n, 1, chunk)
    start = time.perf_counter()
    simulation.run(plan, get_task(task_name), out, SerialComm(), overwrite=True, **options)
    seconds = time.perf_counter() - start
    out.unlink()
    shutil.rmtree(simulation.shard_dir(out), ignore_errors=True)
    return seconds


def throughput(repeats: int, quick: bool) -> dict[str, float]:
    counts = {"two_moons": 10**6, "gaussian_linear": 10**6, "sn_cosmology": 10**5}
    if quick:
        counts = {k: v // 10 for k, v in counts.items()}
    return {
        name: n / statistics.median(bare_loop(name, n) for _ in range(repeats))
        for name, n in counts.items()
    }


def all_cores_then_one() -> Iterator[int]:
    """Confines this process to all its cores, then to one (threads inherit the mask, so the
    shard writer is confined with the simulation); yields the number of cores; restores the
    mask when done."""
    all_cores = os.sched_getaffinity(0)
    try:
        for cores in (all_cores, {min(all_cores)}):
            os.sched_setaffinity(0, cores)
            yield len(cores)
    finally:
        os.sched_setaffinity(0, all_cores)


def overhead(repeats: int, quick: bool, folder: Path) -> list[dict[str, object]]:
    scale = 10 if quick else 1
    cases = [
        ("two_moons", 10**6 // scale, 10**5 // scale, compression, merge)
        for compression in ("gzip", "lzf", "none")
        for merge in ("copy", "virtual")
    ]
    cases.append(("sn_cosmology", 10**5 // scale, 10**4 // scale, "gzip", "copy"))
    rows = []
    for cores in all_cores_then_one():
        for task, n, chunk, compression, merge in cases:
            bare, piped = [], []
            for _ in range(repeats):
                bare.append(bare_loop(task, n))
                piped.append(
                    pipeline_run(task, n, chunk, folder, merge=merge, compression=compression)
                )
            b, p = statistics.median(bare), statistics.median(piped)
            rows.append(
                {
                    "task": task,
                    "cores": cores,
                    "compression": compression,
                    "merge": merge,
                    "n": n,
                    "chunk_size": chunk,
                    "bare_s": round(b, 3),
                    "pipeline_s": round(p, 3),
                    "overhead": round(p / b - 1, 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


def cli(ranks: int, task: str, n: int, chunk: int, out: Path, *extra: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, largest rank) of ``mpiexec -n ranks pipeline simulate``,
    confined to ``ranks`` cores."""
    command = [
        "taskset",
        "-c",
        ",".join(map(str, sorted(os.sched_getaffinity(0))[:ranks])),
        str(BIN / "mpiexec"),
        "-n",
        str(ranks),
        str(BIN / "pipeline"),
        "simulate",
        "--task",
        task,
        "--num-simulations",
        str(n),
        "--seed",
        "1",
        "--chunk-size",
        str(chunk),
        "--out",
        str(out),
        "--overwrite",
        *extra,
    ]
    # A fresh interpreter per run, so that RUSAGE_CHILDREN covers this run's processes only.
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe, *command], env=env, capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(result.stderr)
    seconds, rss = result.stdout.split()
    return float(seconds), int(rss)


# bare_loop in a fresh interpreter: argv is this folder, the task and n.
BARE_LOOP = (
    "import sys; sys.path.insert(0, sys.argv[1]); from simulate import bare_loop; "
    "print(bare_loop(sys.argv[2], int(sys.argv[3])))"
)


def bare_loops_at_once(task: str, n: int, ranks: int) -> float:
    """Seconds of the slowest of ``ranks`` bare loops of ``n`` simulations run at once, one per
    core, each in its own interpreter: what ``ranks`` cores give with nothing shared."""
    cores = sorted(os.sched_getaffinity(0))[:ranks]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loops = [
        subprocess.Popen(
            ["taskset", "-c", str(core), sys.executable, "-c", BARE_LOOP, str(HERE), task, str(n)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for core in cores
    ]
    return max(float(loop.communicate()[0]) for loop in loops)


def parallel_efficiency(repeats: int, quick: bool, folder: Path) -> list[dict[str, object]]:
    """Efficiency of ``pipeline simulate`` at 2 ranks, beside the machine's ceiling: the same
    ratio for bare loops with nothing shared (two at once on two cores against one alone)."""
    cases = [("sn_cosmology", 10**5 if quick else 5 * 10**5, 10**4)]
    cases.append(("two_moons", 10**6 if quick else 10**7, 10**5))
    rows = []
    for task, n, chunk in cases:
        one, two, alone, pair = [], [], [], []
        for _ in range(repeats):
            one.append(cli(1, task, n, chunk, folder / "a.h5")[0])
            two.append(cli(2, task, n, chunk, folder / "b.h5")[0])
            alone.append(bare_loops_at_once(task, n // 2, 1))
            pair.append(bare_loops_at_once(task, n // 2, 2))
        t1, t2 = statistics.median(one), statistics.median(two)
        rows.append(
            {
                "task": task,
                "n": n,
                "chunk_size": chunk,
                "one_rank_s": round(t1, 2),
                "two_ranks_s": round(t2, 2),
                "efficiency": round(t1 / (2 * t2), 3),
                "bare_alone_s": round(statistics.median(alone), 2),
                "bare_two_at_once_s": round(statistics.median(pair), 2),
                "ceiling": round(statistics.median(alone) / statistics.median(pair), 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def bandwidth(folder: Path, quick: bool) -> dict[str, float]:
    """MB/s of dd and of storage.write_simulations (each filter), both fsync'ed."""
    megabytes = 64 if quick else 256
    target = folder / "dd.bin"
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fdatasync"],
        check=True,
        capture_output=True,
    )
    rates = {"dd": megabytes / (time.perf_counter() - start)}
    target.unlink()
    rows = megabytes * 2**20 // (4 * 42)
    rng = np.random.default_rng(0)
    # sn_cosmology-like rows: 40 floats of x near 40 mag with 0.15 scatter, 2 of theta.
    x = (40 + 0.15 * rng.standard_normal((rows, 40))).astype(np.float32)
    theta = rng.uniform(size=(rows, 2)).astype(np.float32)
    for compression in storage.COMPRESSIONS:
        path = folder / f"{compression}.h5"
        start = time.perf_counter()
        storage.write_simulations(path, theta, x, {}, overwrite=True, compression=compression)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        rates[compression] = megabytes / (time.perf_counter() - start)
        rates[f"{compression}_file_mb"] = path.stat().st_size / 2**20
        path.unlink()
    result = {k: round(v, 1) for k, v in rates.items()}
    for compression in storage.COMPRESSIONS:
        result[f"{compression}_fraction_of_dd"] = round(rates[compression] / rates["dd"], 3)
    print(result, flush=True)
    return result


def floors(repeats: int, quick: bool, folder: Path) -> list[dict[str, object]]:
    """Where the pipeline's time over the bare loop goes, two_moons at N = 10^6 in chunks of
    10^5, each step adding one thing to the one before (interleaved, medians, paired ratios):

    - ``bare``: the bare loop (blocks drawn and discarded);
    - ``kept``: the blocks copied, as float32, into a chunk's arrays (what storing needs first);
    - ``raw_writes``: and each chunk's bytes written to a file with plain ``write`` by the
      pipeline's background writer (storage without HDF5);
    - ``pipeline``: ``simulation.run`` with ``--compression none --merge virtual``.
    """
    n, chunk = (10**5, 10**4) if quick else (10**6, 10**5)
    task = get_task("two_moons")
    plan = simulation.SimulationPlan("two_moons", n, 1, chunk)

    def kept(write: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> float:
        buffers = simulation.ChunkBuffers(task, chunk)
        start = time.perf_counter()
        with BackgroundWriter() as writer:
            for first, last in plan.chunks():
                theta, x = simulation.simulate_range(task, 1, first, last, buffers.next(chunk))
                if write is not None:
                    writer.submit(partial(write, first, theta, x))
        return time.perf_counter() - start

    def raw_write(first: int, theta: np.ndarray, x: np.ndarray) -> None:
        with open(folder / f"raw-{first}.bin", "wb") as f:
            f.write(theta)
            f.write(x)

    steps: dict[str, Callable[[], float]] = {
        "bare": lambda: bare_loop("two_moons", n),
        "kept": kept,
        "raw_writes": lambda: kept(raw_write),
        "pipeline": lambda: pipeline_run(
            "two_moons", n, chunk, folder, merge="virtual", compression="none"
        ),
    }
    rows = []
    for cores in all_cores_then_one():
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                times[name].append(step())
        bare = times["bare"]
        for name, seconds in times.items():
            ratios = [t / b for t, b in zip(seconds, bare, strict=True)]
            rows.append(
                {
                    "cores": cores,
                    "step": name,
                    "seconds": round(statistics.median(seconds), 3),
                    "overhead": round(statistics.median(ratios) - 1, 3),
                }
            )
            print(rows[-1], flush=True)
        for path in folder.glob("raw-*.bin"):
            path.unlink()
    return rows


def memory(quick: bool, folder: Path) -> list[dict[str, object]]:
    counts = (10**5, 10**6) if quick else (10**5, 10**6, 10**7)
    rows = []
    for n in counts:
        seconds, rss = cli(1, "two_moons", n, 10**5 if n > 10**5 else 10**4, folder / "m.h5")
        rows.append({"task": "two_moons", "n": n, "peak_rss_mib": round(rss / 1024, 1)})
        rows[-1]["full_arrays_mib"] = round(n * 4 * 4 / 2**20, 1)
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="disk to measure (default: a temporary one)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-simulate-", dir=args.folder))
    try:
        report = {
            "machine": {
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
            },
            "throughput_per_core": {
                k: round(v) for k, v in throughput(args.repeats, args.quick).items()
            },
            "overhead": overhead(args.repeats, args.quick, folder),
            "parallel_efficiency": parallel_efficiency(3 * args.repeats, args.quick, folder),
            "bandwidth_mb_s": bandwidth(folder, args.quick),
            "memory": memory(args.quick, folder),
            "floors": floors(3 * args.repeats, args.quick, folder),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report["throughput_per_core"]))
    RESULTS.mkdir(exist_ok=True)
    name = "simulate-quick.json" if args.quick else "simulate.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

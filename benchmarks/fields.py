"""Simulation throughput of the field-level tasks (issue: field-level cosmology).

Run from the repository root with the project's environment:

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/fields.py [--quick]

For grf_cosmology and lognormal_cosmology at 32^2 to 256^2 pixels it measures, side by side in
this one process on one core:

1. maps/s of the task's simulator (``simulate_block``: prior draw, power spectrum, FFTs, noise);
2. maps/s of its floor, the same number of bare FFT round trips of white noise (``rfft2`` then
   ``irfft2``, what any FFT-based Gaussian field generator must do; the lognormal simulator
   needs two more transforms, for the correlation function), and the ratio of the two;
3. maps/s of the whole simulate stage in this process (``simulation.run``: shards, float32
   HDF5, merge), with gzip and without compression (``simulate.compression``), and its
   overhead over the simulator.

Timings take the median of ``--repeats`` runs. There is no GPU path: maps are simulated by
NumPy on CPU ranks (``pipeline simulate`` under MPI scales them out). Results are printed and
written to ``benchmarks/results/fields.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import simulation
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task

RESULTS = Path(__file__).resolve().parent / "results"


def simulator(name: str, n: int) -> float:
    """Seconds for ``n`` maps drawn block by block (prior and simulator), keeping nothing."""
    task = get_task(name)
    size = task.seed_block_size
    start = time.perf_counter()
    for block in range(n // size):
        task.simulate_block(size, np.random.default_rng([1, block]))
    return time.perf_counter() - start


def fft_floor(pixels: int, n: int, block: int) -> float:
    """Seconds for ``n`` white-noise maps through one ``rfft2``/``irfft2`` round trip."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(n // block):
        white = rng.standard_normal((block, pixels, pixels))
        np.fft.irfft2(np.fft.rfft2(white), s=(pixels, pixels))
    return time.perf_counter() - start


def stage(name: str, n: int, folder: Path, compression: str) -> float:
    """Seconds of ``simulation.run`` for ``n`` maps in chunks of 1000 (or fewer)."""
    out = folder / f"{name}.h5"
    plan = simulation.SimulationPlan(name, n, 1, min(n, 1000))
    start = time.perf_counter()
    simulation.run(
        plan, get_task(name), out, SerialComm(), overwrite=True, compression=compression
    )
    elapsed = time.perf_counter() - start
    out.unlink()
    shutil.rmtree(simulation.shard_dir(out), ignore_errors=True)
    return elapsed


def median_of(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer maps, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pixels in (32, 64, 128, 256):
            # About 1-2 s per measurement at full size; whole seed blocks of 100 maps.
            n = 8_000_000 // pixels**2 // (10 if args.quick else 1)
            n = max(100, n - n % 100)
            floor = median_of(args.repeats, lambda p=pixels, n=n: fft_floor(p, n, 100))
            for base in ("grf_cosmology", "lognormal_cosmology"):
                name = base if pixels == 64 else f"{base}_{pixels}"
                sim = median_of(args.repeats, lambda name=name, n=n: simulator(name, n))
                runs = {
                    compression: median_of(
                        args.repeats,
                        lambda name=name, n=n, c=compression: stage(name, n, Path(tmp), c),
                    )
                    for compression in ("gzip", "none")
                }
                row = {
                    "task": name,
                    "pixels": pixels,
                    "maps": n,
                    "simulator_maps_per_s": n / sim,
                    "fft_floor_maps_per_s": n / floor,
                    "simulator_over_floor": sim / floor,
                    **{f"stage_{c}_maps_per_s": n / run for c, run in runs.items()},
                    **{f"stage_{c}_overhead": run / sim - 1 for c, run in runs.items()},
                }
                rows.append(row)
                print(
                    f"{name:26s} {pixels:4d}^2: simulator {row['simulator_maps_per_s']:9.1f} "
                    f"maps/s ({row['simulator_over_floor']:.2f}x the FFT floor's time); stage "
                    f"overhead {row['stage_gzip_overhead']:+.0%} with gzip, "
                    f"{row['stage_none_overhead']:+.0%} without compression",
                    flush=True,
                )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
        "numpy": np.__version__,
        "repeats": args.repeats,
        "quick": args.quick,
        "rows": rows,
    }
    path = RESULTS / ("fields-quick.json" if args.quick else "fields.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()

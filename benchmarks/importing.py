"""Importing existing arrays: `pipeline import` against a plain ``np.load`` + one ``h5py`` write.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/importing.py --rows 1000000 --repeats 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/importing.py --rows 10000000 --repeats 2 \
        --repeats-gzip 1

For each row count N, ``theta.npy`` (N, 3) and ``x.npy`` (N, 100) of float32 normal deviates are
written once to a scratch folder. Each run is a fresh interpreter that imports them into an HDF5
file and reports its time (the work alone, without the interpreter's start and imports) and its
peak resident memory (``VmHWM``), so that no run inherits another's pages:

- ours: :func:`pipeline.importing.import_simulations` (default blocks of about 64 MiB, SHA-256 of
  both files included);
- the peer: ``np.load`` of both arrays, then one ``h5py`` ``create_dataset(data=...)`` each, with
  the same chunks and filter as ours.

Ours and the peer alternate (ours first in even repeats, the peer first in odd ones) on the same
files; the outputs are deleted after each run, the scratch folder at the end. ``--peer-once
ROWS`` runs the peer only once at those row counts (it holds the whole file in memory).
Results are merged into ``benchmarks/results/importing.json`` (one entry per row count).
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
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.importing import file_sha256
from pipeline.provenance import hardware, software_versions

RESULTS = Path(__file__).resolve().parent / "results" / "importing.json"
DIM_THETA, DIM_X = 3, 100

# Runs in a fresh interpreter: argv = which, theta, x, out, compression.
RUN = """
import sys, time, json
which, theta_path, x_path, out, compression = sys.argv[1:]
import h5py, numpy as np
from pipeline import storage
from pipeline.importing import import_simulations
from pipeline.tasks.two_moons import TwoMoons

class Archive(TwoMoons):
    name = "archive"
    parameter_names = ("a", "b", "c")
    parameter_units = ("", "", "")
    x_shape = (100,)

def peer():
    theta, x = np.load(theta_path), np.load(x_path)
    with h5py.File(out, "w") as f:
        for name, data in (("theta", theta), ("x", x)):
            rows = storage.chunk_rows(len(data), data.shape[1:])
            f.create_dataset(
                name, data=data, chunks=(rows, *data.shape[1:]),
                **storage.COMPRESSIONS[compression],
            )

def ours():
    import_simulations(Archive(), theta_path, x_path, out, compression=compression)

def mmap_blocks():
    # Only reads x through a memory map, block by block: what the pages read cost in RSS.
    x = np.load(x_path, mmap_mode="r")
    for start in range(0, len(x), 167_000):
        np.asarray(x[start : start + 167_000], dtype=np.float32).sum()

def peak_rss_mb():
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (Linux keeps
    # it across exec), while VmHWM belongs to this process's own address space.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

baseline = peak_rss_mb()
start = time.perf_counter()
{"peer": peer, "ours": ours, "mmap_blocks": mmap_blocks}[which]()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline}))
"""


def make_arrays(folder: Path, rows: int) -> tuple[Path, Path]:
    """Writes ``theta.npy`` (rows, 3) and ``x.npy`` (rows, 100), float32, in blocks."""
    rng = np.random.default_rng(0)
    paths = folder / "theta.npy", folder / "x.npy"
    for path, dim in zip(paths, (DIM_THETA, DIM_X), strict=True):
        array = np.lib.format.open_memmap(path, "w+", np.float32, (rows, dim))
        for start in range(0, rows, 10**6):
            stop = min(start + 10**6, rows)
            array[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        array.flush()
        del array
    # Runs would otherwise compete with the write-back of these files' dirty pages (the first
    # uncompressed run at 10^7 rows took 3-5 times as long as the next).
    os.sync()
    return paths


def run(which: str, theta: Path, x: Path, out: Path, compression: str) -> dict[str, float]:
    """One run of ``which`` in a fresh interpreter; its output is deleted afterwards."""
    command = [sys.executable, "-c", RUN, which, str(theta), str(x), str(out), compression]
    done = subprocess.run(command, capture_output=True, text=True)
    out.unlink(missing_ok=True)
    if done.returncode:
        raise RuntimeError(f"{which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(
    rows: int, compression: str, repeats: int, folder: Path, theta: Path, x: Path
) -> dict[str, Any]:
    """Ours and the peer, alternating, ``repeats`` times each (the peer possibly once)."""
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "peer": []}
    for repeat in range(repeats):
        order = ("ours", "peer") if repeat % 2 == 0 else ("peer", "ours")
        for which in order:
            if which == "peer" and runs["peer"] and rows in ARGS.peer_once:
                continue
            result = run(which, theta, x, folder / f"{which}.h5", compression)
            runs[which].append(result)
            print(f"  {which:5s} {rows:>9d} rows {compression:5s}: {result}", flush=True)
    summary = {
        which: {
            "seconds_median": statistics.median(r["seconds"] for r in results),
            "rows_per_second": rows / statistics.median(r["seconds"] for r in results),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in results),
            "baseline_mb": statistics.median(r["baseline_mb"] for r in results),
            "runs": results,
        }
        for which, results in runs.items()
    }
    summary["ratio_ours_over_peer_rows_per_second"] = (
        summary["ours"]["rows_per_second"] / summary["peer"]["rows_per_second"]
    )
    return summary


def main() -> None:
    # Earlier cases are kept: runs may be split (e.g. one per row count).
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results: dict[str, Any] = {
        "machine": hardware(),
        "platform": platform.platform(),
        "versions": software_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "commands": [*earlier.get("commands", []), " ".join(sys.argv)],
        "cases": earlier.get("cases", {}),
    }
    scratch = Path(tempfile.mkdtemp(prefix="import-bench-", dir=ARGS.scratch))
    try:
        for rows in ARGS.rows:
            theta, x = make_arrays(scratch, rows)
            start = time.perf_counter()
            file_sha256(x)
            sha_rate = x.stat().st_size / (time.perf_counter() - start) / 1e6
            size = x.stat().st_size / 1e9
            print(f"{rows} rows: x.npy {size:.2f} GB, SHA-256 {sha_rate:.0f} MB/s", flush=True)
            cases = results["cases"].setdefault(str(rows), {})
            cases["sha256_mb_per_s"] = sha_rate
            cases["mmap_blocks"] = run("mmap_blocks", theta, x, scratch / "m.h5", "none")
            for compression in ARGS.compressions:
                repeats = ARGS.repeats_gzip if compression == "gzip" else ARGS.repeats
                cases[compression] = measure(rows, compression, repeats, scratch, theta, x)
            theta.unlink()
            x.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    columns = "rows, filter, ours rows/s, peer rows/s, ours/peer, ours peak RSS, peer peak RSS"
    print("| " + " | ".join(columns.split(", ")) + " |")
    print("|---|---|---|---|---|---|---|")
    for rows, cases in results["cases"].items():
        for compression in ("none", "lzf", "gzip"):
            case = cases.get(compression)
            if case is None:
                continue
            ours, peer = case["ours"], case["peer"]
            ratio = case["ratio_ours_over_peer_rows_per_second"]
            print(
                f"| {int(rows):.0e} | {compression} | {ours['rows_per_second']:.3g} | "
                f"{peer['rows_per_second']:.3g} | {ratio:.2f} | "
                f"{ours['peak_rss_mb_max']:.0f} MB | {peer['peak_rss_mb_max']:.0f} MB |"
            )
        print(f"mmap_blocks at {rows}: {cases['mmap_blocks']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10**6, 10**7])
    parser.add_argument("--compressions", nargs="+", default=["none", "gzip"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-gzip", type=int, default=3, help="repeats with gzip")
    parser.add_argument("--peer-once", type=int, nargs="*", default=[], metavar="ROWS")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the big files")
    ARGS = parser.parse_args()
    main()

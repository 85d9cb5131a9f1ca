"""Scheduling overhead: the tiny DAG under SLURM (sbatch per job) against the same DAG run locally.

Starts the one-node test cluster of tests/slurm_cluster.py (root; installs slurm-wlm and munge
when absent), runs `config/experiments/tiny.yaml` (3 tasks, 25 jobs) with the local profile and
with workflow/profiles/slurm sized for this machine, in fresh copies of the workflow, and
reports both wall times and their ratio.

    .venv/bin/python benchmarks/slurm.py [--out benchmarks/results/slurm.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import copy_workflow, run_snakemake  # noqa: E402
from tests.slurm_cluster import SlurmCluster  # noqa: E402

from pipeline.provenance import hardware  # noqa: E402


def slurm_profile(workdir: Path) -> Path:
    """The shipped profile with this machine's sizes (no time-limit games: pure overhead)."""
    profile = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
    profile["default-resources"] |= {"mem_mb": 500, "runtime": 10}
    simulate = profile["set-resources"]["simulate"]
    profile["set-resources"] = {"simulate": {**simulate, "tasks": 2, "mem_mb": 500}}
    profile["set-threads"] = {"train": 1}
    profile |= {"slurm-no-account": True, "slurm-status-command": "squeue"}
    folder = workdir / "bench-profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def timed(workdir: Path, *args: str, **kwargs) -> float:
    start = time.monotonic()
    run_snakemake(workdir, "--configfile", "config/experiments/tiny.yaml", *args, **kwargs)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/slurm.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        for name in ("cluster", "local", "slurm"):
            (base / name).mkdir()
        local, slurm = copy_workflow(base / "local"), copy_workflow(base / "slurm")
        cluster = SlurmCluster(base / "cluster")
        cluster.start()
        try:
            local_seconds = timed(local, "--cores", "2")
            slurm_seconds = timed(slurm, profile=slurm_profile(slurm))
            jobs = [job for job in cluster.jobs() if Path(job["workdir"]) == slurm]
        finally:
            cluster.stop()
    result = {
        "dag": "config/experiments/tiny.yaml (3 tasks)",
        "sbatch_jobs": len(jobs),
        "local_seconds": round(local_seconds, 1),
        "slurm_seconds": round(slurm_seconds, 1),
        "ratio": round(slurm_seconds / local_seconds, 2),
        "overhead_seconds_per_job": round((slurm_seconds - local_seconds) / len(jobs), 1),
        "machine": hardware(),
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

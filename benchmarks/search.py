"""What a hyperparameter search costs, and its speed-up from running trials at once.

The same search (two_moons, 8 trials proposed 2 at a time, small flows) runs three ways in fresh
copies of the workflow, its simulations made beforehand so that only the search is timed:
locally with ``--cores 1`` (one trial at a time, the peer), locally with ``--cores 2`` (two at
once), and as sbatch jobs on the one-node test cluster of tests/slurm_cluster.py (root; installs
slurm-wlm and munge when absent; ``--no-slurm`` skips it). Reports wall times, their ratios to
the one-core run, the trials' summed training time, and checks that all three chose the same
trial with the same options (the proposals depend on the earlier generations' scores only).

    .venv/bin/python benchmarks/search.py [--out benchmarks/results/search.json] [--no-slurm]
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

TRIALS = 8
CONFIG = {
    "experiment": "search-bench",
    "tasks": ["two_moons"],
    "simulate": {"num_simulations": 4000, "num_test_simulations": 100, "chunk_size": 2000},
    "observations": {"num_observations": 1, "num_reference_samples": 100},
    "task_train": {"two_moons": {"max_epochs": 60, "patience": 60, "ensemble": 1}},
    "search": {
        "tasks": ["two_moons"],
        "trials": TRIALS,
        "parallel": 2,
        "startup": 4,
        "held_out": 400,
        "space": {
            "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
            "flow_hidden": {"choices": [[32, 32], [64, 64]]},
            "transforms": {"low": 1, "high": 3},
        },
    },
}
SEARCH = "results/search-bench/two_moons/search"


def slurm_profile(workdir: Path) -> Path:
    """The shipped profile with this machine's sizes: one CPU per trial, no GPU."""
    profile = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
    profile["default-resources"] |= {"mem_mb": 500, "runtime": 30}
    simulate = profile["set-resources"]["simulate"]
    profile["set-resources"] = {
        "simulate": {**simulate, "tasks": 2, "mem_mb": 500},
        "search_trial": {"mem_mb": 1000},
    }
    profile["set-threads"] = {"train": 1, "search_trial": 1}
    profile |= {"slurm-no-account": True, "slurm-status-command": "squeue"}
    folder = workdir / "bench-profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def timed_search(workdir: Path, *args: str, **kwargs) -> dict[str, object]:
    """Simulates (untimed), then times the search alone; returns its wall time and choice."""
    config = workdir / "bench.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    sims = "results/search-bench/two_moons/sims/train.h5"
    run_snakemake(workdir, sims, "--cores", "2", "--configfile", str(config))
    start = time.monotonic()
    run_snakemake(workdir, f"{SEARCH}/best.json", *args, "--configfile", str(config), **kwargs)
    seconds = time.monotonic() - start
    choice = json.loads((workdir / SEARCH / "best.json").read_text())
    train = sum(row["train_seconds"] or 0 for row in choice["trials"])
    return {
        "seconds": round(seconds, 1),
        "trials_train_seconds": round(train, 1),
        "chosen": choice["chosen"],
        "options": choice["options"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/search.json")
    parser.add_argument("--no-slurm", action="store_true", help="skip the SLURM run")
    args = parser.parse_args()
    runs: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        for name in ("one_core", "two_cores", "slurm", "cluster"):
            (base / name).mkdir()
        runs["one_core"] = timed_search(copy_workflow(base / "one_core"), "--cores", "1")
        runs["two_cores"] = timed_search(copy_workflow(base / "two_cores"), "--cores", "2")
        if not args.no_slurm:
            cluster = SlurmCluster(base / "cluster")
            cluster.start()
            try:
                slurm = copy_workflow(base / "slurm")
                runs["slurm"] = timed_search(slurm, profile=slurm_profile(slurm))
            finally:
                cluster.stop()
    peer = runs["one_core"]["seconds"]
    result = {
        "search": f"two_moons, {TRIALS} trials, 2 per generation, 4000 simulations",
        "runs": runs,
        "speed_up_over_one_core": {
            name: round(peer / run["seconds"], 2) for name, run in runs.items()
        },
        "same_choice": len({json.dumps([r["chosen"], r["options"]]) for r in runs.values()}) == 1,
        "machine": hardware(),
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

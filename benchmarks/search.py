"""What a hyperparameter search costs, and its speed-up from running trials at once.

The same search (by default two_moons, 8 trials proposed 2 at a time, small flows; or the
searches of an experiment file, e.g. config/experiments/search.yaml) runs up to three ways in
fresh copies of the workflow, its simulations made beforehand so that only the search is timed:
locally with ``--cores 1`` (one trial at a time, the peer), locally with ``--cores 2`` (two at
once), and as sbatch jobs on the one-node test cluster of tests/slurm_cluster.py (root; installs
slurm-wlm and munge when absent). Reports wall times, their ratios to the first run, the trials'
summed training time, and checks that all runs chose the same trials with the same options (the
proposals depend on the earlier generations' scores only).

    .venv/bin/python benchmarks/search.py [--out benchmarks/results/search.json]
        [--experiment FILE [--tasks TASK ...]] [--runs one_core two_cores slurm]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import copy_workflow, run_snakemake  # noqa: E402
from tests.slurm_cluster import SlurmCluster  # noqa: E402

from pipeline.provenance import hardware  # noqa: E402

TRIALS = 8
RUNS = {"one_core": "1", "two_cores": "2", "slurm": ""}
TIMEOUT = 6 * 3600  # a full search of 20 trials takes about an hour
CONFIG = {
    "experiment": "search-bench",
    "tasks": ["two_moons"],
    "simulate": {"num_simulations": 4000, "num_test_simulations": 100, "chunk_size": 2000},
    "observations": {"num_observations": 1, "num_reference_samples": 100},
    # config.yaml's two_moons block (an experiment's block replaces it), shorter, one flow.
    "task_train": {
        "two_moons": {
            **yaml.safe_load((ROOT / "config/config.yaml").read_text())["task_train"]["two_moons"],
            "max_epochs": 60,
            "patience": 60,
            "ensemble": 1,
        }
    },
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


def experiment(path: Path | None, tasks: list[str] | None) -> dict[str, Any]:
    """The benchmark's config: the small built-in search, or ``path`` limited to ``tasks``."""
    config = CONFIG if path is None else yaml.safe_load(path.read_text())
    if tasks:
        config = {**config, "tasks": tasks, "search": {**config["search"], "tasks": tasks}}
    return config


def timed_search(workdir: Path, config: dict[str, Any], *args: str, **kwargs) -> dict[str, Any]:
    """Simulates (untimed), then times the searches alone; returns the wall time and, per
    task, the trials' summed training time and the choice."""
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    root = f"results/{config['experiment']}"
    tasks = config["search"]["tasks"]
    sims = [f"{root}/{task}/sims/train.h5" for task in tasks]
    run_snakemake(workdir, *sims, "--cores", "2", "--configfile", str(path), timeout=TIMEOUT)
    best = [f"{root}/{task}/search/best.json" for task in tasks]
    start = time.monotonic()
    run_snakemake(workdir, *best, *args, "--configfile", str(path), timeout=TIMEOUT, **kwargs)
    seconds = time.monotonic() - start
    choices = {}
    for task, file in zip(tasks, best, strict=True):
        choice = json.loads((workdir / file).read_text())
        choices[task] = {
            "trials_train_seconds": round(
                sum(r["train_seconds"] or 0 for r in choice["trials"]), 1
            ),
            "chosen": choice["chosen"],
            "options": choice["options"],
            "losses": [r["loss"] for r in choice["trials"]],
        }
    return {"seconds": round(seconds, 1), "tasks": choices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/search.json")
    parser.add_argument(
        "--experiment",
        type=Path,
        help="a config file with a search (default: the small built-in one)",
    )
    parser.add_argument("--tasks", nargs="+", help="search only these of its tasks")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    args = parser.parse_args()
    config = experiment(args.experiment, args.tasks)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        for name in args.runs:
            (base / name).mkdir()
            workdir = copy_workflow(base / name)
            if name != "slurm":
                runs[name] = timed_search(workdir, config, "--cores", RUNS[name])
                continue
            cluster = SlurmCluster(base / "cluster")
            cluster.start()
            try:
                runs[name] = timed_search(workdir, config, profile=slurm_profile(workdir))
            finally:
                cluster.stop()
    peer = runs[args.runs[0]]["seconds"]
    search = config["search"]
    result = {
        "search": f"{', '.join(search['tasks'])}: {search['trials']} trials, "
        f"{search['parallel']} per generation",
        "experiment": str(args.experiment or "built in"),
        "runs": runs,
        f"speed_up_over_{args.runs[0]}": {
            name: round(peer / run["seconds"], 2) for name, run in runs.items()
        },
        "same_trials_and_choice": len(
            {json.dumps(run["tasks"], sort_keys=True) for run in runs.values()}
        )
        == 1,
        "machine": hardware(),
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

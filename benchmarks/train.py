"""Benchmark of the train stage against its peer, the ``sbi`` package's NPE (issue: distributed
training). Needs ``sbi`` beside the project (``pip install -e ".[bench]"``).

    .venv/bin/python benchmarks/train.py [--repeats 3]

Both estimators learn ``two_moons`` from the same 10^4 simulations (written by ``pipeline
simulate``), each with its own default settings (ours: ``config/config.yaml``'s two_moons
options; sbi: ``NPE(prior)``, i.e. a MAF, batches of 200, Adam at 5e-4, stop after 20 epochs
without improvement), on one CPU thread each, in this one process, alternating. Both are then
scored by the same number: the mean negative log-density of 10^4 fresh simulations
(``theta`` under ``q(theta | x)``), which is the validation loss both minimise, on data neither
saw. Results go to ``benchmarks/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import simulation, storage
from pipeline.models.posterior import load_posterior
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from pipeline.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def project_config(task: str, seed: int) -> TrainConfig:
    """The training options the default experiment uses for ``task``."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    options = {**config.get("train", {}), **config.get("task_train", {}).get(task, {})}
    return TrainConfig.from_dict({**options, "seed": seed})


def simulate(task: str, n: int, seed: int, out: Path) -> storage.Simulations:
    plan = simulation.SimulationPlan(task, n, seed, min(n, 10**4))
    simulation.run(plan, get_task(task), out, SerialComm(), overwrite=True)
    return storage.read_simulations(out)


def ours(data: Path, folder: Path, seed: int, test: storage.Simulations) -> dict[str, float]:
    start = time.perf_counter()
    metadata = train(data, folder, project_config("two_moons", seed))
    seconds = time.perf_counter() - start
    posterior, _ = load_posterior(folder)
    with torch.no_grad():
        log_q = posterior.log_prob(torch.from_numpy(test.theta), torch.from_numpy(test.x))
    return {"seconds": seconds, "test_nll": -float(log_q.mean()), "epochs": metadata["epochs"]}


def peer(sims: storage.Simulations, seed: int, test: storage.Simulations) -> dict[str, float]:
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    torch.manual_seed(seed)
    prior = BoxUniform(-torch.ones(2), torch.ones(2))
    start = time.perf_counter()
    inference = NPE(prior=prior, show_progress_bars=False)
    estimator = inference.append_simulations(
        torch.from_numpy(sims.theta), torch.from_numpy(sims.x)
    ).train()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        log_q = estimator.log_prob(torch.from_numpy(test.theta), torch.from_numpy(test.x))
    epochs = inference.summary["epochs_trained"][-1]
    return {"seconds": seconds, "test_nll": -float(log_q.mean()), "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="seeds per estimator")
    parser.add_argument("--num-simulations", type=int, default=10**4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = folder / "train.h5"
        sims = simulate("two_moons", args.num_simulations, 1, data)
        test = simulate("two_moons", 10**4, 2, folder / "test.h5")
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "sbi": []}
        for seed in range(args.repeats):
            runs["ours"].append(ours(data, folder / f"ours-{seed}", seed, test))
            print("ours", runs["ours"][-1], flush=True)
            runs["sbi"].append(peer(sims, seed, test))
            print("sbi ", runs["sbi"][-1], flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary = {
        name: {
            key: round(statistics.median(run[key] for run in results), 4)
            for key in ("seconds", "test_nll", "epochs")
        }
        for name, results in runs.items()
    }
    summary["speedup"] = round(summary["sbi"]["seconds"] / summary["ours"]["seconds"], 2)
    report = {
        "machine": {
            "host": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "task": "two_moons",
        "num_simulations": args.num_simulations,
        "threads": 1,
        "median": summary,
        "runs": runs,
    }
    print(json.dumps(summary))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

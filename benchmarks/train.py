"""Benchmark of the train stage against its peer, the ``sbi`` package's NPE (issue: distributed
training). Needs ``sbi`` beside the project (``pip install -e ".[bench]"``).

    .venv/bin/python benchmarks/train.py [--repeats 3]

Both estimators learn ``two_moons`` from the same 10^4 simulations (written by ``pipeline
simulate``), each with its own default settings (ours: ``config/config.yaml``'s two_moons
options; sbi: ``NPE(prior)``, i.e. a MAF, batches of 200, Adam at 5e-4, stop after 20 epochs
without improvement), on one CPU thread each, in this one process, alternating. Both are
scored by the same number: the mean negative log-density of 10^4 fresh simulations
(``theta`` under ``q(theta | x)``), the loss both minimise, on data neither saw.

Two comparisons: whole runs (each until its own early stopping), and the time our training
takes to first reach the peer's final test loss (scored after every epoch by a callback whose
own time is not counted). Results go to ``benchmarks/results/train.json``.
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
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback

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


class TestLoss(Callback):
    """Scores the posterior on the test set after every epoch: (training seconds, test NLL)."""

    def __init__(self, test: storage.Simulations) -> None:
        self.theta, self.x = torch.from_numpy(test.theta), torch.from_numpy(test.x)
        self.curve: list[tuple[float, float]] = []
        self.scoring = 0.0  # seconds spent here, taken off the training time

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        begin = time.perf_counter()
        with torch.no_grad():
            nll = -float(module.posterior.log_prob(self.theta, self.x).mean())
        self.curve.append((round(begin - self.start - self.scoring, 3), round(nll, 4)))
        self.scoring += time.perf_counter() - begin


def ours(data: Path, folder: Path, seed: int, test: storage.Simulations) -> dict[str, Any]:
    scores = TestLoss(test)
    start = time.perf_counter()
    metadata = train(data, folder, project_config("two_moons", seed), callbacks=[scores])
    seconds = time.perf_counter() - start - scores.scoring
    posterior, _ = load_posterior(folder)
    with torch.no_grad():
        log_q = posterior.log_prob(torch.from_numpy(test.theta), torch.from_numpy(test.x))
    return {
        "seconds": seconds,
        "test_nll": -float(log_q.mean()),
        "epochs": metadata["epochs"],
        # Setup before the first epoch (data, model, Trainer) counts towards reaching a loss.
        "setup_seconds": seconds - scores.curve[-1][0],
        "curve": scores.curve,
    }


def seconds_to_reach(run: dict[str, Any], target: float) -> float | None:
    """Wall seconds (setup included) until the run's test NLL first is at most ``target``."""
    for seconds, nll in run["curve"]:
        if nll <= target:
            return run["setup_seconds"] + seconds
    return None


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
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "sbi": []}
        for seed in range(args.repeats):
            runs["ours"].append(ours(data, folder / f"ours-{seed}", seed, test))
            print("ours", {k: v for k, v in runs["ours"][-1].items() if k != "curve"}, flush=True)
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
    summary["speedup_whole_runs"] = round(
        summary["sbi"]["seconds"] / summary["ours"]["seconds"], 2
    )
    # Per seed: how long ours took to reach that seed's peer's final test loss.
    reach = [
        seconds_to_reach(mine, peer_run["test_nll"])
        for mine, peer_run in zip(runs["ours"], runs["sbi"], strict=True)
    ]
    summary["seconds_to_reach_peer_loss"] = reach
    summary["speedup_to_peer_loss"] = [
        None if r is None else round(peer_run["seconds"] / r, 2)
        for r, peer_run in zip(reach, runs["sbi"], strict=True)
    ]
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

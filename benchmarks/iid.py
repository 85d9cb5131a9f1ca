"""Independent observations combined by a neural likelihood: ``pipeline sample --iid`` against the
exact posterior of ``gaussian_linear`` given ``n`` independent observations of one ``theta``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/iid.py --counts 1 5 20 --trials 3

Trains NLE (:data:`OPTIONS`) on the first 10^4 training simulations of seed 1 (the default
experiment's), then for each count ``n`` and trial ``k``: ``theta* ~ prior`` and ``n`` draws
``x_i ~ N(theta*, 0.1 I)`` (seed ``(7, n, k)``), 10^4 posterior samples from the product of the
learned likelihoods and the prior (the sample stage's ensemble settings), and C2ST (validate's
settings: 5 folds, seed 5) against 10^4 draws of the exact conjugate posterior
``N(m, s^2 I)``, ``1 / s^2 = 1 / 0.1 + n / 0.1``, ``m = s^2 sum_i x_i / 0.1``. An NPE posterior
cannot be asked this without retraining on ``n``-observation data sets. Results go to
``benchmarks/results/iid.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import simulation
from pipeline.diagnostics import c2st_batched
from pipeline.models.posterior import load_posterior
from pipeline.parallel import SerialComm
from pipeline.sampling import sample_posterior
from pipeline.tasks import get_task
from pipeline.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "iid.json"
NUM_SAMPLES = 10**4
# gaussian_linear's block of config/experiments/nle.yaml, read so the two cannot drift apart.
NLE_EXPERIMENT = Path(__file__).resolve().parents[1] / "config/experiments/nle.yaml"
OPTIONS = yaml.safe_load(NLE_EXPERIMENT.read_text())["task_train"]["gaussian_linear"]


def exact_posterior(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``NUM_SAMPLES`` draws of gaussian_linear's posterior given the rows of ``x`` (n, 10)."""
    task = get_task("gaussian_linear")
    precision = 1 / task.prior_variance + len(x) / task.noise_variance
    mean = x.sum(0) / task.noise_variance / precision
    return mean + rng.normal(size=(NUM_SAMPLES, x.shape[1])) / np.sqrt(precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--model", type=Path, help="an NLE model of gaussian_linear to reuse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task("gaussian_linear")
    model = args.model
    train_seconds = None
    if model is None:
        folder = Path(tempfile.mkdtemp(prefix="bench-iid-"))
        data = folder / "train.h5"
        plan = simulation.SimulationPlan("gaussian_linear", 10**4, 1, 10**4)
        simulation.run(plan, task, data, SerialComm(), overwrite=True)
        start = time.perf_counter()
        train(data, folder / "model", TrainConfig.from_dict(OPTIONS))
        train_seconds = time.perf_counter() - start
        model = folder / "model"
    posterior, document = load_posterior(model)
    entries = []
    for count in args.counts:
        for trial in range(args.trials):
            rng = np.random.default_rng([7, count, trial])
            theta = task.prior.sample(1, rng)
            x = task.simulate(np.repeat(theta, count, axis=0), rng).astype(np.float32)
            torch.manual_seed(trial)
            start = time.perf_counter()
            result = sample_posterior(posterior, x, NUM_SAMPLES, iid=True)
            seconds = time.perf_counter() - start
            exact = exact_posterior(x.astype(np.float64), rng)
            score = float(c2st_batched(exact[None], result.samples, seed=5, num_folds=5)[0])
            entry = {
                "count": count,
                "trial": trial,
                "c2st": round(score, 4),
                "rhat": round(float(result.mcmc["rhat"][0]), 4),
                "ess": round(float(result.mcmc["ess"][0])),
                "sample_seconds": round(seconds, 1),
            }
            print(entry, flush=True)
            entries.append(entry)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"processor": platform.processor() or platform.machine()},
                "model": {"options": document["train_config"], "train_seconds": train_seconds},
                "threads": 1,
                "entries": entries,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

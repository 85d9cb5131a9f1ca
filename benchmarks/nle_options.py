"""NLE's training options on one task: C2ST at the five reference observations for each set of
options, on a pipeline run's training file and observations.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nle_options.py results/nle bernoulli_glm \
        '{"ensemble": 4}' '{"weight_decay": 0.01}'

Each JSON argument is laid over :data:`BASE` (a MAF of 5 transforms, the experiment's other
defaults); the posterior is sampled with the sample stage's default ensemble settings (10^4
samples per observation, torch seed 0) and scored as validate does (C2ST, 5 folds, seed 5).
One line of JSON per set of options on stdout.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peer import score  # benchmarks/peer.py, beside this script

from pipeline.models.flows import MIXTURES
from pipeline.models.posterior import load_posterior
from pipeline.observations import read_reference
from pipeline.sampling import sample_posterior
from pipeline.training import TrainConfig, train

BASE = {"method": "nle", "flow": "maf", "transforms": 5}


def main() -> None:
    experiment, task, *variants = sys.argv[1:]
    folder = Path(experiment) / task
    _, x_obs, reference = read_reference(folder / "observations.h5")
    for variant in variants:
        options = {**BASE, **json.loads(variant)}
        if options["flow"] in MIXTURES:  # a mixture density network has no transforms
            options.pop("transforms")
        out = Path(tempfile.mkdtemp(prefix="nle-options-")) / "model"
        start = time.perf_counter()
        metadata = train(folder / "sims" / "train.h5", out, TrainConfig.from_dict(options))
        train_seconds = time.perf_counter() - start
        posterior, _ = load_posterior(out)
        torch.manual_seed(0)
        start = time.perf_counter()
        result = sample_posterior(posterior, x_obs, 10**4)
        sample_seconds = time.perf_counter() - start
        # Scored as validate scores (5 folds, seed 5); observations whose chains did not
        # converge are not sampled (NaN rows) and score None.
        scores = score(reference, result.samples, {"seed": 5, "c2st_folds": 5})
        line = {
            "options": options,
            "c2st": scores["c2st"],
            "mean": scores["c2st_mean"],
            "epochs": metadata["epochs"],
            "train_seconds": round(train_seconds),
            "sample_seconds": round(sample_seconds),
            "converged": bool(result.mcmc["converged"].all()),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

"""A rounds region's test of many rows: members evaluated one at a time and rows decided early
(``TruncatedPrior.depth``) against the whole mixture's density at every level (``log_q``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/region.py results/rounds_slcp_obs0 slcp

On a finished rounds run's files (the last round's region, its levels' posteriors, the test
simulations): 10^5 prior draws (what truncate's prior mass and a round's rejection sampling
test) and, for NPE and FMPE, 10^5 draws of the final posterior at 200 test simulations (what
the test set's restricted sampling and NPE's normalised loss test). One thread; the two side by
side in one process, each timed once after a warm-up; prints the seconds, their ratio and how
many rows the two verdicts disagree on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.models.posterior import load_posterior
from pipeline.rounds.region import TruncatedPrior, load_region
from pipeline.tasks import get_task


def depth_by_mixture(region: TruncatedPrior, theta: np.ndarray) -> np.ndarray:
    """``depth`` with every level's mixture density evaluated in full on the rows kept."""
    inside = np.isfinite(region.prior.log_prob(theta))
    depth = np.where(inside, 0, -1)
    for level, bound in enumerate(region.truncation.levels):
        inside[inside] = region.log_q(theta[inside], level) >= bound["threshold"]
        depth[inside] += 1
    return depth


def main() -> None:
    run, task_name = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    folder = run / task_name
    rounds = sorted((folder / "rounds").glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    models = [path / "model" for path in rounds]
    region = load_region(rounds[-1] / "truncation.json", models, get_task(task_name).prior)
    final, _ = load_posterior(folder / "model")
    with h5py.File(folder / "sims" / "test.h5", "r") as f:
        x = torch.as_tensor(f["x"][:200], dtype=torch.float32)
    sets = {"prior draws": region.prior.sample(10**5, np.random.default_rng(0))}
    if not final.is_likelihood:  # NLE's posterior draws need MCMC: prior draws only
        torch.manual_seed(0)
        with torch.no_grad():
            drawn = final.sample(x, 500).reshape(-1, len(final.spec.parameter_names))
        sets["posterior draws at test simulations"] = drawn.numpy().astype(np.float64)
    print(f"{task_name}: {len(region.truncation.levels)} levels, {len(final.members)} members")
    for name, theta in sets.items():
        region.depth(theta[:1000])  # warm-up
        start = time.perf_counter()
        early = region.depth(theta)
        early_seconds = time.perf_counter() - start
        start = time.perf_counter()
        full = depth_by_mixture(region, theta)
        full_seconds = time.perf_counter() - start
        inside = np.mean(early == len(region.truncation.levels))
        ratio = full_seconds / early_seconds
        print(
            f"{name}: {len(theta)} rows ({inside:.1%} inside), mixture {full_seconds:.2f} s, "
            f"members one at a time {early_seconds:.2f} s, ratio {ratio:.2f}, verdicts "
            f"differing {int(np.sum(early != full))}"
        )


if __name__ == "__main__":
    main()

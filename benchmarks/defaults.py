"""Global defaults across tasks: C2ST of our NPE trained with one set of options for every task
(no per-task overrides), on the data, observations and references of ``benchmarks/peer.py``
(issue 26: defaults that hold on unseen tasks).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/defaults.py \
        --options benchmarks/defaults/candidate_a.yaml \
        --tasks two_moons slcp bernoulli_glm sn_cosmology gaussian_mixture gaussian_linear \
        --budgets 10000

``--options`` is a flat mapping of ``TrainConfig`` fields (``src/pipeline/training.py``); every
field it leaves out keeps the dataclass default, so ``config/config.yaml`` plays no part but for
the simulation, observation and validation settings. For every task and budget N, as in
``peer.py``: the first N simulations of seed 1, the five observations of seed 3 with their
reference posteriors, 10^4 posterior samples each and C2ST with the validate stage's settings.
Simulations and observations are kept in ``--cache`` (they depend on neither the candidate nor
the training seed), so later candidates reuse them. One CPU thread. Results are merged into
``benchmarks/results/defaults.json``, keyed by candidate (the options file's stem), task and
budget; ``--seed K`` (K > 0) adds a training seed's figures to that entry's ``replicates``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (benchmarks/peer.py: data, training, sampling and scoring)

from pipeline import diagnostics, simulation, storage  # noqa: E402
from pipeline.models.posterior import load_posterior  # noqa: E402
from pipeline.observations import make_observations, read_reference  # noqa: E402
from pipeline.parallel import SerialComm  # noqa: E402
from pipeline.sampling import log_prob_of, sample_posterior  # noqa: E402
from pipeline.tasks import get_task  # noqa: E402
from pipeline.training import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "defaults.json"
CACHE = Path(tempfile.gettempdir()) / "bench-defaults-cache"


def inputs(name: str, budget: int, cache: Path) -> tuple[Path, Path]:
    """The training file and observations of ``name`` at ``budget``, made once into ``cache``."""
    settings = peer.pipeline_settings()
    cache.mkdir(parents=True, exist_ok=True)
    task = get_task(name)
    observations = cache / f"{name}-observations.h5"
    if not observations.exists():
        observed = settings["observations"]
        start = time.perf_counter()
        make_observations(
            task,
            observed["num_observations"],
            observed["num_reference_samples"],
            observed["seed"],
            observations,
        )
        print(f"{name}: reference posteriors in {time.perf_counter() - start:.1f} s", flush=True)
    data = cache / f"{name}-{budget}.h5"
    if not data.exists():
        seed = settings["simulate"]["seed"]
        plan = simulation.SimulationPlan(name, budget, seed, min(budget, 10**4))
        simulation.run(plan, task, data, SerialComm(), overwrite=True)
    return data, observations


def measure(
    name: str, budget: int, options: dict[str, Any], seed: int, cache: Path, num_test: int
) -> dict[str, Any]:
    """Trains with ``options`` on ``name``'s first ``budget`` simulations and scores it: C2ST
    at the observations and, with ``num_test``, coverage on that many test simulations."""
    data, observations = inputs(name, budget, cache)
    _, x_obs, reference = read_reference(observations)
    config = TrainConfig.from_dict({**options, "seed": seed}, source="--options")
    # peer.ours looks project_config up at call time: here it answers the candidate's options.
    peer.project_config = lambda task, seed, method, changes=None: config
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as folder:
        run, samples = peer.ours(name, data, Path(folder) / "model", x_obs, seed, "npe")
        if num_test:
            run |= coverage(name, Path(folder) / "model", num_test, seed, cache)
    return run | peer.score(reference, samples, peer.pipeline_settings()["validate"])


def coverage(name: str, model: Path, num_test: int, seed: int, cache: Path) -> dict[str, Any]:
    """TARP and HPD deviations from the diagonal of the posterior in ``model`` on ``num_test``
    test simulations (the experiment's test seed), with the sample and validate stages' sizes
    and seeds: positive HPD deviation means under-confident, negative over-confident."""
    settings = peer.pipeline_settings()
    test = cache / f"{name}-test-{num_test}.h5"
    if not test.exists():
        plan = simulation.SimulationPlan(name, num_test, settings["simulate"]["test_seed"], 1000)
        simulation.run(plan, get_task(name), test, SerialComm(), overwrite=True)
    simulations = storage.read_simulations(test, task=name)
    theta, x = np.asarray(simulations.theta), np.asarray(simulations.x)
    posterior, _ = load_posterior(model)
    spec = posterior.spec
    low, high = spec.box()
    torch.manual_seed(settings["sample"]["seed"] + seed)
    drawn = sample_posterior(
        posterior, x, settings["sample"]["num_test_samples"], low=low, high=high
    )
    log_prob_true = log_prob_of(posterior, theta, x)
    levels = diagnostics.DEFAULT_LEVELS
    rng = np.random.default_rng(settings["validate"]["seed"])
    tarp = diagnostics.tarp_coverage(drawn.samples, theta, levels, low=low, high=high, rng=rng)
    hpd = diagnostics.hpd_coverage(drawn.log_prob, log_prob_true, levels)
    signed = hpd - levels
    return {
        "num_test": num_test,
        "tarp_deviation": diagnostics.max_coverage_deviation(levels, tarp),
        "hpd_deviation": diagnostics.max_coverage_deviation(levels, hpd),
        "hpd_signed": float(signed[np.argmax(np.abs(signed))]),
    }


def save(candidate: str, name: str, budget: int, seed: int, entry: dict[str, Any]) -> None:
    """Merges ``entry`` into ``RESULTS`` under candidate, task and budget (with a file lock);
    seeds other than 0 go to that entry's ``replicates``."""
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results["machine"] = {
            "host": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        results["threads"] = 1
        tasks = results.setdefault("candidates", {}).setdefault(candidate, {})
        kept = tasks.setdefault(name, {}).get(str(budget), {})
        if seed == 0:  # peer.py's training seed: the entry compared across candidates
            tasks[name][str(budget)] = {"seed": seed, **entry} | (
                {"replicates": kept["replicates"]} if "replicates" in kept else {}
            )
        else:  # another training seed: a replicate beside it, to gauge the seed's spread
            kept.setdefault("replicates", {})[str(seed)] = entry
            tasks[name][str(budget)] = kept
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", type=Path, required=True, help="candidate's YAML options")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--budgets", nargs="+", type=int, default=[10000])
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--cache", type=Path, default=CACHE, help="simulations, observations")
    parser.add_argument(
        "--coverage", type=int, default=0, metavar="N", help="TARP and HPD on N test simulations"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("pipeline.training").setLevel(logging.INFO)  # one line per epoch
    options = yaml.safe_load(args.options.read_text()) or {}
    TrainConfig.from_dict(options, source=str(args.options))  # fail before any simulation
    candidate = args.options.stem
    for name in args.tasks:
        for budget in args.budgets:
            run = measure(name, budget, options, args.seed, args.cache, args.coverage)
            save(candidate, name, budget, args.seed, run | {"options": options})
            print(
                f"{candidate} {name} N={budget}: C2ST {run['c2st_mean']:.3f} {run['c2st']}, "
                f"train {run['train_seconds']:.0f} s, {run['epochs']} epochs"
                + (
                    f", TARP {run['tarp_deviation']:.3f}, HPD {run['hpd_signed']:+.3f}"
                    if args.coverage
                    else ""
                ),
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())

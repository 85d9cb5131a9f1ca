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

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (benchmarks/peer.py: data, training, sampling and scoring)

from pipeline import simulation  # noqa: E402
from pipeline.observations import make_observations, read_reference  # noqa: E402
from pipeline.parallel import SerialComm  # noqa: E402
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
    name: str, budget: int, options: dict[str, Any], seed: int, cache: Path
) -> dict[str, Any]:
    """Trains with ``options`` on ``name``'s first ``budget`` simulations and scores it."""
    data, observations = inputs(name, budget, cache)
    _, x_obs, reference = read_reference(observations)
    config = TrainConfig.from_dict({**options, "seed": seed}, source="--options")
    # peer.ours looks project_config up at call time: here it answers the candidate's options.
    peer.project_config = lambda task, seed: config
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as folder:
        run, samples = peer.ours(name, data, Path(folder) / "model", x_obs, seed)
    return run | peer.score(reference, samples, peer.pipeline_settings()["validate"])


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
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("pipeline.training").setLevel(logging.INFO)  # one line per epoch
    options = yaml.safe_load(args.options.read_text()) or {}
    TrainConfig.from_dict(options, source=str(args.options))  # fail before any simulation
    candidate = args.options.stem
    for name in args.tasks:
        for budget in args.budgets:
            run = measure(name, budget, options, args.seed, args.cache)
            save(candidate, name, budget, args.seed, run | {"options": options})
            print(
                f"{candidate} {name} N={budget}: C2ST {run['c2st_mean']:.3f} {run['c2st']}, "
                f"train {run['train_seconds']:.0f} s, {run['epochs']} epochs",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())

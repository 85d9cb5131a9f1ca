"""Two sets of trained posteriors compared on more observations than an experiment has.

An experiment scores a model at its 5 observations, with one draw of posterior samples each;
two option sets a few thousandths of C2ST apart swap places from one training seed, or one
sampling seed, to the next. This draws ``--observations`` observations of the task with
reference posteriors (seed 3, as the experiments: the first five are theirs), samples every
model there (10^4 samples, seed 4) and scores each by the validate stage's C2ST (5 folds, seed
5), through the ``pipeline`` CLI. Models are named ``GROUP-SEED`` (e.g. ``searched-2``);
reported are each model's mean C2ST, each group's mean over its seeds, and the paired
difference between two groups over the seeds both have (mean over observations of the
per-observation difference averaged over seeds, with its standard error over observations).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py --task two_moons \
        --work /tmp/compare-two_moons --observations 25 \
        --models searched-0=results/search/two_moons/model tuned-0=... \
        --groups searched tuned --out benchmarks/results/search_25_observations.json

Files already in ``--work`` (observations, samples, C2ST) are kept, so models can be added to a
finished comparison. One CPU thread per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pipeline.provenance import hardware  # noqa: E402
from pipeline.sampling import observation_task  # noqa: E402

PIPELINE = str(Path(sys.executable).parent / "pipeline")
NUM_SAMPLES = 10**4


def run(*arguments: str) -> None:
    subprocess.run([PIPELINE, *arguments], check=True)


def c2st_of(name: str, model: Path, work: Path, budget: int) -> np.ndarray:
    """Per-observation C2ST of ``model`` at ``work``'s observations (made once)."""
    samples, scores = work / "samples" / f"{name}.h5", work / "c2st" / f"{name}.json"
    if not scores.exists():
        if not samples.exists():
            samples.parent.mkdir(exist_ok=True)
            sample = ["sample", "--model", str(model), "--observations", str(work / "obs.h5")]
            sample += ["--num-samples", str(NUM_SAMPLES), "--seed", "4", "--out", str(samples)]
            run(*sample, "--log", str(work / "logs" / f"sample-{name}.log"))
        scores.parent.mkdir(exist_ok=True)
        c2st = ["c2st", "--observation-samples", str(samples), "--observations"]
        c2st += [str(work / "obs.h5"), "--budget", str(budget), "--seed", "5"]
        run(*c2st, "--out", str(scores), "--log", str(work / "logs" / f"c2st-{name}.log"))
    return np.asarray(json.loads(scores.read_text())["c2st"]["per_observation"])


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """``a`` minus ``b`` (per seed), averaged over the seeds both have; by observation."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    difference = np.mean([a[s] - b[s] for s in seeds], axis=0)
    return {
        "seeds": seeds,
        "mean": round(float(difference.mean()), 4),
        "standard_error": round(float(difference.std(ddof=1) / np.sqrt(difference.size)), 4),
        "per_observation": [round(float(d), 4) for d in difference],
        "seeds_where_first_is_lower": sum(int(a[s].mean() < b[s].mean()) for s in seeds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--observations", type=int, default=25)
    parser.add_argument("--budget", type=int, default=10**4, help="the models' simulations")
    parser.add_argument("--models", nargs="+", required=True, help="GROUP-SEED=MODEL_DIR")
    parser.add_argument("--groups", nargs=2, help="the two groups to pair (first minus second)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    named = [entry.partition("=") for entry in args.models]
    if any(not sep or "-" not in name or not model for name, sep, model in named):
        parser.error(f"--models takes GROUP-SEED=MODEL_DIR entries, got {' '.join(args.models)}")
    present = {name.rsplit("-", 1)[0] for name, _, _ in named}
    if args.groups and not set(args.groups) <= present:
        parser.error(f"--groups {' '.join(args.groups)}: each must be a GROUP of --models")
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    observed = args.work / "obs.h5"
    if not observed.exists():
        observe = ["observe", "--task", args.task, "--num-observations", str(args.observations)]
        observe += ["--num-reference-samples", "10000", "--seed", "3"]
        run(*observe, "--out", str(observed), "--log", str(args.work / "logs/obs.log"))
    with h5py.File(observed, "r") as file:
        count = len(file["x"])
    task = observation_task(observed)
    if (task, count) != (args.task, args.observations):
        sys.exit(
            f"{observed} holds {count} observations of {task}, not "
            f"{args.observations} of {args.task}: give another --work"
        )
    groups: dict[str, dict[str, np.ndarray]] = {}
    models: dict[str, Any] = {}
    for name, _, model in named:
        group, seed = name.rsplit("-", 1)
        scores = c2st_of(name, Path(model), args.work, args.budget)
        groups.setdefault(group, {})[seed] = scores
        made = json.loads((Path(model) / "posterior.json").read_text())
        models[name] = {
            "path": str(model),
            "train_config": made["train_config"],
            "code_revision": made["provenance"].get("code_revision"),
            "best_val_loss": made.get("best_val_loss"),
            "mean": round(float(scores.mean()), 4),
            "mean_first_5": round(float(scores[:5].mean()), 4),
            "per_observation": [round(float(c), 4) for c in scores],
        }
        print(f"{name:16s} C2ST mean {scores.mean():.4f} (first 5: {scores[:5].mean():.4f})")
    summary = {
        group: {
            "seeds": sorted(by_seed),
            "mean": round(float(np.mean(list(by_seed.values()))), 4),
            "mean_first_5": round(float(np.mean([s[:5] for s in by_seed.values()])), 4),
        }
        for group, by_seed in groups.items()
    }
    for group, entry in summary.items():
        print(f"{group:16s} {len(entry['seeds'])} seeds: C2ST mean {entry['mean']:.4f}")
    difference = paired(groups[args.groups[0]], groups[args.groups[1]]) if args.groups else None
    if difference is not None:
        print(
            f"{args.groups[0]} - {args.groups[1]} over seeds {', '.join(difference['seeds'])}: "
            f"{difference['mean']:+.4f} +- {difference['standard_error']:.4f} (s.e.); "
            f"lower at {difference['seeds_where_first_is_lower']} of "
            f"{len(difference['seeds'])} seeds"
        )
    if args.out:
        result = {
            "task": args.task,
            "num_observations": args.observations,
            "machine": hardware(),
            "models": models,
            "groups": summary,
            "paired": None if difference is None else {"groups": args.groups, **difference},
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

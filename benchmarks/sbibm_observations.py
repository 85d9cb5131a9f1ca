"""Trained posteriors scored at sbibm's own observations, against sbibm's reference samples.

The pipeline's benchmarks score posteriors at observations of their own (the default
experiment's five, seed 3) against references of their own; the figures published for sbibm
(Lueckmann et al. 2021) are at sbibm's ten observations. Where a task's C2ST falls short of a
published figure, this tells how much of the gap is the observations: the same trained model,
sampled by ``pipeline sample`` and scored by ``pipeline c2st`` (10^4 samples per observation,
5 folds, seed 5, as the validate stage), at sbibm's observations against sbibm's references.

    git clone https://github.com/sbi-benchmark/sbibm /tmp/sbibm          # its task files
    git clone https://github.com/sbi-benchmark/results /tmp/sbibm-results  # published C2ST
    .venv/bin/python benchmarks/sbibm_observations.py --sbibm /tmp/sbibm --task bernoulli_glm \
        --model NLE=results/nle/bernoulli_glm/model \
        --published /tmp/sbibm-results/benchmarking_sbi/results/main_paper.csv

Also scored: the task's own reference method (``Task.reference``) at sbibm's observations
against sbibm's reference samples, which checks that both references sample one posterior;
with ``--sbi nle --sbi-data FILE``, ``sbi``'s own estimator trained on the same simulations (as
``benchmarks/peer.py`` trains it). Writes ``benchmarks/results/sbibm_<task>.json`` (keeping the
models an earlier run scored at the same observations) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE = str(Path(sys.executable).parent / "pipeline")
NUM_SAMPLES = 10**4
SEED = 5  # the validate stage's classifier seed
# sbibm's results table writes budgets with superscripts.
BUDGET_LABELS = {1000: "10³", 10000: "10⁴", 100000: "10⁵"}


def read_sbibm(root: Path, task: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sbibm's observation ``index`` (from 1) of ``task``: ``theta`` (D,), ``x`` (X,) and its
    reference posterior samples (10^4, D), from ``sbibm/tasks/<task>/files``."""
    folder = root / "sbibm" / "tasks" / task / "files" / f"num_observation_{index}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: pass a checkout of sbibm as --sbibm")

    def table(name: str) -> np.ndarray:
        return np.loadtxt(folder / name, delimiter=",", skiprows=1, ndmin=2).astype(np.float32)

    reference = table("reference_posterior_samples.csv.bz2")
    return table("true_parameters.csv")[0], table("observation.csv")[0], reference


def write_observations(task_name: str, indices: list[int], root: Path, out: Path) -> None:
    """sbibm's observations ``indices`` as an observations file of ``pipeline observe``'s
    layout, with sbibm's references as its reference samples."""
    from pipeline.observations import write_observations as write
    from pipeline.tasks import get_task

    task = get_task(task_name)
    rows = [read_sbibm(root, task_name, index) for index in indices]
    theta, x, reference = (np.stack(column) for column in zip(*rows, strict=True))
    if x.shape[1:] != tuple(task.x_shape) or theta.shape[1] != len(task.parameter_names):
        raise ValueError(
            f"sbibm's {task_name} has x of shape {x.shape[1:]} and {theta.shape[1]} parameters; "
            f"the pipeline's task has {task.x_shape} and {len(task.parameter_names)}"
        )
    identity = {
        "task": task.name,
        "sbibm_observations": indices,
        "num_reference_samples": reference.shape[1],
    }
    write(out, task, theta, x, identity, reference, {"method": "sbibm's reference files"})


def score_model(model: Path, observations: Path, folder: Path) -> tuple[list[float], float]:
    """C2ST per observation of ``model``'s samples (``pipeline sample``, ``pipeline c2st``) and
    the sampling time in seconds."""
    samples, scores = folder / "samples.h5", folder / "c2st.json"
    start = time.perf_counter()
    subprocess.run(
        [PIPELINE, "sample", "--model", str(model), "--observations", str(observations)]
        + ["--num-samples", str(NUM_SAMPLES), "--out", str(samples), "--overwrite"],
        check=True,
    )
    seconds = time.perf_counter() - start
    document = json.loads((model / "posterior.json").read_text())
    budget = int(document["num_train"]) + int(document["num_val"])
    subprocess.run(
        [PIPELINE, "c2st", "--observation-samples", str(samples), "--observations"]
        + [str(observations), "--budget", str(budget), "--seed", str(SEED), "--out", str(scores)],
        check=True,
    )
    return json.loads(scores.read_text())["c2st"]["per_observation"], seconds


def score_reference(task_name: str, observations: Path) -> list[float]:
    """C2ST of the task's own reference method at each observation against sbibm's samples."""
    from pipeline.diagnostics import c2st
    from pipeline.observations import read_reference
    from pipeline.tasks import get_task

    task = get_task(task_name)
    _, xs, references = read_reference(observations)
    values = []
    for j, (x, reference) in enumerate(zip(xs, references, strict=True)):
        ours = task.reference(x, NUM_SAMPLES, np.random.default_rng([SEED, j])).samples
        values.append(float(c2st(reference, ours, seed=SEED)))
    return values


def score_sbi(
    method: str, data: Path, task_name: str, observations: Path
) -> tuple[list[float], dict]:
    """``sbi``'s estimator of ``method`` trained on the simulations in ``data`` as
    ``benchmarks/peer.py`` trains it (its defaults, seed 0; NLE sampled by slice sampling over
    20 chains), its C2ST per observation and its times."""
    from peer import peer

    from pipeline import storage
    from pipeline.diagnostics import c2st_batched
    from pipeline.observations import read_reference
    from pipeline.tasks import get_task

    _, xs, references = read_reference(observations)
    times, samples = peer(get_task(task_name), storage.read_simulations(data), xs, 0, method)
    values = c2st_batched(references, samples, seed=SEED, num_folds=5)
    return [float(value) for value in values], times


def published(path: Path, task: str, budget: int, indices: list[int]) -> dict[str, list[float]]:
    """sbibm's published C2ST of every algorithm at ``indices`` (``main_paper.csv`` of
    sbi-benchmark/results), for the algorithms that ran at all of them."""
    found: dict[str, dict[int, float]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            if row["task"] == task and row["num_simulations"] == BUDGET_LABELS.get(budget):
                found.setdefault(row["algorithm"], {})[int(row["num_observation"])] = float(
                    row["C2ST"]
                )
    return {
        algorithm: [values[i] for i in indices]
        for algorithm, values in sorted(found.items())
        if all(i in values for i in indices)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sbibm", type=Path, required=True, help="a checkout of sbibm")
    parser.add_argument("--task", required=True)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a trained model folder to score, with its label (repeatable)",
    )
    parser.add_argument(
        "--sbi",
        nargs="+",
        default=[],
        choices=("npe", "nle", "fmpe"),
        help="also train sbi's estimators of these families on --sbi-data (as peer.py does)",
    )
    parser.add_argument("--sbi-data", type=Path, help="simulations for --sbi (training file)")
    parser.add_argument("--observations", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--budget", type=int, default=10000, help="for --published's rows")
    parser.add_argument("--published", type=Path, help="sbi-benchmark/results' main_paper.csv")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "sbibm_observations")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.sbi and args.sbi_data is None:
        parser.error("--sbi needs --sbi-data: the simulations to train sbi's estimators on")

    work = args.work / args.task
    work.mkdir(parents=True, exist_ok=True)
    observations = work / "observations.h5"
    write_observations(args.task, args.observations, args.sbibm, observations)
    result: dict = {
        "task": args.task,
        "sbibm_observations": args.observations,
        "num_samples": NUM_SAMPLES,
        "models": {},
        "reference": score_reference(args.task, observations),
    }
    for entry in args.model:
        label, _, folder = entry.partition("=")
        if not folder:
            parser.error(f"--model {entry!r}: give LABEL=DIR")
        values, seconds = score_model(Path(folder), observations, work / label)
        result["models"][label] = {"model": folder, "c2st": values, "sample_seconds": seconds}
    for method in args.sbi:
        values, times = score_sbi(method, args.sbi_data, args.task, observations)
        result["models"][f"sbi {method.upper()}"] = {"data": str(args.sbi_data), "c2st": values}
        result["models"][f"sbi {method.upper()}"] |= times
    if args.published:
        result["published"] = published(args.published, args.task, args.budget, args.observations)
        result["published_budget"] = args.budget

    out = args.out or RESULTS / f"sbibm_{args.task}.json"
    if out.exists():  # models scored before at the same observations stay beside the new ones
        saved = json.loads(out.read_text())
        if saved["sbibm_observations"] == args.observations:
            result["models"] = saved["models"] | result["models"]
    out.write_text(json.dumps(result, indent=1) + "\n")
    rows = [("reference (ours)", result["reference"])]
    rows += [(label, entry["c2st"]) for label, entry in result["models"].items()]
    rows += [(f"sbibm {name}", values) for name, values in result.get("published", {}).items()]
    print(f"| {args.task} | " + " ".join(map(str, args.observations)) + " | mean |")
    for label, values in rows:
        cells = " ".join(f"{value:.3f}" for value in values)
        print(f"| {label} | {cells} | {statistics.mean(values):.3f} |")


if __name__ == "__main__":
    main()

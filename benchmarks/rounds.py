"""Sequential rounds against amortized NPE and against ``sbi``'s TSNPE (issue: sequential
inference as a DAG), at the five reference observations of a task.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rounds.py run --tasks two_moons \
        --observations 0 1 2 3 4 --results results          # the pipeline, one experiment each
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rounds.py peer --tasks two_moons \
        --observations 0 1 --results results                # sbi 0.27 (pip install -e ".[bench]")
    .venv/bin/python benchmarks/rounds.py table --tasks two_moons --results results
    .venv/bin/python benchmarks/rounds.py curve --tasks bernoulli_glm slcp two_moons

``run``: for each task and observation ``k``, the pipeline with the rounds of
``config/experiments/rounds.yaml`` (4 x 2500 simulations) aimed at observation ``k``, as the
experiment ``rounds_<task>_obs<k>`` (``snakemake --cores CORES``); with ``--method nle``,
sequential NLE: every round trains the task's block of ``config/experiments/nle.yaml`` (experiment
``rounds_<task>_obs<k>_nle``; ``table --method nle`` stores it as ``ours_nle``); with
``--train-seed S``, every round trains from seed ``S`` (experiment ``rounds_<task>_obs<k>_seedS``;
``table --train-seed S --key NAME`` stores it as ``NAME``). ``peer``:
``sbi``'s truncated sequential NPE on the same task, observation and rounds: ``NPE`` at its
defaults, each round's proposal the ``RestrictedPrior`` of ``get_density_thresholder`` at the same
quantile, the same simulator, 10^4 samples at the observation, scored by the validate stage's C2ST
(5 folds, seed 5) against the pipeline run's reference (with ``--method nle``, sequential NLE's
run's: the same observations and references). ``nesting``: where the last region's test
simulations lie against each earlier round's own region, and HPD coverage inside all of them
against the rest (printed). ``table``: per observation the C2ST of every round, the final
posterior's C2ST and coverage (TARP and HPD on test simulations from the last region), wall time,
``sbi``'s C2ST where run, and the amortized posterior's C2ST at 10^3, 10^4 and 10^5 simulations
from ``results/peer.json``; written to ``benchmarks/results/rounds.json`` (under ``ours``, or
``--key``'s name for a variant run at some observations only). ``curve``: from that
file, per task the mean C2ST after each round against simulations used, amortized NPE's at 10^3,
10^4 and 10^5 on the same observations (and the simulations it needs to reach the rounds' final
C2ST), ``sbi``'s TSNPE beside ours on its observations: ``benchmarks/results/rounds_curve.json``
and ``rounds_curve.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
NUM_SAMPLES = 10**4


def experiment(task: str, observation: int, method: str = "npe", seed: int = 0) -> str:
    name = f"rounds_{task}_obs{observation}" + ("" if method == "npe" else f"_{method}")
    return name + (f"_seed{seed}" if seed else "")


def nle_block(task: str) -> dict[str, Any]:
    """The task's training options of ``config/experiments/nle.yaml``."""
    experiment = yaml.safe_load((ROOT / "config/experiments/nle.yaml").read_text())
    return experiment["task_train"][task]


def rounds_settings() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config/experiments/rounds.yaml").read_text())["rounds"]


def run(
    task: str,
    observation: int,
    results: Path,
    cores: int,
    method: str,
    nolock: bool,
    seed: int,
    *,
    block: dict[str, Any] | None = None,
) -> None:
    """The pipeline's rounds for ``task`` at ``observation``, as their own experiment; with
    ``method`` nle, every round trains ``block`` or else the task's block of
    ``config/experiments/nle.yaml``;
    with ``nolock``, beside another run in this checkout (each writes its own experiment); with
    ``seed``, every round trains from that seed (another replicate of the same method)."""
    rounds = {**rounds_settings(), "tasks": [task], "observation": observation}
    name = experiment(task, observation, method, seed)
    config = {
        "experiment": name,
        "results": str(results),
        "tasks": [task],
        "rounds": rounds,
    }
    if method == "nle":
        config["task_train"] = {task: block or nle_block(task)}
    if seed:
        config["train"] = {"seed": seed}
    path = results / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", str(path)]
    command += ["--nolock"] if nolock else []
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"{task} observation {observation}: {time.perf_counter() - start:.0f} s", flush=True)


def collect(
    task: str, observation: int, results: Path, method: str, seed: int = 0
) -> dict[str, Any]:
    """What the pipeline's rounds at ``observation`` reached, from their files; the rounds
    alone (their C2ST and regions) where the run stopped before validate."""
    folder = results / experiment(task, observation, method, seed)
    rounds = sorted((folder / task / "rounds").glob("round-*/truncation.json"))
    truncations = [json.loads(path.read_text()) for path in rounds]
    found = {
        "round_c2st": [round(t["c2st"], 4) for t in truncations],
        "region_prior_mass": [round(t["prior_mass"], 4) for t in truncations],
    }
    if not (folder / task / "validation/metrics.json").exists():
        return found | {"rounds_seconds": round(stage_seconds(folder / "benchmarks"), 1)}
    metrics = json.loads((folder / task / "validation/metrics.json").read_text())
    coverage = metrics["coverage"]
    levels = np.asarray(coverage["levels"])
    return found | {
        "c2st": round(metrics["c2st"]["mean"], 4),
        "tarp_max_deviation": round(float(np.max(np.abs(coverage["tarp"] - levels))), 4),
        "hpd_max_deviation": round(float(np.max(np.abs(coverage["hpd"] - levels))), 4),
        "wall_seconds": round(stage_seconds(folder / "benchmarks"), 1),
    }


def stage_seconds(folder: Path) -> float:
    """Seconds of every job of a run (Snakemake's benchmark files), summed."""
    total = 0.0
    for path in folder.rglob("*.tsv"):
        with open(path) as file:
            total += sum(float(row["s"]) for row in csv.DictReader(file, delimiter="\t"))
    return total


def amortized(task: str, observation: int) -> dict[str, float]:
    """Our amortized posterior's C2ST at this observation, by budget (``results/peer.json``'s
    main entries: a variant trained with other options or stopped at the peer's time is not
    it)."""
    entries = json.loads((RESULTS / "peer.json").read_text())["entries"]
    return {
        str(e["budget"]): e["ours"]["c2st"][observation]
        for e in entries
        if e["task"] == task
        and e.get("method", "npe") == "npe"
        and e["seed"] == 0
        and not e.get("variant")
    }


def rounds_curve(entry: dict[str, Any]) -> list[float]:
    """C2ST after each round: ``truncate``'s for the earlier rounds, the validate stage's
    (as amortized's and ``sbi``'s) for the last."""
    return [*entry["round_c2st"][:-1], entry["c2st"]]


def simulations_to_reach(target: float, budgets: list[int], scores: list[float]) -> float | None:
    """The fewest simulations at which ``scores`` (C2ST by budget, increasing budgets) reach
    ``target``, interpolated linearly in log(simulations); None if no budget reaches it (the
    smallest budget if it already does: an upper bound)."""
    for k, (budget, score) in enumerate(zip(budgets, scores, strict=True)):
        if score <= target:
            if k == 0:
                return float(budget)
            before, previous = budgets[k - 1], scores[k - 1]
            fraction = (previous - target) / (previous - score)
            return float(np.exp(np.log(before) + fraction * np.log(budget / before)))
    return None


def curves(saved: dict[str, Any], tasks: list[str], out: Path) -> dict[str, Any]:
    """Mean C2ST against simulations per task: the rounds, amortized NPE on the same
    observations, ``sbi``'s TSNPE with ours on its observations; a figure at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(np.cumsum(rounds_settings()["simulations"]))
    rows = (len(tasks) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(9, 3.6 * rows), squeeze=False)
    found: dict[str, Any] = {}
    for task, axis in zip(tasks, axes.flat, strict=False):
        keys = sorted(k for k, e in saved.items() if k.startswith(f"{task}/") and "ours" in e)
        if not keys:
            raise SystemExit(f"no rounds of {task} in {RESULTS / 'rounds.json'}: `run`, `table`")
        observations = [int(k.split("/")[1]) for k in keys]
        ours = np.mean([rounds_curve(saved[k]["ours"]) for k in keys], axis=0)
        scored = [amortized(task, k) for k in observations]
        budgets = sorted(int(b) for b in scored[0])
        by_budget = [[entry[str(b)] for b in budgets] for entry in scored]
        amortized_mean = np.mean(by_budget, axis=0)
        reach = simulations_to_reach(float(ours[-1]), budgets, list(amortized_mean))
        found[task] = {
            "observations": observations,
            "rounds_simulations": [int(n) for n in steps],
            "rounds_c2st": [round(float(c), 4) for c in ours],
            "amortized_simulations": budgets,
            "amortized_c2st": [round(float(c), 4) for c in amortized_mean],
            "amortized_simulations_to_reach_rounds": None if reach is None else round(reach),
        }
        axis.plot(steps, ours, "o-", label=f"rounds (obs. {', '.join(map(str, observations))})")
        axis.plot(budgets, amortized_mean, "s-", label="amortized NPE, same obs.")
        with_sbi = [k for k in keys if "sbi" in saved[k]]
        if with_sbi:
            sbi = np.mean([saved[k]["sbi"]["round_c2st"] for k in with_sbi], axis=0)
            mine = np.mean([rounds_curve(saved[k]["ours"]) for k in with_sbi], axis=0)
            shown = ", ".join(k.split("/")[1] for k in with_sbi)
            axis.plot(steps, sbi, "^--", label=f"sbi TSNPE (obs. {shown})")
            if with_sbi != keys:  # else the rounds' own curve
                axis.plot(steps, mine, "o:", color="C0", alpha=0.6, label=f"rounds (obs. {shown})")
            found[task]["sbi"] = {
                "observations": [int(k.split("/")[1]) for k in with_sbi],
                "sbi_c2st": [round(float(c), 4) for c in sbi],
                "rounds_c2st": [round(float(c), 4) for c in mine],
            }
        axis.set(xscale="log", xlabel="simulations", ylabel="mean C2ST", title=task)
        axis.axhline(0.5, color="grey", lw=0.5)
        axis.legend(fontsize=7)
    for axis in axes.flat[len(tasks) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    return found


def peer(task_name: str, observation: int, results: Path, method: str) -> dict[str, Any]:
    """``sbi``'s TSNPE on the same task, observation and rounds; C2ST against the reference of
    our ``method``'s run there (the same observations and references whichever it is)."""
    import torch
    from sbi.inference import NPE
    from sbi.utils import RestrictedPrior, get_density_thresholder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer import torch_prior

    from pipeline.diagnostics import c2st
    from pipeline.observations import read_reference
    from pipeline.tasks import get_task

    task = get_task(task_name)
    folder = results / experiment(task_name, observation, method) / task_name
    _, x_obs, reference = read_reference(folder / "observations.h5")
    x_o = torch.from_numpy(x_obs[observation].reshape(-1)).float()
    settings = rounds_settings()
    prior = torch_prior(task)
    torch.manual_seed(0)
    rng = np.random.default_rng([0, observation])
    inference, proposal, start = NPE(prior=prior, show_progress_bars=False), prior, time.time()
    scores = []
    for count in settings["simulations"]:
        theta = proposal.sample((count,))
        x = task.simulate(theta.numpy().astype(np.float64), rng)
        x = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(count, -1))
        estimator = inference.append_simulations(theta, x).train(force_first_round_loss=True)
        posterior = inference.build_posterior(estimator).set_default_x(x_o)
        samples = posterior.sample((NUM_SAMPLES,), show_progress_bars=False).numpy()
        scores.append(round(c2st(reference[observation], samples, seed=5), 4))
        accept = get_density_thresholder(posterior, quantile=settings.get("quantile", 1e-4))
        proposal = RestrictedPrior(prior, accept, posterior=posterior, sample_with="rejection")
        print(f"sbi {task_name} observation {observation}: C2ST {scores}", flush=True)
    return {"round_c2st": scores, "c2st": scores[-1], "seconds": round(time.time() - start, 1)}


def nesting(task_name: str, observation: int, results: Path) -> dict[str, Any]:
    """Where the last region's test simulations lie against each earlier round's own region
    (its posterior's HPD region alone, as regions were before they nested), and the HPD
    coverage of those inside every earlier region against the others."""
    from pipeline.diagnostics.coverage import DEFAULT_LEVELS, hpd_coverage
    from pipeline.models.posterior import load_posterior
    from pipeline.rounds.records import Truncation
    from pipeline.rounds.region import TruncatedPrior
    from pipeline.sampling import log_prob_of, read_samples
    from pipeline.storage import read_simulations
    from pipeline.tasks import get_task

    folder = results / experiment(task_name, observation) / task_name
    prior = get_task(task_name).prior
    found = read_samples(folder / "samples/test.h5")
    test = read_simulations(folder / "sims/test.h5")
    index = np.asarray(found["attrs"]["observation_index"])
    theta, x = test.theta[index], test.x[index]
    inside = []
    for path in sorted((folder / "rounds").glob("round-*/truncation.json"))[:-1]:
        own = Truncation.read(path)
        own = Truncation(**{**own.__dict__, "within": []})
        posterior, _ = load_posterior(path.parent / "model")
        x_obs = np.asarray(own.x_obs, dtype=np.float32).reshape(posterior.spec.x_shape)
        inside.append(TruncatedPrior(prior, [posterior], x_obs, own).accepts(theta))
    everywhere = np.all(inside, axis=0)
    posterior, _ = load_posterior(folder / "model")
    log_q = log_prob_of(posterior, theta, x)

    def deviation(rows: np.ndarray) -> float | None:
        if rows.sum() < 20:
            return None
        coverage = hpd_coverage(found["log_prob"][rows], log_q[rows])
        return round(float(np.max(np.abs(coverage - DEFAULT_LEVELS))), 4)

    return {
        "num_test": int(len(theta)),
        "outside_round": [round(float(1 - np.mean(rows)), 4) for rows in inside],
        "outside_any": round(float(1 - np.mean(everywhere)), 4),
        "hpd_max_deviation_inside_all": deviation(everywhere),
        "hpd_max_deviation_outside_some": deviation(~everywhere),
    }


def record(output: Path, key: str, found: dict[str, Any]) -> None:
    """Sets ``found``'s entries under ``key`` in the results file, read afresh: a run beside
    this one (``peer`` takes minutes, ``run`` hours) may have written it meanwhile."""
    saved = json.loads(output.read_text()) if output.exists() else {}
    saved[key] = {**saved.get(key, {}), **found}
    output.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "peer", "table", "nesting", "curve"))
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--observations", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--method", choices=("npe", "nle"), default="npe")
    parser.add_argument(
        "--key",
        default="ours",
        help="table: store NPE's runs under this key of rounds.json instead of ours (a variant "
        "not yet run at every observation, which curve would otherwise mix with the rest)",
    )
    parser.add_argument(
        "--train-seed",
        type=int,
        default=0,
        help="run, table: every round trains from this seed, in the experiment "
        "rounds_<task>_obs<k>_seed<S> (with table, give it its own --key)",
    )
    parser.add_argument(
        "--block",
        type=json.loads,
        help="run with --method nle: every round trains these options (JSON) instead of the "
        "task's block of config/experiments/nle.yaml (an earlier block, to rerun its figures)",
    )
    parser.add_argument(
        "--nolock",
        action="store_true",
        help="Snakemake's --nolock: run beside another rounds run in this checkout",
    )
    args = parser.parse_args()
    output = RESULTS / "rounds.json"
    if args.action == "curve":
        saved = json.loads(output.read_text())
        found = curves(saved, args.tasks, RESULTS / "rounds_curve.png")
        (RESULTS / "rounds_curve.json").write_text(json.dumps(found, indent=1) + "\n")
        for task, entry in found.items():
            print(task, json.dumps(entry))
        return
    for task in args.tasks:
        for k in args.observations:
            key = f"{task}/{k}"
            if args.action == "run":
                results = args.results.resolve()
                run(
                    task,
                    k,
                    results,
                    args.cores,
                    args.method,
                    args.nolock,
                    args.train_seed,
                    block=args.block,
                )
            elif args.action == "nesting":
                print(key, json.dumps(nesting(task, k, args.results.resolve())), flush=True)
            elif args.action == "peer":
                record(output, key, {"sbi": peer(task, k, args.results.resolve(), args.method)})
            elif args.method == "nle":
                record(output, key, {"ours_nle": collect(task, k, args.results.resolve(), "nle")})
            else:
                found = collect(task, k, args.results.resolve(), "npe", args.train_seed)
                record(output, key, {args.key: found, "amortized": amortized(task, k)})
    if args.action == "table":
        for key, entry in sorted(json.loads(output.read_text()).items()):
            print(key, json.dumps(entry))


if __name__ == "__main__":
    main()

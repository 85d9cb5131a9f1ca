"""Accuracy against the peer: C2ST of our estimator and of the ``sbi`` package's estimator of
the same family (NPE, FMPE or NLE), per task and budget, on the same simulations, observations
and reference posteriors. Needs ``sbi`` beside the project (``pip install -e ".[bench]"``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer.py --tasks two_moons slcp \
        --budgets 1000 10000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer.py --method nle --tasks bernoulli_glm

For every task and budget N, exactly as the pipeline does it: the first N training simulations
of seed 1 (``pipeline simulate``), the five observations of seed 3 with 10^4 reference samples
each (``pipeline observe``), 10^4 posterior samples per observation, and C2ST with the
validate stage's settings (5 folds, seed 5). Ours trains with the default experiment's options
for the task (``config/config.yaml``); the peer with ``sbi.inference.NPE(prior)`` at its
defaults (a MAF, batches of 200, Adam at 5e-4, stop after 20 epochs without improvement) and
samples with ``build_posterior()`` (rejection of samples outside the prior's support). One CPU
thread each, one after the other in this process. Results are merged into
``benchmarks/results/peer.json`` (one entry per task, budget, seed, method and variant, so runs
can be split).

``--method fmpe`` or ``nle``: ours with the experiment's global ``train:`` options (the per-task
blocks are tuned for npe), :data:`METHOD_OPTIONS` and, for nle, the task's block of the ``nle``
experiment (``config/experiments/nle.yaml``) where it has one; the peer is
``sbi.inference.FMPE`` or ``NLE`` at their defaults, NLE's posterior sampled by
``build_posterior()``'s MCMC with ``slice_np_vectorized`` over 20 chains (``sbi``'s recommended
vectorised sampler). Ours samples NLE with the sample stage's default ensemble settings, and
FMPE without densities, as ``sbi`` does (``sample_one_with_densities_seconds``: one
observation's draws with them, as the sample stage stores them).

``--match-time`` trains the peer first and caps ours at the peer's training time (``max_time``,
the best weights by validation loss kept, as an early stop keeps them), so that the two are
compared at equal cost; ``--ours-options JSON`` changes ours' options over the above (e.g.
``'{"ensemble": 1}'``). Either run is stored as a variant of its own (``--variant``, by default
``matched`` with ``--match-time``), beside the main entries, not replacing them.

``--ours-from results/EXPERIMENT`` takes ours from a pipeline run instead of training it here (at
10^5 simulations training takes tens of minutes per task): its training file, observations and
validated C2ST, after checking that the run simulated exactly this budget with the same seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipeline import simulation, storage
from pipeline.diagnostics import c2st_batched
from pipeline.models.flows import MIXTURES
from pipeline.models.posterior import load_posterior
from pipeline.observations import make_observations, read_reference
from pipeline.parallel import SerialComm
from pipeline.sampling import sample_posterior
from pipeline.tasks import BoxUniform, DiagonalNormal, MultivariateNormal, Task, get_task
from pipeline.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "peer.json"
NLE_EXPERIMENT = ROOT / "config" / "experiments" / "nle.yaml"
NUM_SAMPLES = 10**4
METHODS = ("npe", "fmpe", "nle")
# Ours, per family other than npe, over the experiment's global train: options.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    # The better of the two settings measured first (benchmarks/README.md, FMPE), one field as
    # sbi's (four: C2ST 0.589 against one's 0.581 on two_moons at 10^4, for three times the
    # training).
    "fmpe": {
        "method": "fmpe",
        "ensemble": 1,
        "flow_hidden": [128, 128, 128, 128],
        "lr_schedule": "cosine",
        "max_epochs": 300,
        "patience": 300,
    },
    # sbi's NLE flow: a MAF of 5 transforms (its MCMC calls the flow thousands of times, and a
    # MAF evaluates about 15 times faster than zuko's NSF at 10 features).
    "nle": {"method": "nle", "flow": "maf", "transforms": 5},
}


def pipeline_settings() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def project_config(
    task: str, seed: int, method: str = "npe", changes: dict[str, Any] | None = None
) -> TrainConfig:
    """The training options the default experiment uses for ``task`` (npe); for another family
    its global options with :data:`METHOD_OPTIONS`, and for nle the task's block of
    ``config/experiments/nle.yaml`` where it has one; ``changes`` over them."""
    config = pipeline_settings()
    if method != "npe":
        options = dict(METHOD_OPTIONS[method])
        if method == "nle":
            options |= yaml.safe_load(NLE_EXPERIMENT.read_text())["task_train"].get(task, {})
            if options["flow"] in MIXTURES:  # a mixture density network has no transforms
                options.pop("transforms")
        options = {**config.get("train", {}), **options}
    else:
        options = {**config.get("train", {}), **config.get("task_train", {}).get(task, {})}
    return TrainConfig.from_dict({**options, **(changes or {}), "seed": seed})


def tensor(values: Any) -> torch.Tensor:
    """float32, as the peer's networks and transforms expect."""
    return torch.as_tensor(np.asarray(values), dtype=torch.float32)


def torch_prior(task: Task) -> torch.distributions.Distribution:
    """The task's prior as the torch distribution ``sbi`` expects."""
    prior = task.prior
    if isinstance(prior, BoxUniform):
        from sbi.utils import BoxUniform as SbiBoxUniform

        return SbiBoxUniform(tensor(prior.low), tensor(prior.high))
    if isinstance(prior, DiagonalNormal):
        normal = torch.distributions.Normal(tensor(prior.loc), tensor(prior.scale))
        return torch.distributions.Independent(normal, 1)
    if isinstance(prior, MultivariateNormal):
        precision = tensor(prior.precision)
        return torch.distributions.MultivariateNormal(
            tensor(prior.loc), precision_matrix=precision
        )
    raise TypeError(f"no torch version of {type(prior).__name__} for task {task.name}")


def ours(
    task: str,
    data: Path,
    folder: Path,
    x_obs: np.ndarray,
    seed: int,
    method: str,
    changes: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    start = time.perf_counter()
    metadata = train(data, folder, project_config(task, seed, method, changes))
    seconds = time.perf_counter() - start
    posterior, _ = load_posterior(folder)
    spec = posterior.spec
    low, high = spec.box()
    torch.manual_seed(seed)
    # The peer draws without densities; so does ours for C2ST. The sample stage also stores
    # each draw's density (HPD coverage), which for FMPE costs an ODE solve with the field's
    # trace per member: timed apart, on one observation.
    densities = method != "fmpe"
    start = time.perf_counter()
    samples = sample_posterior(
        posterior, x_obs, NUM_SAMPLES, low=low, high=high, densities=densities
    ).samples
    sampling = time.perf_counter() - start
    run = {"train_seconds": seconds, "sample_seconds": sampling, "epochs": metadata["epochs"]}
    if changes:
        run["options"] = changes
    if not densities:
        start = time.perf_counter()
        sample_posterior(posterior, x_obs[:1], NUM_SAMPLES, low=low, high=high)
        run["sample_one_with_densities_seconds"] = time.perf_counter() - start
    return run, samples


def ours_from_pipeline(
    experiment: Path,
    task: str,
    budget: int,
    x_obs: np.ndarray,
    settings: dict[str, Any],
    method: str = "npe",
) -> tuple[dict[str, Any], Path]:
    """Our C2ST and training time at ``budget`` from the pipeline run in ``experiment``, and its
    training file; raises unless that run used this budget, these seeds and these observations."""
    folder = experiment / task
    data = folder / "sims" / "train.h5"
    attrs = storage.read_attrs(data, task=task)
    expected = {"num_simulations": budget, "seed": settings["simulate"]["seed"]}
    found = {key: attrs.get(key) for key in expected}
    if found != expected:
        raise SystemExit(f"{data} holds {found}, not {expected}: rerun it or drop --ours-from")
    _, x_run, _ = read_reference(folder / "observations.h5")
    if not np.array_equal(x_run, x_obs):
        raise SystemExit(
            f"{folder / 'observations.h5'} differs from the observations of seed "
            f"{settings['observations']['seed']}: rerun it or drop --ours-from"
        )
    metrics = json.loads((folder / "validation" / "metrics.json").read_text())
    metadata = json.loads((folder / "model" / "posterior.json").read_text())
    if metadata.get("method", "npe") != method:
        raise SystemExit(f"{folder / 'model'} is {metadata.get('method')}, not {method}")
    values = metrics["c2st"]["per_observation"]
    run = {
        "train_seconds": metadata["train_seconds"],
        "epochs": metadata["epochs"],
        "ensemble": metadata.get("ensemble", 1),
        "from": str(folder),
        "c2st": [round(float(v), 4) for v in values],
        "c2st_mean": round(float(np.mean(values)), 4),
    }
    return run, data


def peer(
    task: Task, sims: storage.Simulations, x_obs: np.ndarray, seed: int, method: str
) -> tuple[dict[str, Any], np.ndarray]:
    from sbi import inference as sbi_inference

    # sbi's NLE draws its slice sampler's moves from NumPy's global generator.
    torch.manual_seed(seed)
    np.random.seed(seed)
    finite = storage.finite_rows(sims.x)
    theta = torch.from_numpy(sims.theta[finite]).float()
    x = torch.from_numpy(sims.x[finite].reshape(int(finite.sum()), -1)).float()
    start = time.perf_counter()
    family = getattr(sbi_inference, method.upper())
    inference = family(prior=torch_prior(task), show_progress_bars=False)
    inference.append_simulations(theta, x).train()
    seconds = time.perf_counter() - start
    if method == "nle":
        posterior = inference.build_posterior(
            mcmc_method="slice_np_vectorized", mcmc_parameters={"num_chains": 20}
        )
    else:
        posterior = inference.build_posterior()
    start = time.perf_counter()
    samples = np.stack(
        [
            posterior.sample(
                (NUM_SAMPLES,),
                x=torch.from_numpy(row.reshape(-1)).float(),
                show_progress_bars=False,
            ).numpy()
            for row in x_obs
        ]
    )
    sampling = time.perf_counter() - start
    epochs = inference.summary["epochs_trained"][-1]
    return {"train_seconds": seconds, "sample_seconds": sampling, "epochs": epochs}, samples


def score(reference: np.ndarray, samples: np.ndarray, validate: dict[str, Any]) -> dict[str, Any]:
    """C2ST per observation; an observation without samples (NLE chains that did not converge)
    scores None and the mean is over the others."""
    scored = np.isfinite(samples).all(axis=(1, 2))
    values = np.full(len(samples), np.nan)
    if scored.any():
        values[scored] = c2st_batched(
            reference[scored],
            samples[scored],
            seed=validate["seed"],
            num_folds=validate["c2st_folds"],
        )
    return {
        "c2st": [round(float(v), 4) if ok else None for v, ok in zip(values, scored, strict=True)],
        "c2st_mean": round(float(np.nanmean(values)), 4) if scored.any() else None,
        "num_unconverged": int((~scored).sum()),
    }


def run_task(
    name: str,
    budgets: list[int],
    folder: Path,
    seed: int,
    ours_from: Path | None = None,
    method: str = "npe",
    changes: dict[str, Any] | None = None,
    match_time: bool = False,
    variant: str | None = None,
) -> list[dict[str, Any]]:
    """Both estimators at each of ``budgets`` (module docstring), each entry saved at once."""
    settings = pipeline_settings()
    task = get_task(name)
    observed = settings["observations"]
    observations = folder / f"{name}-observations.h5"
    start = time.perf_counter()
    make_observations(
        task,
        observed["num_observations"],
        observed["num_reference_samples"],
        observed["seed"],
        observations,
    )
    print(f"{name}: reference posteriors in {time.perf_counter() - start:.1f} s", flush=True)
    _, x_obs, reference = read_reference(observations)
    entries = []
    for budget in budgets:
        if ours_from is not None:
            mine, data = ours_from_pipeline(ours_from, name, budget, x_obs, settings, method)
        else:
            data = folder / f"{name}-{budget}.h5"
            plan = simulation.SimulationPlan(
                name, budget, settings["simulate"]["seed"], min(budget, 10**4)
            )
            simulation.run(plan, task, data, SerialComm(), overwrite=True)
        sims = storage.read_simulations(data)
        options = changes
        if match_time:
            theirs = run_peer(task, sims, x_obs, seed, method, reference, settings)
            options = {**(changes or {}), "max_time": theirs["train_seconds"] / 60}
        if ours_from is None:
            mine, samples = ours(
                name, data, folder / f"{name}-{budget}-ours", x_obs, seed, method, options
            )
            mine |= score(reference, samples, settings["validate"])
        print(f"{name} N={budget} ours {mine}", flush=True)
        if not match_time:
            theirs = run_peer(task, sims, x_obs, seed, method, reference, settings)
        entry = {
            "task": name,
            "budget": budget,
            "seed": seed,
            "method": method,
            "ours": mine,
            "sbi": theirs,
            "c2st_mean_difference": None
            if None in (mine["c2st_mean"], theirs["c2st_mean"])
            else round(mine["c2st_mean"] - theirs["c2st_mean"], 4),
        }
        if variant:
            entry["variant"] = variant
        save(entry)  # at once: a later task's failure must not lose this one's figures
        entries.append(entry)
    return entries


def run_peer(
    task: Task,
    sims: storage.Simulations,
    x_obs: np.ndarray,
    seed: int,
    method: str,
    reference: np.ndarray,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The peer trained, sampled and scored (:func:`peer`, :func:`score`)."""
    theirs, samples = peer(task, sims, x_obs, seed, method)
    theirs |= score(reference, samples, settings["validate"])
    print(f"{task.name} N={len(sims.theta)} sbi  {theirs}", flush=True)
    return theirs


def save(entry: dict[str, Any]) -> None:
    """Merges ``entry`` into ``RESULTS``, replacing the one of the same task, budget, seed,
    method and variant (entries without a method are npe's; without a variant, the main ones).

    Holds a lock on the file meanwhile: runs split over cores (``--tasks`` each) share it.
    """
    import fcntl

    import sbi

    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"entries": []}

        def key(e: dict[str, Any]) -> tuple:
            return e["task"], e["budget"], e["seed"], e.get("method", "npe"), e.get("variant", "")

        kept = [e for e in results["entries"] if key(e) != key(entry)]
        results = {
            "machine": {
                "host": platform.node(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "sbi": sbi.__version__,
            },
            "threads": 1,
            "entries": sorted([*kept, entry], key=key),
        }
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--seed", type=int, default=0, help="training seed of both estimators")
    parser.add_argument("--method", choices=METHODS, default="npe", help="estimator family")
    parser.add_argument(
        "--ours-from",
        type=Path,
        help="a pipeline run's results folder (results/EXPERIMENT) to take ours from",
    )
    parser.add_argument(
        "--match-time",
        action="store_true",
        help="train the peer first and cap ours at its training time",
    )
    parser.add_argument(
        "--ours-options",
        type=json.loads,
        default=None,
        help="JSON object of training options over ours' (e.g. '{\"ensemble\": 1}')",
    )
    parser.add_argument(
        "--variant",
        help="store the entries under this name (default: matched with --match-time), "
        "beside the main ones",
    )
    args = parser.parse_args()
    if args.ours_from and (args.match_time or args.ours_options):
        parser.error("--match-time and --ours-options train ours here: drop --ours-from")
    variant = args.variant or ("matched" if args.match_time else None)
    if args.ours_options is not None and not isinstance(args.ours_options, dict):
        parser.error("--ours-options must be a JSON object of training options")
    if args.ours_options and not variant:
        parser.error("--ours-options changes ours: name the entries with --variant")
    if args.ours_options:
        # Refused options (an unknown key, a value out of range) stop here, before any work.
        for name in args.tasks:
            project_config(name, args.seed, args.method, args.ours_options)
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        entries = [
            e
            for name in args.tasks
            for e in run_task(
                name,
                args.budgets,
                folder,
                args.seed,
                args.ours_from,
                args.method,
                args.ours_options,
                args.match_time,
                variant,
            )
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for e in entries:
        print(
            f"{e['task']:>16} N={e['budget']:>6}: ours {e['ours']['c2st_mean']} "
            f"({e['ours']['train_seconds']:.0f} s), sbi {e['sbi']['c2st_mean']} "
            f"({e['sbi']['train_seconds']:.0f} s), difference {e['c2st_mean_difference']}"
        )


if __name__ == "__main__":
    sys.exit(main())

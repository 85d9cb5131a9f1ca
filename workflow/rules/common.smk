# Checks and small input functions shared by the rules; logic that grows belongs in src/pipeline.
import functools
import glob
import hashlib
import inspect
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

from pipeline.atomic import write_text as atomic_write
from pipeline.provenance import fingerprint
from pipeline.options import (
    CALIBRATION_ONLY,
    SampleOptions,
    SearchOptions,
    SimulateOptions,
    TruncateOptions,
)
from pipeline.rounds.records import round_seed
from pipeline.tasks import get_task
from pipeline.tasks.experiment import resolve_tasks
from pipeline.train_config import TrainConfig


def task_spec(name):
    """What `pipeline --task` takes for a configured task: its task_modules entry, or itself."""
    return config["task_modules"].get(name, name)


TASK_OBJECTS = resolve_tasks(
    config["tasks"],
    config["task_modules"],
    config["data"],
    config["observed"],
    config["task_train"],
    config["simulate"]["budgets"],
    mocks=config["mocks"],
    num_reference_samples=config["observations"]["num_reference_samples"],
)
ROUNDS = config["rounds"]
ROUNDED = ROUNDS["tasks"]
NUM_ROUNDS = len(ROUNDS["simulations"])
# The smallest prior mass of a region decides only whether a round stops, never what it
# computes, so the jobs get it outside their params: lowering it, as a round's error advises,
# reruns none of the rounds already made.
MIN_PRIOR_MASS = ROUNDS["min_prior_mass"]
# Tasks whose training set the simulate rules make, and whose model the train rule trains;
# rounded tasks get both from their rounds (rounds.smk).
SIMULATED = [n for n in config["tasks"] if n not in config["data"] and n not in ROUNDED]
TRAINED = [n for n in config["tasks"] if n not in ROUNDED]
IMPORTED = [name for name in config["tasks"] if name in config["data"]]
OBSERVED = [name for name in config["tasks"] if name in config["observed"]]
SYNTHETIC = [name for name in config["tasks"] if name not in config["observed"]]


def stamp(path, value):
    """``path``: a job's input recording ``value`` (JSON), rewritten when ``value`` changes.

    The job's outputs are then older than one of its inputs, so Snakemake reruns it by file
    times alone, also where its own records of params and inputs are missing or not asked (a
    results folder another working directory made, ``.snakemake`` removed, ``--rerun-triggers
    mtime``). A record made for the first time is dated 1970: it reruns nothing by existing.
    Only a run rewrites or makes one, and only while no other run holds this directory's locks
    (Snakemake takes its lock after building the DAG, so a run it then refuses would have
    rewritten the record of a config it never ran, which the running one's outputs would then
    seem to match). A dry run, or a run beside a locked one, gives the job a file of its own in
    ``dry-run/`` instead (dated 1970 where no record exists yet), so that its plan is right."""
    path = Path(path)
    text = json.dumps(value, sort_keys=True, default=str) + "\n"
    try:
        recorded = path.read_text()
    except FileNotFoundError:
        recorded = None
    if recorded == text:
        return str(path)
    if not workflow.is_main_process:
        return str(path)  # a cluster job's own Snakemake: its run wrote the records
    if running_unlocked():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
        if recorded is None:
            os.utime(path, (0, 0))
        written(path)
        for preview in (path.parent / "dry-run").glob(f"{glob.escape(path.stem)}-*.json"):
            preview.unlink(missing_ok=True)
        return str(path)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    preview = path.parent / "dry-run" / f"{path.stem}-{digest}.json"
    preview.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(preview, text)
    if recorded is None:
        os.utime(preview, (0, 0))
    written(preview)
    return str(preview)


def written(path):
    """Tells Snakemake's records of files that ``path`` has just been written. Snakemake lists
    a folder once per DAG build (its inventory) and takes a file missing from that listing as
    absent, so a stamp written after another one in its folder (two targets, a new wildcard)
    would stop the run with a MissingInputException; with ``--trust-io-cache`` it takes files'
    times from the last dry run's records, so a rewritten stamp would read as old and its
    change be missed."""
    workflow.iocache.exists_local[str(path)] = True
    workflow.iocache.mtime.pop(str(path), None)
    workflow.iocache.size.pop(str(path), None)


def running_unlocked():
    """Whether this is a run (not a dry run or a listing) that no other run of this working
    directory holds locks against (or one that takes none: ``--nolock``)."""
    if workflow.executor_plugin is None or workflow.dryrun:
        return False
    if not workflow.execution_settings.lock:
        return True
    locks = Path(workflow.persistence.path) / "locks"
    return not any(locks.glob("*.lock"))


def params_stamp(rule, by=None, skip=()):
    """An input function for ``rule``: the stamp of its job's params (those computed from the
    config and wildcards; not those of its input or output paths, nor ``skip``), named by the
    task and the wildcards ``by`` (default: all)."""

    def stamp_input(wildcards):
        values = {}
        for name, value in workflow.get_rule(rule).params.items():
            if name in skip:
                continue
            if callable(value):
                if len(inspect.signature(value).parameters) > 1:
                    continue  # a function of input or output paths
                value = value(wildcards)
            values[name] = value
        keys = [k for k in wildcards.keys() if k != "task" and (by is None or k in by)]
        name = "-".join([rule, *(f"{k}={wildcards[k]}" for k in sorted(keys))])
        folder = EXPERIMENT / wildcards.task if "task" in wildcards.keys() else EXPERIMENT
        return stamp(folder / "stamps" / f"{name}.json", values)

    return stamp_input


def fingerprinted(task, kind, paths):
    """``paths`` (a user's files) with the stamp of their fingerprint: Snakemake reruns a job
    when an input is newer than its outputs, and a file replaced by another with an older time
    (``cp -p``, ``rsync -a``, ``mv``) would be missed, but its fingerprint changes the stamp."""
    if not paths:
        return []
    record = EXPERIMENT / task / "stamps" / f"{kind}-files.json"
    # The bytes alone: the same files in a moved or another checkout are the same definition.
    value = {"fingerprint": fingerprint_once(tuple(map(str, paths)))}
    return [*map(os.path.relpath, paths), stamp(record, value)]


@functools.cache
def fingerprint_once(paths):
    """fingerprint() of ``paths`` once per run: a scattered task asks for it for every chunk
    job, and the files do not change while the DAG is built."""
    return fingerprint([Path(p) for p in paths])


def task_files(wildcards):
    """The files that define a user's task (its Python file, task file, program) and their
    record: editing one reruns what the task simulates."""
    return fingerprinted(wildcards.task, "task", TASK_OBJECTS[wildcards.task].source_files)


MOCK_OBJECTS = {name: get_task(spec) for name, spec in config["mocks"].items()}


def mock_files(wildcards):
    """The files that define the task's mock model, if it has one (as task_files)."""
    mock = MOCK_OBJECTS.get(wildcards.task)
    return [] if mock is None else fingerprinted(wildcards.task, "mock", mock.source_files)


def mock_arguments(name):
    """['--mock-of', SPEC] for a task whose observations are mocks of another model, else []
    (quoted one by one in the shell command)."""
    spec = config["mocks"].get(name)
    return [] if spec is None else ["--mock-of", spec]


def one_of(names):
    """A wildcard constraint matching exactly ``names`` (and nothing when there are none)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def source_file(source):
    """The file of a data source: 'file.npy', 'archive.npz:member' or 'file.h5:dataset'."""
    from pipeline.importing import parse_source

    return str(parse_source(source).path)


def import_rows(wildcards):
    """Rows of the data archive for one split: the last num_test rows are the test set."""
    num_test = config["data"][wildcards.task]["num_test"]
    return f":-{num_test}" if wildcards.split == "train" else f"-{num_test}:"


def check_predictive_draws():
    """Refuses, before any job, predictive draws that the validate stage would refuse at the end.

    The predictive check estimates the covariance of x's summaries (x itself except for maps)
    from its draws (pipeline.predictive_draws); the draws are simulated from posterior samples,
    so there must be as many.
    """
    from pipeline.predictive_draws import min_predictive_draws

    draws = config["validate"]["predictive_draws"]
    for name, task in TASK_OBJECTS.items():
        if not task.has_simulator:
            continue  # no predictive checks without a simulator
        needed = min_predictive_draws(task.summary_size)
        if draws < needed:
            raise ValueError(
                f"validate.predictive_draws={draws} is too few for task {name}, whose x has "
                f"{task.summary_size} summary values: the predictive check needs at least "
                f"{needed} draws; set it to at least {needed}"
            )
    for key in ("num_test_samples", "num_observation_samples"):
        if draws > config["sample"][key]:
            raise ValueError(
                f"validate.predictive_draws={draws} exceeds sample.{key}="
                f"{config['sample'][key]}: each draw simulates one posterior sample; lower the "
                f"first or raise the second"
            )


check_predictive_draws()


def check_test_seed():
    """Refuses test simulations drawn with the training simulations' seed: they would be the
    training set's first rows, and coverage measured on data the model was fitted to (rounds
    derive each round's seed, and imports have none, so only tasks simulated from the prior)."""
    if SIMULATED and config["simulate"]["test_seed"] == config["simulate"]["seed"]:
        raise ValueError(
            f"simulate.test_seed and simulate.seed are both {config['simulate']['seed']}: the "
            "test simulations would repeat the training set's first rows; give test_seed "
            "another value"
        )


check_test_seed()


def check_observations_seed():
    """Refuses synthetic observations drawn with a seed of the simulations: observation ``j``'s
    generator is seeded as simulation block ``j``'s, so its parameters (and, with a
    ``seed_block_size`` of 1, its x) would repeat training or test rows."""
    seeds = {"simulate.seed": config["simulate"]["seed"]}
    seeds["simulate.test_seed"] = config["simulate"]["test_seed"]
    for key, seed in seeds.items():
        if set(SIMULATED) & set(SYNTHETIC) and config["observations"]["seed"] == seed:
            raise ValueError(
                f"observations.seed and {key} are both {seed}: the synthetic observations "
                "would repeat rows of those simulations; give observations.seed another value"
            )


check_observations_seed()

EXPERIMENT = Path(config["results"]) / config["experiment"]


def task_path(name):
    """A file of one task's outputs: RESULTS/EXPERIMENT/{task}/NAME."""
    return str(EXPERIMENT / "{task}" / name)


def log_path(name):
    return str(EXPERIMENT / "logs" / name)


def benchmark_path(name):
    return str(EXPERIMENT / "benchmarks" / name)



wildcard_constraints:
    task=one_of(config["tasks"]),
    # train-N: the first N training simulations, for the budget study (simulate.budgets).
    split=r"train|test|train-\d+",
    budget=r"\d+",


def split_count(split):
    if split.startswith("train-"):
        return int(split.removeprefix("train-"))
    key = "num_simulations" if split == "train" else "num_test_simulations"
    return config["simulate"][key]


def simulation_count(wildcards):
    return split_count(wildcards.split)


def simulation_seed(wildcards):
    # Simulation i depends on (seed, i) only, so train-N holds exactly train.h5's first N rows
    # (or extends it): the budgets are nested.
    key = "test_seed" if wildcards.split == "test" else "seed"
    return config["simulate"][key]


def stage_options(options, section, **values):
    """The config's ``section`` keys that ``options`` (a pipeline.options class) names, with
    ``values`` on top, as the stage's ``--options`` JSON: an option added to the schema and the
    dataclass reaches the stage with no change here."""
    names = {field.name for field in fields(options)}
    chosen = {key: value for key, value in config[section].items() if key in names}
    return json.dumps(chosen | values, sort_keys=True)


def simulate_options(wildcards):
    """The simulate stage's options for one split: its count and seed."""
    split = {"num_simulations": simulation_count(wildcards), "seed": simulation_seed(wildcards)}
    return stage_options(SimulateOptions, "simulate", **split)


BUDGETS = sorted(config["simulate"]["budgets"])
# The budgets that need a model of their own: num_simulations is the main model's, unless a
# search chose that model's options (a budget curve keeps the task's options at every point).
TRAINED_BUDGETS = [
    n for n in BUDGETS if n != config["simulate"]["num_simulations"] or config["search"]["tasks"]
]


def reuses_main_model(wildcards):
    """Whether one task's budget is its main model's: the same simulations and options."""
    same_data = int(wildcards.budget) == config["simulate"]["num_simulations"]
    return same_data and wildcards.task not in config["search"]["tasks"]


def budget_training_data(wildcards):
    """The first N training simulations; at num_simulations, the training file itself."""
    if int(wildcards.budget) == config["simulate"]["num_simulations"]:
        return task_path("sims/train.h5")
    return task_path("sims/train-{budget}.h5")


def budget_scores(task):
    """The C2ST files of one task's budget study (none when simulate.budgets is empty)."""
    return [task_path("budget-{budget}/c2st.json").format(task=task, budget=n) for n in BUDGETS]


def budget_observation_samples(wildcards):
    """Posterior samples at the observations for one budget; the main model's at its budget."""
    if reuses_main_model(wildcards):
        return task_path("samples/observations.h5")
    return task_path("budget-{budget}/samples/observations.h5")


def chunk_files(path, n):
    """The shards of ``n`` simulations into the file ``path``, named as `pipeline simulate
    --chunk` writes them."""
    size = config["simulate"]["chunk_size"]
    return [
        f"{path}.shards/chunk-{start:012d}-{min(start + size, n):012d}.h5"
        for start in range(0, n, size)
    ]


def shard_files(task, split):
    """The shard files of one split, named as `pipeline simulate --chunk` writes them."""
    path = task_path(f"sims/{split}.h5").format(task=task)
    return chunk_files(path, split_count(split))


def round_shard_files(task, index):
    """The shard files of one task's round ``index`` (simulate.scatter)."""
    path = round_path(index, "sims.h5").format(task=task)
    return chunk_files(path, ROUNDS["simulations"][index])


def all_shards():
    """Every shard of every task and split, and of every round, when simulate.scatter is on
    (else none).

    They are targets of `all`: the virtual merge reads them, and Snakemake regenerates a
    deleted file only if something still asks for it.
    """
    if not config["simulate"]["scatter"]:
        return []
    splits = [
        shard
        for task in SIMULATED
        for split in ("train", "test")
        for shard in shard_files(task, split)
    ]
    rounds = [
        shard
        for task in ROUNDED
        for index in range(NUM_ROUNDS)
        for shard in round_shard_files(task, index)
    ]
    return splits + rounds


def train_environment(wildcards):
    """The conda environment of one task's training: torch's CUDA build for accelerator gpu."""
    gpu = json.loads(train_options(wildcards))["accelerator"] == "gpu"
    return str(Path(workflow.basedir) / "envs" / ("train-gpu.yaml" if gpu else "pipeline.yaml"))


SEARCH = config["search"]
SEARCHED = SEARCH["tasks"]


def check_search():
    """Refuses, before any job starts, a search of an unlisted task or of an invalid space."""
    if not SEARCHED:
        return
    unknown = [name for name in SEARCHED if name not in config["tasks"]]
    if unknown:
        raise ValueError(
            f"search.tasks names {', '.join(unknown)}, not in tasks ({', '.join(config['tasks'])})"
        )
    # Imports Optuna, so only when a search is configured.
    from pipeline.search.space import SearchSpace

    space = SearchSpace.from_dict(SEARCH["space"], "search.space")
    for name in SEARCHED:
        space.check_against(task_train_config(name), f"search.space (task {name})")


def search_trial_options():
    """The search options a trial depends on: not trials or tolerance, so that adding trials or
    choosing again keeps the trials already run."""
    options = json.loads(stage_options(SearchOptions, "search"))
    return json.dumps({k: v for k, v in options.items() if k not in ("trials", "tolerance")})


def search_trials(task):
    """The score files of every trial of one task's search."""
    name = "search/trial-{trial:03d}/score.json"
    return [task_path(name).format(task=task, trial=i) for i in range(SEARCH["trials"])]


def search_history(wildcards):
    """The scores a trial is proposed from: every trial of the earlier generations."""
    start = int(wildcards.trial) // SEARCH["parallel"] * SEARCH["parallel"]
    return search_trials(wildcards.task)[:start]


def search_choice(wildcards):
    """The searched options of a task's main model (none for budget models, which keep the
    task's options: a choice made at one number of simulations need not suit another)."""
    if wildcards.task not in SEARCHED or "budget" in wildcards.keys():
        return []
    return [task_path("search/best.json").format(task=wildcards.task)]


def chosen_flag(wildcards):
    """`pipeline train`'s --chosen FILE when a search chose the options (else nothing)."""
    return [flag for path in search_choice(wildcards) for flag in ("--chosen", path)]


def task_train_config(name):
    """One task's training options, checked together (an option of another method, a mixture
    given transforms): refused before any job, naming where they come from."""
    options = json.loads(train_options(SimpleNamespace(task=name)))
    return TrainConfig.from_dict(options, f"train and task_train.{name} (the options of {name})")


def train_options(wildcards):
    """Training options as JSON: the defaults overridden per task, sorted for a stable params."""
    options = {**config["train"], **config["task_train"].get(wildcards.task, {})}
    # Off, the penalty on over-confidence's options shape nothing: left out, they do not make
    # Snakemake retrain models whose recorded params lack them. A search that varies the
    # penalty trains with them (pipeline.train_config.TrainConfig.shaping).
    searched = set(SEARCH["space"] or {}) if wildcards.task in SEARCHED else set()
    if not options.get("calibration") and not searched & set(CALIBRATION_ONLY):
        for name in CALIBRATION_ONLY:
            options.pop(name, None)
    return json.dumps(options, sort_keys=True)


for name in config["tasks"]:
    task_train_config(name)
check_search()


def check_rounds():
    """Refuses, before any job starts, rounds of a task they cannot run for."""
    if not ROUNDED:
        return
    unknown = [name for name in ROUNDED if name not in config["tasks"]]
    if unknown:
        raise ValueError(
            f"rounds.tasks names {', '.join(unknown)}, not in tasks ({', '.join(config['tasks'])})"
        )
    clashes = {
        "data (imported simulations: there is no simulator to run rounds with)": config["data"],
        "search.tasks (a search at one budget would not suit the rounds)": SEARCHED,
    }
    for where, names in clashes.items():
        both = [name for name in ROUNDED if name in names]
        if both:
            raise ValueError(f"rounds.tasks and {where} both name {', '.join(both)}")
    if config["simulate"]["budgets"]:
        raise ValueError(
            "rounds.tasks with simulate.budgets: a budget study trains amortized models on the "
            "prior's simulations, which rounded tasks do not make; run them as two experiments"
        )
    synthetic = [name for name in ROUNDED if name in SYNTHETIC]
    count = config["observations"]["num_observations"]
    if synthetic and ROUNDS["observation"] >= count:
        raise ValueError(
            f"rounds.observation={ROUNDS['observation']} but observations.num_observations="
            f"{count}: observations count from 0; choose one below {count}"
        )
    from pipeline.observations import read_observed_for

    for name in (name for name in ROUNDED if name in config["observed"]):
        source = config["observed"][name]
        rows = len(read_observed_for(TASK_OBJECTS[name], source)[1])
        if ROUNDS["observation"] >= rows:
            raise ValueError(
                f"rounds.observation={ROUNDS['observation']} but observed.{name} ({source}) "
                f"holds {rows} observation(s): they count from 0; choose one below {rows}"
            )
    TruncateOptions.from_dict(json.loads(truncate_options()), "rounds")


def truncate_options():
    """The truncate stage's options: the rounds section's keys that TruncateOptions names but
    min_prior_mass (MIN_PRIOR_MASS), mcmc_extensions only where it is not its default (an NPE
    round never uses it, and a new key in a job's params would rerun every round made before
    it existed)."""
    options = json.loads(stage_options(TruncateOptions, "rounds"))
    del options["min_prior_mass"]
    default = TruncateOptions.mcmc_extensions
    if options.get("mcmc_extensions") == default:
        del options["mcmc_extensions"]
    return json.dumps(options, sort_keys=True)


def round_path(index, name):
    """A file of round ``index`` of a task: rounds/round-INDEX/NAME (``{round}`` kept as is)."""
    return task_path(f"rounds/round-{index}/{name}")


def region_files(task, last):
    """Round ``last``'s truncation, then the posteriors (weights, JSON) of rounds 0..``last``
    that define its nested region."""
    files = [round_path(last, "truncation.json")]
    for index in range(last + 1):
        files += [round_path(index, f"model/posterior.{suffix}") for suffix in ("pt", "json")]
    return [path.format(task=task) for path in files]


def region_models(files):
    """The model folders among ``region_files``, round 0's first."""
    return [str(Path(path).parent) for path in files if path.endswith(".pt")]


def models_flag(models):
    """`--region-models DIR...` for the earlier rounds' posteriors (none for round 0's)."""
    return ["--region-models", *models] if models else []


def round_proposal(wildcards):
    """The files round ``wildcards.round`` draws its parameters by (the test simulations: the
    round after the last): none for round 0 (the prior), else the previous round's region,
    which is also the region round ``wildcards.round``'s own truncation lies inside."""
    index = int(wildcards.round) if "round" in wildcards.keys() else NUM_ROUNDS
    return region_files(wildcards.task, index - 1) if index > 0 else []


def round_simulations(wildcards):
    """The simulation files of rounds 0..``wildcards.round``, in order."""
    indices = range(int(wildcards.round) + 1)
    return [round_path(index, "sims.h5").format(task=wildcards.task) for index in indices]


def proposal_flags(wildcards, input):
    """`pipeline simulate`'s --truncation FILE --model DIR [--region-models DIR...] for a
    proposal (none for the prior)."""
    if not input.proposal:
        return []
    models = region_models(input.proposal)
    return ["--truncation", input.proposal[0], "--model", models[-1], *models_flag(models[:-1])]


def train_region_flags(wildcards, input):
    """`pipeline train`'s --truncation FILE --region-models DIR... for a round after the first:
    the region its simulations were drawn from and every posterior that defines it."""
    if not input.proposal:
        return []
    return ["--truncation", input.proposal[0], *models_flag(region_models(input.proposal))]


def within_flags(wildcards, input):
    """`pipeline truncate`'s --within FILE --region-models DIR... (none for round 0)."""
    if not input.within:
        return []
    return ["--within", input.within[0], *models_flag(region_models(input.within))]


def round_simulate_options(wildcards):
    """Round simulations: the round's count, and a seed of (simulate.seed, round)."""
    index = int(wildcards.round)
    split = {
        "num_simulations": ROUNDS["simulations"][index],
        "seed": round_seed(config["simulate"]["seed"], index),
    }
    return stage_options(SimulateOptions, "simulate", **split)


def round_test_options(wildcards):
    """Test simulations of a rounded task: drawn from the last region, seeded apart from the
    rounds by (simulate.test_seed, number of rounds)."""
    split = {
        "num_simulations": config["simulate"]["num_test_simulations"],
        "seed": round_seed(config["simulate"]["test_seed"], NUM_ROUNDS),
    }
    return stage_options(SimulateOptions, "simulate", **split)


def observations_of(wildcards):
    """The observations a task's posterior is sampled and validated at: a rounded task's is
    the one its rounds aim at (its posterior is valid only there)."""
    if wildcards.task in ROUNDED:
        return task_path("rounds/observation.h5")
    return task_path("observations.h5")


def test_region(wildcards):
    """The region a rounded task's test simulations were drawn from (its last round's), with
    the posteriors that define it: their posterior samples are restricted to it. None for
    amortized tasks."""
    if wildcards.task not in ROUNDED:
        return []
    return region_files(wildcards.task, NUM_ROUNDS - 1)


def region_flags(wildcards, input):
    """`pipeline sample`'s --truncation FILE [--region-models DIR...] for test simulations from
    a region (else none); the last round's posterior is the sampled model itself."""
    if not input.region:
        return []
    return ["--truncation", input.region[0], *models_flag(region_models(input.region)[:-1])]


def round_counts():
    """Rounds of each task, in config order (0: amortized), for the report."""
    return [str(NUM_ROUNDS if name in ROUNDED else 0) for name in config["tasks"]]


def round_files(task):
    """The truncations of a rounded task's rounds (none for the others), for the report."""
    if task not in ROUNDED:
        return []
    return [round_path(index, "truncation.json").format(task=task) for index in range(NUM_ROUNDS)]


check_rounds()


# Resources a profile may set: Snakemake's own, the SLURM executor's, and the rules' `mpi`
# (the command that starts ranks) and `tasks`. Anything else is most likely a typo that a
# scheduler would silently ignore, so it stops the run before any job is submitted.
KNOWN_RESOURCES = {
    *("mem_mb", "mem_mib", "mem", "disk_mb", "disk_mib", "disk", "runtime", "tmpdir"),
    *("_cores", "_nodes", "mpi", "tasks", "nodes", "tasks_per_node", "tasks_per_gpu"),
    *("cpus_per_task", "cpus_per_gpu", "mem_mb_per_cpu", "gpu", "gpus", "gpu_model", "gres"),
    *("slurm_partition", "slurm_account", "slurm_extra", "slurm_cluster", "cluster"),
    *("clusters", "constraint", "qos", "nvidia_gpu"),
}
# Rules of either simulate layout (simulate.scatter), so one profile serves both.
LAYOUT_RULES = {"simulate", "simulate_chunk", "merge_simulations"}
# Rules that exist only when a search is configured (search.tasks), so one profile serves both.
SEARCH_RULES = {"search_trial", "search_select"}
# Rules that exist only when rounds are configured (rounds.tasks).
ROUND_RULES = {
    *("select_observation", "round_simulate", "round_stack", "round_train", "truncate"),
    *("round_model", "round_test_simulate", "round_simulate_chunk", "merge_round"),
}


def check_profile_resources(workflow):
    """Raises naming any resource or rule in the profile's resources that nothing uses."""
    settings = workflow.resource_settings
    named = {"default-resources": dict(settings.default_resources or {})}
    rules = {r.name for r in workflow.rules} | LAYOUT_RULES | SEARCH_RULES | ROUND_RULES
    for name, resources in settings.overwrite_resources.items():
        if name not in rules:
            raise ValueError(
                f"set-resources names {name!r}, which is not a rule of this workflow "
                f"(its rules are {', '.join(sorted(rules))})"
            )
        named[f"set-resources of {name!r}"] = dict(resources)
    for where, resources in named.items():
        unknown = sorted(set(resources) - KNOWN_RESOURCES)
        if unknown:
            raise ValueError(
                f"{where}: unknown resource(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(KNOWN_RESOURCES))}"
            )


def rebuild_index():
    """`pipeline index` of this Python (whatever PATH the run was started with), where one
    exists; never masks the run's own outcome."""
    import subprocess
    import sys

    results = Path(config["results"])
    if (results / "index.html").exists():
        main = "import pipeline.cli as c; raise SystemExit(c.main())"
        command = [sys.executable, "-c", main, "index", "--results", str(results)]
        command += ["--out", str(results / "index.html"), "--overwrite"]
        command += ["--log", log_path("index.log")]
        try:
            subprocess.run(command, check=False)
        except OSError as error:
            print(f"could not rebuild {results / 'index.html'}: {error}")


def mark_run(running):
    """Marks the experiment as having a run under way, or none; then rebuilds the index."""
    from pipeline.report.index import mark_run as mark

    try:
        mark(EXPERIMENT, running)
    except OSError as error:
        print(f"could not mark the run in {EXPERIMENT}: {error}")
    rebuild_index()

# Checks and small input functions shared by the rules; logic that grows belongs in src/pipeline.
import json
from pathlib import Path

from pipeline.tasks import TASKS

unknown = sorted(set(config["tasks"]) - set(TASKS))
if unknown:
    raise ValueError(
        f"config 'tasks': unknown task(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TASKS))}"
    )

EXPERIMENT = Path(config["results"]) / config["experiment"]


def task_path(name):
    """A file of one task's outputs: RESULTS/EXPERIMENT/{task}/NAME."""
    return str(EXPERIMENT / "{task}" / name)


def log_path(name):
    return str(EXPERIMENT / "logs" / name)


def benchmark_path(name):
    return str(EXPERIMENT / "benchmarks" / name)



wildcard_constraints:
    task="|".join(config["tasks"]),
    split="train|test",


def simulation_count(wildcards):
    key = "num_simulations" if wildcards.split == "train" else "num_test_simulations"
    return config["simulate"][key]


def simulation_seed(wildcards):
    key = "seed" if wildcards.split == "train" else "test_seed"
    return config["simulate"][key]


def train_options(wildcards):
    """Training options as JSON: the defaults overridden per task, sorted for a stable params."""
    options = {**config["train"], **config["task_train"].get(wildcards.task, {})}
    return json.dumps(options, sort_keys=True)

"""The Snakemake layer: config validation, lint, and a tiny end-to-end run of the DAG."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pipeline import storage
from pipeline.tasks import TASKS
from tests.conftest import (
    ROOT,
    assert_same_outputs,
    copy_workflow,
    planned_jobs,
    run_snakemake,
)
from tests.test_browser import render

CORE_TASKS = ["gaussian_linear", "two_moons", "sn_cosmology"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path)


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, "--cores", "2", *args, check=check)


def write_config(workdir: Path, **changes: object) -> Path:
    config = yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text())
    config.update(changes)
    path = workdir / "test-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_plans_every_stage(workdir):
    result = snakemake(workdir, "-n")
    for rule in (
        "simulate",
        "observe",
        "train",
        "sample_test",
        "sample_observations",
        "validate",
        "report",
    ):
        assert re.search(rf"^{rule}\s+\d+", result.stdout, re.MULTILINE), rule


def test_lint_is_clean(workdir):
    result = snakemake(workdir, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_quote_every_path_and_string_they_pass_to_the_shell():
    # The schema restricts the config's paths; quoting is the second wall, so that no value a
    # config can carry ever reaches the shell unquoted.
    unquoted = [
        f"{path.name}: {match}"
        for path in sorted((ROOT / "workflow/rules").glob("*.smk"))
        for match in re.findall(r"\{(?:input|output|log|params)[^}:]*\}", path.read_text())
    ]
    assert not unquoted, unquoted


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": ["two_moon"]}, r"config 'tasks': two_moon: unknown task 'two_moon'"),
        ({"tasks": ["../x"]}, r"'../x' does not match"),
        ({"results": "r; touch /tmp/pwned #"}, r"'r; touch /tmp/pwned #' does not match"),
        ({"results": "my results"}, r"'my results' does not match"),
        ({"results": "a/../../etc"}, r"'a/../../etc' does not match"),
        ({"experiment": ".."}, r"'..' does not match"),
        (
            {"task_modules": {"mine": "no/such/file.py:Mine"}, "tasks": ["mine"]},
            r"config 'tasks': mine: task 'no/such/file.py:Mine': no/such/file.py does not exist",
        ),
        (
            {"task_modules": {"mine": "x.py:A; touch /tmp/pwned"}, "tasks": ["mine"]},
            r"does not match",
        ),
        ({"observed": {"slcp": "x.npy"}}, r"config 'observed' names slcp, which config 'tasks'"),
        ({"task_train": {"two_moonz": {}}}, r"config 'task_train' names two_moonz: unknown task"),
        ({"simulate": {"num_simulations": 0}}, r"0 is less than the minimum of 1"),
        (
            {"simulate": {"seed": 2, "test_seed": 2}},
            r"simulate.test_seed and simulate.seed are both 2: the test simulations would repeat",
        ),
        (
            {"observations": {"seed": 1}},
            r"observations.seed and simulate.seed are both 1: the synthetic observations would",
        ),
        (
            {"simulat": {"num_simulations": 10}},
            r"Additional properties are not allowed \('simulat'",
        ),
        ({"train": {"lerning_rate": 0.1}}, r"'lerning_rate' was unexpected"),
        (
            {"validate": {"predictive_draws": 40}},
            r"predictive_draws=40 is too few for task sn_cosmology, whose x has 40 summary "
            r"values",
        ),
        (
            {"validate": {"predictive_draws": 200}, "sample": {"num_test_samples": 100}},
            r"predictive_draws=200 exceeds sample.num_test_samples=100",
        ),
        (
            {"search": {"tasks": ["slcp"], "space": {"transforms": {"low": 1, "high": 3}}}},
            r"search.tasks names slcp, not in tasks",
        ),
        ({"search": {"tasks": ["two_moons"]}}, r"search.space: expected a mapping of training"),
        (
            {"search": {"tasks": ["two_moons"], "space": {"seed": {"low": 0, "high": 3}}}},
            r"search.space.seed: seed cannot be searched",
        ),
        (
            {"search": {"tasks": ["two_moons"], "space": {"flow": {"choices": ["glow"]}}}},
            r"search.space.flow: flow must be one of 'auto', 'nsf', 'maf', 'naf', 'mdn', "
            "got 'glow'",
        ),
        (
            {
                "search": {
                    "tasks": ["two_moons"],
                    "space": {
                        "method": {"choices": ["npe", "fmpe"]},
                        "transforms": {"low": 1, "high": 3},
                    },
                }
            },
            r"search.space \(task two_moons\): transforms cannot be searched where method",
        ),
        (
            {"rounds": {"tasks": ["slcp"]}},
            r"rounds.tasks names slcp, not in tasks",
        ),
        (
            {"rounds": {"tasks": ["two_moons"], "observation": 2}},
            r"rounds.observation=2 but observations.num_observations=2: observations count from",
        ),
        (
            {"rounds": {"tasks": ["two_moons"]}, "simulate": {"budgets": [100]}},
            r"rounds.tasks with simulate.budgets",
        ),
        (
            {"rounds": {"tasks": ["two_moons"], "draws": 1000}},
            r"rounds: quantile 0.0001 of 1000 draws rests on fewer than 10 draws",
        ),
        ({"rounds": {"tasks": ["two_moons"], "simulations": []}}, r"\[\] should be non-empty"),
        (
            # config.yaml's block of gaussian_linear sets transforms, which fmpe does not have:
            # refused before the simulations, naming both places the options come from.
            {"tasks": ["gaussian_linear"], "train": {"method": "fmpe"}},
            r"train and task_train.gaussian_linear \(the options of gaussian_linear\): method "
            r"fmpe has no transforms",
        ),
        (
            {"mocks": {"sn_cosmology": "sn_cosmology_offset"}, "simulate": {"budgets": [300]}},
            r"mocks.sn_cosmology draws task sn_cosmology's observations from another model",
        ),
        (
            {"observations": {"num_reference_samples": 0}, "simulate": {"budgets": [300]}},
            r"observations.num_reference_samples is 0",
        ),
    ],
)
def test_invalid_config_fails_before_any_job(workdir, changes, message):
    config = write_config(workdir, **changes)
    result = snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_numbers_written_as_floats_or_passed_as_text_are_read_as_the_schema_types_them(workdir):
    """YAML reads 6.0e+2 as a float, which JSON Schema accepts as an integer, and Snakemake
    passes nested --config values as text: each is read as its option's type, not planned as
    `--index 1.0` or refused as "'5' is not of type 'integer'"."""
    tiny = yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text())
    simulate = {**tiny["simulate"], "num_simulations": 600.0, "budgets": [300.0]}
    config = write_config(workdir, simulate=simulate)
    override = "task_train={two_moons: {max_epochs: 5, ensemble: 2}}"
    result = snakemake(workdir, "-n", "-p", "--configfile", str(config), "--config", override)
    assert '"num_simulations": 600,' in result.stdout and "budget-300/" in result.stdout
    assert "budget-300.0" not in result.stdout
    options = re.search(
        r"pipeline train --data results/tiny/two_moons/sims/train.h5 .*?--options '([^']*)'",
        result.stdout,
    )
    assert json.loads(options.group(1))["max_epochs"] == 5
    assert json.loads(options.group(1))["ensemble"] == 2


def test_a_rounds_observation_past_the_observed_files_rows_is_refused_before_any_job(workdir):
    np.save(workdir / "x_obs.npy", np.zeros((2, 2)))
    config = write_config(
        workdir,
        tasks=["two_moons"],
        observed={"two_moons": "x_obs.npy"},
        rounds={"tasks": ["two_moons"], "observation": 2},
    )
    result = snakemake(workdir, "-n", "--configfile", str(config), check=False)
    message = r"rounds.observation=2 but observed.two_moons \(x_obs.npy\) holds 2 observation"
    assert result.returncode != 0 and re.search(message, result.stdout + result.stderr)
    assert not (workdir / "results").exists()


def test_schema_lists_no_task_so_adding_one_touches_only_the_registry():
    # Task names are checked by resolving them (common.smk), never against lists in the schema.
    def enums(node: object) -> list:
        if isinstance(node, dict):
            return [*node.get("enum", []), *(e for v in node.values() for e in enums(v))]
        return [e for v in node for e in enums(v)] if isinstance(node, list) else []

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert not set(enums(schema)) & set(TASKS)


@pytest.mark.parametrize(
    "experiment", sorted(p.name for p in (ROOT / "config/experiments").glob("*.yaml"))
)
def test_every_shipped_experiment_plans(workdir, experiment):
    """Each experiment config passes the schema and the plan-time checks, and plans a report."""
    config = workdir / "config/experiments" / experiment
    result = snakemake(workdir, "-n", "--configfile", str(config))
    assert re.search(r"^report\s+1", result.stdout, re.MULTILINE), result.stdout[-2000:]


@pytest.mark.parametrize("name", ["pipeline.yaml", "train-gpu.yaml"])
def test_conda_environment_pins_match_pyproject(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs" / name).read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if "==" in p) == sorted(project)


def test_every_environment_file_is_checked():
    assert sorted(p.name for p in (ROOT / "envs").glob("*.yaml")) == [
        "pipeline.yaml",
        "train-gpu.yaml",
    ]


@pytest.mark.parametrize(("accelerator", "uses_cuda"), [("gpu", True), ("cpu", False)])
def test_gpu_training_uses_the_cuda_environment(workdir, accelerator, uses_cuda):
    config = write_config(workdir, train={"accelerator": accelerator})
    # --containerize resolves every job's conda environment first (and then needs conda, which
    # this machine may lack): the environments it hashes are the ones the DAG uses.
    result = snakemake(workdir, "--containerize", "--configfile", str(config), check=False)
    text = result.stdout + result.stderr
    assert "Hashing conda environment envs/pipeline.yaml" in text, text[-3000:]
    assert ("Hashing conda environment envs/train-gpu.yaml" in text) == uses_cuda


@pytest.mark.slow
def tiny_with_budgets(workdir: Path) -> str:
    """tiny.yaml plus a budget study: 300 (a model of its own) and 600 (the main model's)."""
    tiny = yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text())
    return str(write_config(workdir, simulate={**tiny["simulate"], "budgets": [300, 600]}))


def test_budget_study_plan(workdir):
    result = snakemake(workdir, "-n", "-p", "--configfile", tiny_with_budgets(workdir))
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    tasks = len(CORE_TASKS)
    # 600 = num_simulations reuses the main model: one extra training per task, two scores.
    assert counts["train_budget"] == counts["sample_budget"] == str(tasks)
    assert counts["score_budget"] == str(2 * tasks)
    assert counts["simulate"] == str(3 * tasks)  # train, test and train-300
    assert '"num_simulations": 300, "seed": 1}' in result.stdout  # same seed: nested
    assert re.search(r"--observation-samples \S+/two_moons/samples/observations.h5", result.stdout)
    assert "--budgets 300 600" in result.stdout


def test_a_search_over_the_penalty_trains_every_trial_with_the_penalty_options(workdir):
    """The penalty's draws and rows are left out of a task's options while it is off, but a
    search that varies it trains its trials with them (a user's 16 draws became 8)."""
    space = {"calibration": {"low": 0.5, "high": 5.0}}
    config = write_config(
        workdir,
        tasks=["two_moons"],
        train={"calibration_draws": 16},
        search=SEARCH | {"space": space},
    )
    result = snakemake(workdir, "-n", "-p", "--configfile", str(config))
    trials = re.findall(r"pipeline search-trial .*?--train-options '([^']*)'", result.stdout)
    assert trials and all(json.loads(t)["calibration_draws"] == 16 for t in trials)
    main = re.findall(
        r"pipeline train --data \S+ --out \S+/model .*?--options '([^']*)'", result.stdout
    )
    assert main and json.loads(main[0])["calibration_draws"] == 16


def test_a_searched_tasks_budget_curve_keeps_the_tasks_options_at_every_budget(workdir):
    """The main model of a searched task trains with the search's choice, a budget model with
    the task's options: at num_simulations the curve gets a model of its own, trained on the
    training file itself (not a copy), rather than the main model."""
    tiny = yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text())
    simulate = {**tiny["simulate"], "budgets": [300, 600]}
    config = write_config(workdir, tasks=["two_moons"], simulate=simulate, search=SEARCH)
    result = snakemake(workdir, "-n", "-p", "--configfile", str(config))
    trains = re.findall(r"pipeline train --data (\S+) --out (\S+) (.*)", result.stdout)
    budget_600 = [rest for data, out, rest in trains if "budget-600/" in out]
    assert len(budget_600) == 1 and "--chosen" not in budget_600[0]
    assert [data for data, out, _ in trains if "budget-600/" in out] == [
        "results/tiny/two_moons/sims/train.h5"
    ]
    main = [rest for data, out, rest in trains if out == "results/tiny/two_moons/model"]
    assert len(main) == 1 and "--chosen" in main[0]
    assert re.search(
        r"--observation-samples \S+/two_moons/budget-600/samples/observations.h5", result.stdout
    )


def test_tiny_dag_end_to_end(workdir, chromium):
    config = tiny_with_budgets(workdir)
    snakemake(workdir, "--configfile", config)
    experiment = workdir / "results/tiny"
    html = (experiment / "report.html").read_text()
    for task in CORE_TASKS:
        metrics = json.loads((experiment / task / "validation/metrics.json").read_text())
        coverage = metrics["coverage"]
        assert len(coverage["levels"]) == len(coverage["tarp"]) == len(coverage["hpd"]) == 19
        assert all(0.0 <= v <= 1.0 for v in coverage["tarp"] + coverage["hpd"])
        assert 0.0 <= coverage["tarp_max_deviation"] <= 1.0
        c2st = metrics["c2st"]["per_observation"]
        assert len(c2st) == 2 and all(0.0 <= v <= 1.0 for v in c2st)
        assert len(coverage["predictive"]) == 19
        assert len(metrics["predictive"]["pvalues"]) == 2
        # tiny.yaml refits local C2ST's classifier 19 times: p-values lie in [1/20, 1].
        assert all(0.05 - 1e-9 <= p <= 1.0 for p in metrics["local_c2st"]["pvalue"])
        assert task in html
        assert (experiment / "logs/train" / f"{task}.log").stat().st_size > 0
    assert "data:image/png;base64," in html

    # The budget study: nested simulations, one C2ST file per budget, a section per task.
    with h5py.File(experiment / "two_moons/sims/train.h5") as full:
        with h5py.File(experiment / "two_moons/sims/train-300.h5") as first:
            np.testing.assert_array_equal(first["x"][...], full["x"][:300])
    for task in CORE_TASKS:
        for budget in (300, 600):
            score = json.loads((experiment / task / f"budget-{budget}/c2st.json").read_text())
            assert score["budget"] == budget and len(score["c2st"]["per_observation"]) == 2
    main = json.loads((experiment / "two_moons/validation/metrics.json").read_text())["c2st"]
    reused = json.loads((experiment / "two_moons/budget-600/c2st.json").read_text())["c2st"]
    assert reused == main  # same samples, same classifier seed
    assert html.count("<h3>C2ST against budget</h3>") == len(CORE_TASKS)

    # The real pages in a real browser: every figure decodes, no console message, all sections.
    dom, broken, console = render(chromium, experiment / "report.html", workdir, "tiny-report.png")
    assert broken == 0 and console == [], console
    assert dom.count("<img") >= 5 * len(CORE_TASKS)
    for section in ("summary", "provenance", *(f"task-{task}" for task in CORE_TASKS)):
        assert f'id="{section}"' in dom
    index = workdir / "results/index.html"
    dom, broken, console = render(chromium, index, workdir, "tiny-index.png")
    assert broken == 0 and console == [] and '<a href="tiny/report.html">' in dom

    # Snakemake's own report: the flagged figures, with their captions, in one zip.
    snakemake(workdir, "--configfile", config, "--report", "report.zip")
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        names = archive.namelist()
        main_page = next(n for n in names if n.endswith("report.html") and "/data/" not in n)
        page = archive.read(main_page).decode()
    for figure in ("coverage.png", "sbc.png", "corner.png", "predictive.png"):
        assert sum(name.endswith(f"/{figure}") for name in names) == len(CORE_TASKS)
    assert sum(name.endswith("/report.html") for name in names) == 2  # ours, and its index
    assert "Simulation-based calibration" in page and "sn_cosmology" in page

    # A second run has nothing to do.
    again = snakemake(workdir, "--configfile", config)
    assert "Nothing to be done" in again.stdout + again.stderr

    # A corrupt input makes its stage fail with the file named; earlier outputs survive.
    test_sims = experiment / "two_moons/sims/test.h5"
    test_sims.write_bytes(test_sims.read_bytes()[:2048])
    model = experiment / "two_moons/model/posterior.pt"
    before = model.read_bytes()
    failed = snakemake(
        workdir,
        "--configfile",
        config,
        "--forcerun",
        "sample_test",
        check=False,
    )
    assert failed.returncode != 0
    log = (experiment / "logs/sample/two_moons-test.log").read_text()
    assert "test.h5" in log and "not a readable HDF5 file" in log
    assert model.read_bytes() == before
    assert (experiment / "two_moons/validation/metrics.json").exists()


def test_schema_lists_exactly_the_training_options():
    from dataclasses import fields

    from pipeline.training import TrainConfig

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    options = schema["properties"]["train"]["properties"]
    assert sorted(options) == sorted(f.name for f in fields(TrainConfig))
    for field in fields(TrainConfig):
        default = field.default if not isinstance(field.default, tuple) else list(field.default)
        assert options[field.name]["default"] == default, field.name


def test_experiment_train_options_reach_tasks_unless_overridden_per_task(workdir):
    # task_train must hold only what was written: schema defaults filled into it would mask
    # every option of `train` (they did: a changed train option reran nothing).
    config = write_config(workdir, train={"max_epochs": 7, "gradient_clip": 2.0})
    result = snakemake(workdir, "-n", "-p", "--configfile", str(config))
    options = {
        task: json.loads(text)
        for task, text in re.findall(
            r"pipeline train --data results/tiny/(\w+)/sims/train.h5 .*?--options '([^']*)'",
            result.stdout,
        )
    }
    assert sorted(options) == sorted(CORE_TASKS)
    assert all(o["gradient_clip"] == 2.0 for o in options.values())
    assert options["sn_cosmology"]["max_epochs"] == 7
    # config.yaml's task_train blocks of these two set max_epochs themselves.
    assert options["two_moons"]["max_epochs"] == 300
    assert options["gaussian_linear"]["max_epochs"] == 1000
    # Off, the penalty on over-confidence is left out of the params (and so does not retrain
    # models whose params lack it); on, it reaches the command.
    assert not any("calibration" in o for o in options.values())
    config = write_config(workdir, train={"calibration": 2.0})
    result = snakemake(workdir, "-n", "-p", "--configfile", str(config))
    commands = re.findall(r"pipeline train --data .*?--options '([^']*)'", result.stdout)
    assert commands and all(json.loads(c)["calibration"] == 2.0 for c in commands)


@pytest.mark.parametrize("given_as", ["configfile", "config"])
def test_an_experiments_task_block_replaces_config_yamls_block_of_that_task(workdir, given_as):
    # config.yaml's sn_cosmology block (ensemble 3, embedding_dim 16) is npe's: merged into an
    # nle block, its embedding made train refuse the options.
    # tiny.yaml's global embedding options would be refused for nle's block (before any job).
    tiny = yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text())
    train = {k: v for k, v in tiny["train"].items() if not k.startswith("embedding")}
    block = {"sn_cosmology": {"method": "nle", "flow": "maf"}}
    if given_as == "configfile":
        args = ("--configfile", str(write_config(workdir, train=train, task_train=block)))
    else:
        config = write_config(workdir, train=train)
        args = ("--configfile", str(config), "--config", f"task_train={json.dumps(block)}")
    result = snakemake(workdir, "-n", "-p", *args)
    options = dict(
        re.findall(
            r"pipeline train --data results/tiny/(\w+)/sims/train.h5 .*?--options '([^']*)'",
            result.stdout,
        )
    )
    sn = json.loads(options["sn_cosmology"])
    assert (sn["method"], sn["flow"], sn["ensemble"]) == ("nle", "maf", 1)
    assert sn["embedding_dim"] == 32  # the default: config.yaml's npe block (16) replaced
    # A task the experiment has no block for keeps config.yaml's.
    assert json.loads(options["two_moons"])["max_epochs"] == 300


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train:gpus_per_node=4", "set-resources of 'train': unknown resource(s) gpus_per_node"),
        ("trian:mem_mb=4000", "set-resources names 'trian', which is not a rule"),
    ],
)
def test_profile_typos_stop_the_run_before_any_job(workdir, setting, message):
    result = snakemake(workdir, "-n", "--set-resources", setting, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_slurm_profile_plans_the_dag_with_cluster_resources(workdir):
    # Every resource the shipped SLURM profile sets is known, and the plan resolves them.
    # A dry run caps threads at --cores (SLURM runs do not: threads become --cpus-per-task).
    result = run_snakemake(
        workdir, "-n", "-p", "--cores", "64", profile="workflow/profiles/slurm", check=False
    )
    text = result.stdout + result.stderr
    assert "unknown resource" not in text and "not a rule" not in text
    assert re.search(r"srun --mpi=pmi2 -n 4 pipeline simulate", text), text[-3000:]
    assert "Shell command: srun pipeline train" in text, text[-3000:]
    assert "tasks_per_node=4, gres=gpu:4" in text and "--threads 8" in text


def test_mocks_of_another_model_run_through_the_dag(workdir):
    """sn_cosmology trained on its own simulations, observed through mocks of
    sn_cosmology_offset: the observation file names the mock model, C2ST is skipped with that
    reason, and the report shows the mocks, the recovery of the truths and the tests."""
    config = write_config(
        workdir, tasks=["sn_cosmology"], mocks={"sn_cosmology": "sn_cosmology_offset"}
    )
    snakemake(workdir, "--configfile", str(config))
    experiment = workdir / "results/tiny"
    with h5py.File(experiment / "sn_cosmology/observations.h5") as f:
        assert f.attrs["mock_of"] == "sn_cosmology_offset" and "reference_samples" not in f
    metrics = json.loads((experiment / "sn_cosmology/validation/metrics.json").read_text())
    assert metrics["observations"]["mock_of"] == "sn_cosmology_offset"
    assert metrics["c2st"] is None
    assert "mock observations of another model (sn_cosmology_offset)" in metrics["skipped"]["c2st"]
    assert set(metrics["recovery"]["bias"]) == {"Omega_m", "w0"}
    assert len(metrics["misspecification"]["pvalue"]) == 2
    text = " ".join(re.sub(r"<[^>]+>", " ", (experiment / "report.html").read_text()).split())
    assert "Mock observations of another forward model , sn_cosmology_offset" in text
    assert "Recovery of the true parameters over the 2 observations" in text


SEARCH = {
    "tasks": ["two_moons"],
    "trials": 4,
    "parallel": 2,
    "startup": 2,
    "held_out": 50,
    "coverage_samples": 20,
    "space": {
        "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
        "flow_hidden": {"choices": [[16], [32]]},
    },
}


def test_a_search_runs_as_jobs_and_resumes_without_rerunning_finished_trials(workdir):
    """A search stopped after its first generation (trials 0 and 1 done) resumes with trials 2
    and 3 only; the task's model is trained with the chosen options and the report shows the
    trials."""
    config = write_config(workdir, tasks=["two_moons"], search=SEARCH)
    search = Path("results/tiny/two_moons/search")
    first = [search / f"trial-{i:03d}/score.json" for i in (0, 1)]
    snakemake(workdir, *map(str, first), "--configfile", str(config))
    search, first = workdir / search, [workdir / path for path in first]
    assert not (search / "trial-002").exists()
    stamps = [path.stat().st_mtime_ns for path in first]
    result = snakemake(workdir, "--configfile", str(config))
    assert ran_trials(result) == ["002", "003"], result.stdout + result.stderr
    assert [path.stat().st_mtime_ns for path in first] == stamps
    choice = json.loads((search / "best.json").read_text())
    posterior = json.loads((workdir / "results/tiny/two_moons/model/posterior.json").read_text())
    assert posterior["search"]["chosen"] == choice["chosen"]
    for name, value in choice["options"].items():
        assert posterior["train_config"][name] == value
    assert [row["trial"] for row in choice["trials"]] == [0, 1, 2, 3]
    trial_2 = json.loads((search / "trial-002/score.json").read_text())
    assert trial_2["history"] == [0, 1]
    text = " ".join(
        re.sub(r"<[^>]+>", " ", (workdir / "results/tiny/report.html").read_text()).split()
    )
    assert "Hyperparameter search" in text
    assert f"Chosen: trial {choice['chosen']}" in text
    assert "each 1 flow trained on the same simulations (the model above is the task's" in text
    # Two more trials, or another tolerance, keep the four run.
    more = write_config(
        workdir, tasks=["two_moons"], search=SEARCH | {"trials": 6, "tolerance": 2}
    )
    assert ran_trials(snakemake(workdir, "-n", "--configfile", str(more))) == ["004", "005"]


def ran_trials(result: subprocess.CompletedProcess) -> list[str]:
    """The search trials a Snakemake run (or plan) printed, by number."""
    found = re.findall(r"wildcards: task=\w+, trial=(\d+)", result.stdout + result.stderr)
    return sorted(set(found))


ROUNDS = {
    "tasks": ["two_moons"],
    "observation": 1,
    "simulations": [300, 300],
    "quantile": 1.0e-3,
    "draws": 20000,
    "prior_draws": 20000,
}


def test_a_rounds_experiment_plans_with_its_own_seeds_and_default_options_left_out(workdir):
    # Every task rounded: their seeds are derived per round, so equal simulate seeds are fine.
    simulate = {"seed": 2, "test_seed": 2, "num_simulations": 600, "num_test_simulations": 60}
    config = write_config(workdir, tasks=["two_moons"], rounds=ROUNDS, simulate=simulate)
    plan = snakemake(workdir, "-n", "-p", "--configfile", str(config))
    truncate = [line for line in plan.stdout.splitlines() if "pipeline truncate" in line]
    assert truncate, plan.stdout
    # A default a round never needed stays out of its params: adding it reran no round.
    assert all("mcmc_extensions" not in line for line in truncate)
    # The floor reaches the jobs that sample a region outside their params (below).
    assert all("min_prior_mass" not in line for line in truncate)
    assert all("--min-prior-mass 0.0001" in line for line in truncate)
    simulate = [line for line in plan.stdout.splitlines() if "pipeline simulate" in line]
    assert simulate and all("--min-prior-mass 0.0001" in line for line in simulate)


def test_rounds_resume_at_the_round_reached_to_identical_outputs_and_add_a_round_alone(
    workdir, tmp_path_factory
):
    """Rounds stopped after round 0 (as a killed run would be) resume at round 1, keep round 0,
    and end with the outputs of an uninterrupted run; one more round plans only its own jobs
    and those downstream; the report shows the rounds."""
    config = write_config(workdir, tasks=["two_moons"], rounds=ROUNDS)
    round_0 = Path("results/tiny/two_moons/rounds/round-0")
    snakemake(workdir, str(round_0 / "truncation.json"), "--configfile", str(config))
    assert not (workdir / round_0.parent / "round-1").exists()
    kept = sorted(path for path in (workdir / round_0).rglob("*") if path.is_file())
    stamps = [path.stat().st_mtime_ns for path in kept]
    resumed = snakemake(workdir, "--configfile", str(config))
    assert ran_rounds(resumed) == ["1"], resumed.stdout + resumed.stderr
    assert [path.stat().st_mtime_ns for path in kept] == stamps
    straight = copy_workflow(tmp_path_factory.mktemp("straight"))
    straight_config = write_config(straight, tasks=["two_moons"], rounds=ROUNDS)
    snakemake(straight, "--configfile", str(straight_config))
    assert_same_outputs(round_outputs(workdir), round_outputs(straight))
    task = workdir / "results/tiny/two_moons"
    with h5py.File(task / "samples/observations.h5") as samples:
        assert samples["samples"].shape[0] == 1  # the one observation the rounds aim at
    text = " ".join(re.sub(r"<[^>]+>", " ", (task.parent / "report.html").read_text()).split())
    assert "Sequential rounds" in text
    assert "trained in 2 rounds at one observation, observation 1 of the task" in text
    assert "by truncated sequential NPE" in text
    assert "Drawn from (prior mass: the rejection's acceptance rate)" in text
    # Every round's jobs are in the run-time table, each with its own time.
    for job in ("round-0-simulate", "round-1-train", "round-1-truncate"):
        assert re.search(rf"rounds two_moons/{job} [0-9.]+ s \(", text), job
    # The region was cut around the observation: the misspecification tests would not be
    # calibrated against its test simulations, so they are skipped with the reason.
    metrics = json.loads((task / "validation/metrics.json").read_text())
    assert metrics["estimates"]["observation_index"] == [1]  # the task's, not the file's row
    assert metrics["misspecification"] is None
    assert "misspecification : the test simulations come from the last round&#39;s region" in text
    # Lowering the floor, as a round's error advises, reruns none of the jobs that computed
    # something (the report records the whole config).
    lower = write_config(workdir, tasks=["two_moons"], rounds=ROUNDS | {"min_prior_mass": 1e-6})
    plan = snakemake(workdir, "-n", "--configfile", str(lower))
    assert set(planned_jobs(plan)) == {"report", "index", "all"}, plan.stdout
    more = write_config(workdir, tasks=["two_moons"], rounds=ROUNDS | {"simulations": [300] * 3})
    plan = snakemake(workdir, "-n", "--configfile", str(more))
    assert ran_rounds(plan) == ["2"], plan.stdout + plan.stderr
    assert planned_jobs(plan)["round_train"] == 1


def test_rounds_scattered_over_chunk_jobs_simulate_what_one_job_does(workdir, tmp_path_factory):
    """With simulate.scatter every round runs one job per chunk and a merge, and its file holds
    the simulations of the one-job layout; the shards are outputs, so nothing reruns."""
    simulate = {"num_simulations": 600, "num_test_simulations": 60, "chunk_size": 100}
    target = "results/tiny/two_moons/rounds/round-1/sims.h5"
    config = write_config(
        workdir, tasks=["two_moons"], rounds=ROUNDS, simulate=simulate | {"scatter": True}
    )
    plan = snakemake(workdir, "-n", target, "--configfile", str(config))
    jobs = planned_jobs(plan)
    assert (jobs["round_simulate_chunk"], jobs["merge_round"]) == (6, 2), plan.stdout
    assert "round_simulate" not in jobs
    snakemake(workdir, target, "--configfile", str(config))
    one_job = copy_workflow(tmp_path_factory.mktemp("one_job"))
    one_job_config = write_config(one_job, tasks=["two_moons"], rounds=ROUNDS, simulate=simulate)
    snakemake(one_job, target, "--configfile", str(one_job_config))
    for index in range(2):
        name = f"results/tiny/two_moons/rounds/round-{index}/sims.h5"
        scattered, whole = (storage.read_simulations(root / name) for root in (workdir, one_job))
        np.testing.assert_array_equal(scattered.theta, whole.theta)
        np.testing.assert_array_equal(scattered.x, whole.x)
    shards = sorted((workdir / target).parent.glob("sims.h5.shards/chunk-*.h5"))
    assert len(shards) == 3
    again = snakemake(workdir, "-n", target, "--configfile", str(config))
    assert planned_jobs(again) == {}, again.stdout
    # A deleted shard is drawn again, and only it, when asked for (as `all` asks for each).
    shards[1].unlink()
    deleted = str(shards[1].relative_to(workdir))
    again = snakemake(workdir, "-n", target, deleted, "--configfile", str(config))
    assert planned_jobs(again) == {"round_simulate_chunk": 1, "merge_round": 1}, again.stdout
    everything = planned_jobs(snakemake(workdir, "-n", "--configfile", str(config)))
    assert (everything["round_simulate_chunk"], everything["merge_round"]) == (1, 1)


def test_rounds_of_an_nle_posterior_sample_the_last_region_by_mcmc(workdir):
    """With method nle the rounds run through the DAG: each region is cut from the likelihood's
    posterior, and the test simulations' chains stay in the last region, so none is left out
    for lack of mass in it."""
    from pipeline.rounds.region import load_region
    from pipeline.sampling import read_samples
    from pipeline.tasks import get_task

    tiny = yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text())
    train = {k: v for k, v in tiny["train"].items() if not k.startswith("embedding")}
    config = write_config(
        workdir, tasks=["two_moons"], rounds=ROUNDS, train=train | {"method": "nle"}
    )
    snakemake(workdir, "--configfile", str(config))
    task = workdir / "results/tiny/two_moons"
    test = read_samples(task / "samples/test.h5")
    assert test["attrs"]["method"] == "nle"
    assert test["attrs"]["num_outside_region_excluded"] == 0
    models = [task / f"rounds/round-{k}/model" for k in range(2)]
    prior = get_task("two_moons").prior
    region = load_region(task / "rounds/round-1/truncation.json", models, prior)
    assert region.accepts(test["theta"]).all()
    assert region.accepts(test["samples"].reshape(-1, 2)).all()
    metrics = json.loads((task / "validation/metrics.json").read_text())
    left_out = metrics["mcmc"]["num_unconverged_excluded"]
    assert metrics["num_test"] + left_out == 60 and len(test["theta"]) == metrics["num_test"]
    assert metrics["num_left_out"] == left_out  # what the report's coverage checks allow for
    report = " ".join(re.sub(r"<[^>]+>", " ", (task.parent / "report.html").read_text()).split())
    assert "by truncated sequential NLE" in report


def test_rounds_of_a_users_task_run_through_the_dag(workdir):
    """A user's task in rounds: the test simulations record the task with its region's files,
    the model the task's own definition (the stack's), and sample tells them apart by the
    proposal's record of it; it refused every rounded user task as another definition."""
    shutil.copytree(ROOT / "examples/oscillator", workdir / "examples/oscillator")
    spec = "examples/oscillator/oscillator.py:Oscillator"
    config = write_config(
        workdir,
        tasks=["osc"],
        task_modules={"osc": spec},
        rounds=ROUNDS | {"tasks": ["osc"], "observation": 0},
        # The oscillator's x has 50 values: its predictive checks need 51 draws.
        sample={"num_test_samples": 60, "num_observation_samples": 300},
        validate={"c2st_folds": 2, "predictive_draws": 51, "local_c2st_null": 19},
    )
    snakemake(workdir, "--configfile", str(config))
    task = workdir / "results/tiny/osc"
    metrics = json.loads((task / "validation/metrics.json").read_text())
    assert metrics["num_test"] + metrics["num_left_out"] == 60
    assert metrics["estimates"]["units"] == ["rad / s", "1 / s"]
    with h5py.File(task / "sims/test.h5") as test:
        assert "proposal" in test.attrs


def ran_rounds(result: subprocess.CompletedProcess) -> list[str]:
    """The rounds whose jobs a Snakemake run (or plan) printed."""
    found = re.findall(r"wildcards: task=\w+, round=(\d+)", result.stdout + result.stderr)
    return sorted(set(found))


def round_outputs(workdir: Path) -> dict[str, object]:
    """What a tiny rounds run computed: each round's simulations and weights, the test
    simulations, samples and validation numbers."""
    import torch

    task = workdir / "results/tiny/two_moons"
    found: dict[str, object] = {}
    names = [*sorted(task.glob("rounds/round-*/sims.h5")), task / "sims/test.h5"]
    for path in [*names, task / "samples/test.h5", task / "samples/observations.h5"]:
        with h5py.File(path, "r") as f:
            for key, dataset in f.items():
                found[f"{path.relative_to(task)}:{key}"] = dataset[()]
    for path in [*sorted(task.glob("rounds/round-*/model/posterior.pt"))]:
        for key, tensor in torch.load(path, weights_only=True).items():
            found[f"{path.relative_to(task)}:{key}"] = tensor.numpy()
    metrics = json.loads((task / "validation/metrics.json").read_text())
    found["c2st"] = metrics["c2st"]["per_observation"]
    found["coverage"] = metrics["coverage"]["tarp"] + metrics["coverage"]["hpd"]
    return found

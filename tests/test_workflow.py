"""The Snakemake layer: config validation, lint, and a tiny end-to-end run of the DAG."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.tasks import TASKS
from tests.conftest import ROOT, run_env, tool

CORE_TASKS = ["gaussian_linear", "two_moons", "sn_cosmology"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow, so runs keep their .snakemake state out of the checkout."""
    for name in ("Snakefile", "workflow", "config", "envs"):
        source = ROOT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, tmp_path / name)
    return tmp_path


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [
        tool("snakemake"),
        "--cores",
        "2",
        "--workflow-profile",
        "workflow/profiles/local",
        *args,
    ]
    result = subprocess.run(
        command, cwd=workdir, env=run_env(), capture_output=True, text=True, timeout=1200
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


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


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": ["two_moon"]}, r"two_moon.*is not one of"),
        ({"simulate": {"num_simulations": 0}}, r"0 is less than the minimum of 1"),
        (
            {"simulat": {"num_simulations": 10}},
            r"Additional properties are not allowed \('simulat'",
        ),
        ({"train": {"lerning_rate": 0.1}}, r"'lerning_rate' was unexpected"),
    ],
)
def test_invalid_config_fails_before_any_job(workdir, changes, message):
    config = write_config(workdir, **changes)
    result = snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_schema_lists_exactly_the_registered_tasks():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert sorted(schema["properties"]["tasks"]["items"]["enum"]) == sorted(
        name for name in TASKS if name in CORE_TASKS
    )
    assert set(CORE_TASKS) <= set(TASKS)


def test_conda_environment_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs/pipeline.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if "==" in p) == sorted(project)


@pytest.mark.slow
def test_tiny_dag_end_to_end(workdir):
    snakemake(workdir, "--configfile", "config/experiments/tiny.yaml")
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
        assert task in html
        assert (experiment / "logs/train" / f"{task}.log").stat().st_size > 0
    assert "data:image/png;base64," in html

    # A second run has nothing to do.
    again = snakemake(workdir, "--configfile", "config/experiments/tiny.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr

    # A corrupt input makes its stage fail with the file named; earlier outputs survive.
    test_sims = experiment / "two_moons/sims/test.h5"
    test_sims.write_bytes(test_sims.read_bytes()[:2048])
    model = experiment / "two_moons/model/posterior.pt"
    before = model.read_bytes()
    failed = snakemake(
        workdir,
        "--configfile",
        "config/experiments/tiny.yaml",
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

"""The three user projects of examples/ run end to end through Snakemake, at tiny size: a
Python task in the user's own file, a compiled C program, and archived simulations with real
observed data. None of them touches the package."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pipeline.provenance import file_digest
from tests import apt
from tests.conftest import (
    ROOT,
    copy_workflow,
    merged,
    planned_jobs,
    run_env,
    run_snakemake,
    tool,
)

pytestmark = pytest.mark.slow

# Sizes that exercise every stage in well under a minute per example; numbers meaningless.
TINY = {
    "simulate": {"num_simulations": 600, "num_test_simulations": 60, "chunk_size": 300},
    "observations": {"num_observations": 2},
    "train": {"max_epochs": 3, "transforms": 1, "flow_hidden": [16], "embedding_dim": 8},
    "sample": {"num_test_samples": 60, "num_observation_samples": 300},
    "validate": {"c2st_folds": 2, "predictive_draws": 51, "local_c2st_null": 19},
}


def project(tmp_path: Path, example: str, changes: dict) -> tuple[Path, Path]:
    """A copy of the workflow with examples/, and the example's config made tiny."""
    workdir = copy_workflow(tmp_path)
    shutil.copytree(ROOT / "examples", workdir / "examples")
    config = yaml.safe_load((workdir / f"examples/{example}/config.yaml").read_text())
    path = workdir / f"{example}.yaml"
    path.write_text(yaml.safe_dump(merged(merged(config, TINY), changes)))
    return workdir, path


def summary(workdir: Path, experiment: str) -> dict:
    return json.loads((workdir / f"results/{experiment}/summary.json").read_text())


def compile_oscillator(folder: Path) -> Path:
    """Builds examples/c_program/oscillator with gcc (installed with apt when absent)."""
    if shutil.which("gcc") is None:
        if not apt.can_install():
            pytest.skip("gcc is not installed and apt-get cannot run as root here")
        apt.install("gcc", "libc6-dev")
    source = folder / "examples/c_program/oscillator.c"
    binary = source.with_suffix("")
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), "-lm"], check=True)
    return binary


def test_python_task_in_the_users_own_file(tmp_path):
    workdir, config = project(tmp_path, "oscillator", {})
    run_snakemake(workdir, "--cores", "2", "--configfile", str(config))
    task = workdir / "results/oscillator/oscillator"
    with h5py.File(task / "sims/train.h5") as f:
        assert f.attrs["task"] == "examples/oscillator/oscillator.py:Oscillator"
    metrics = json.loads((task / "validation/metrics.json").read_text())
    assert metrics["skipped"] == {"c2st": "the task has no reference posterior"}
    assert metrics["predictive"] is not None and metrics["coverage"]["predictive"] is not None
    report = (workdir / "results/oscillator/report.html").read_text()
    assert "n/a — the task has no reference posterior" in report
    assert summary(workdir, "oscillator")["tasks"][0]["name"] == "oscillator"
    # An edit whose file is older than the results (cp -p, rsync -a, tar x) still reruns them.
    replace_keeping_an_old_time(workdir / "examples/oscillator/oscillator.py", "0.05", "0.06")
    plan = planned(workdir, config)
    assert plan["simulate"] == 2 and plan["train"] == 1, plan


def replace_keeping_an_old_time(path: Path, old: str, new: str) -> None:
    """``path`` with ``old`` replaced by ``new``, dated a year before any result."""
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    os.utime(path, (path.stat().st_atime - 3e7, path.stat().st_mtime - 3e7))


def planned(workdir: Path, config: Path) -> dict[str, int]:
    """The jobs per rule a dry run of ``config`` plans."""
    return planned_jobs(run_snakemake(workdir, "-n", "--cores", "1", "--configfile", str(config)))


@pytest.mark.mpi
def test_c_program_under_two_mpi_ranks_equals_one_rank(tmp_path):
    workdir, config = project(tmp_path, "c_program", {})
    compile_oscillator(workdir)
    run_snakemake(
        workdir, "--cores", "2", "--configfile", str(config), "--set-resources", "simulate:tasks=2"
    )
    sims = workdir / "results/c_program/oscillator_c/sims/train.h5"
    one_rank = tmp_path / "one-rank.h5"
    command = [tool("pipeline"), "simulate", "--task", "examples/c_program/task.yaml"]
    command += ["--num-simulations", "600", "--seed", "1", "--chunk-size", "300"]
    subprocess.run([*command, "--out", str(one_rank)], cwd=workdir, env=run_env(), check=True)
    with h5py.File(sims) as a, h5py.File(one_rank) as b:
        assert a.attrs["mpi_ranks"] == 2 and b.attrs["mpi_ranks"] == 1
        assert a.attrs["task"] == "examples/c_program/task.yaml"
        for name in ("theta", "x"):
            np.testing.assert_array_equal(a[name][...], b[name][...])
        assert np.isfinite(a["x"][...]).all()
    assert summary(workdir, "c_program")["tasks"][0]["verdict"] in ("PASS", "FAIL")


def test_archived_simulations_and_real_observations(tmp_path):
    changes = {"data": {"emission_line": {"num_test": 100}}}
    workdir, config = project(tmp_path, "archive", changes)
    run_snakemake(workdir, "--cores", "2", "--configfile", str(config))
    task = workdir / "results/archive/emission_line"
    theta = np.load(workdir / "examples/archive/theta.npy")
    with h5py.File(task / "sims/train.h5") as train, h5py.File(task / "sims/test.h5") as test:
        assert train.attrs["imported"] and "seed" not in train.attrs
        np.testing.assert_array_equal(train["theta"][...], theta[:-100])
        np.testing.assert_array_equal(test["theta"][...], theta[-100:])
    metrics = json.loads((task / "validation/metrics.json").read_text())
    digest = file_digest(task / "observations.h5")
    assert metrics["observations"] == {"num": 2, "real": True, "mock_of": None, "digest": digest}
    assert set(metrics["skipped"]) == {"predictive", "c2st"}
    assert metrics["c2st"] is None and metrics["predictive"] is None
    assert metrics["local_c2st"]["pvalue"] and len(metrics["local_c2st"]["pvalue"]) == 2
    report = (workdir / "results/archive/report.html").read_text()
    assert "Real observations" in report
    assert re.search(r"no simulator \(imported simulations\)", report)
    checks = {c["name"]: c["status"] for c in summary(workdir, "archive")["tasks"][0]["checks"]}
    assert checks["Predictive"] == "n/a — no simulator"
    assert checks["C2ST"] == "n/a — real observations have no reference posterior"
    # Another observation or archive given a time older than the results is still seen.
    observed = workdir / "examples/archive/observed.npy"
    np.save(observed, np.load(observed)[::-1])
    os.utime(observed, (observed.stat().st_atime - 3e7, observed.stat().st_mtime - 3e7))
    plan = planned(workdir, config)
    assert plan["import_observations"] == 1 and "import_simulations" not in plan, plan
    x = workdir / "examples/archive/x.npy"
    np.save(x, np.load(x) * 1.01)
    os.utime(x, (x.stat().st_atime - 3e7, x.stat().st_mtime - 3e7))
    assert planned(workdir, config)["import_simulations"] == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"data": {}},
            r"task emission_line has no simulator: give its existing simulations under data:",
        ),
        (
            {"observed": {}},
            r"task emission_line has no simulator to draw synthetic observations from",
        ),
        (
            {"data": {"emission_line": {"theta": "x.npy; rm -rf /"}}},
            r"does not match",
        ),
    ],
)
def test_a_data_task_missing_its_data_fails_before_any_job(tmp_path, changes, message):
    workdir, config = project(tmp_path, "archive", {})
    data = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        data[key] = merged(data[key], value) if value else value
    config.write_text(yaml.safe_dump(data))
    result = run_snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stderr[-3000:]
    assert not (workdir / "results").exists()

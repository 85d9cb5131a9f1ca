"""The workflow on a real SLURM cluster (one node: this machine), through the shipped profile.

The cluster comes from Debian's slurm-wlm and munge (installed when absent, as root; see
tests/slurm_cluster.py). One tiny two_moons DAG runs locally and under ``--executor slurm``:
every job goes through sbatch, simulate runs 2 MPI ranks through srun inside its allocation,
train hits its time limit on the first attempt and resumes from its checkpoint on the retry,
and the outputs equal the local run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import pytest
import yaml

from tests.conftest import (
    assert_same_outputs,
    copy_workflow,
    merged,
    outputs,
    run_snakemake,
)
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Train long enough (about 140 s here) that a 1-minute time limit stops the first attempt.
EXPERIMENT = {
    "tasks": ["two_moons"],
    "simulate": {"num_simulations": 5000, "chunk_size": 1250},
    "task_train": {"two_moons": {"max_epochs": 500, "patience": 500, "transforms": 3}},
}


def experiment_config(workdir: Path, name: str = "tiny") -> Path:
    """tiny.yaml with :data:`EXPERIMENT` merged in: tiny's own per-task options (one two_moons
    flow, not config.yaml's four) must survive, or training outlasts its time limits."""
    config = merged(
        yaml.safe_load((workdir / "config/experiments/tiny.yaml").read_text()), EXPERIMENT
    )
    config["experiment"] = name
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sized_profile(workdir: Path, **set_resources: dict) -> Path:
    """workflow/profiles/slurm, sized for this node: small memory, 2 simulate ranks, CPU
    training with a 1-minute limit on its first attempt (3 on the retry)."""
    profile = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
    profile["default-resources"] |= {"mem_mb": 500, "runtime": 10}
    shipped = profile["set-resources"]
    profile["set-resources"] = {
        "simulate": {**shipped["simulate"], "tasks": 2, "mem_mb": 500},
        "train": {"runtime": "2 * attempt - 1", "mem_mb": 1000},
        **set_resources,
    }
    profile["set-threads"] = {"train": 1}
    profile["retries"] = 1
    # No accounting database on the test cluster: squeue instead of sacct, no account.
    profile |= {"slurm-no-account": True, "slurm-status-command": "squeue"}
    profile |= {"slurm-keep-successful-logs": True, "slurm-init-seconds-before-status-checks": 1}
    folder = workdir / "test-profile"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        pytest.skip(f"no test SLURM cluster: {reason}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict[str, object]:
    """The same DAG run locally and on SLURM, with their wall times."""
    local = copy_workflow(tmp_path_factory.mktemp("local"))
    start = time.monotonic()
    run_snakemake(local, "--cores", "2", "--configfile", str(experiment_config(local)))
    local_seconds = time.monotonic() - start
    slurm = copy_workflow(tmp_path_factory.mktemp("on-slurm"))
    start = time.monotonic()
    result = run_snakemake(
        slurm, "--configfile", str(experiment_config(slurm)), profile=sized_profile(slurm)
    )
    return {
        "local": local,
        "slurm": slurm,
        "local_seconds": local_seconds,
        "slurm_seconds": time.monotonic() - start,
        "log": result.stdout + result.stderr,
    }


def test_every_job_went_through_sbatch(runs, cluster):
    slurm = runs["slurm"]
    logs = slurm / ".snakemake/slurm_logs"
    for rule in ("simulate", "observe", "train", "sample_test", "sample_observations"):
        assert list((logs / f"rule_{rule}").rglob("*.log")), f"no SLURM log of {rule}"
    assert list((logs / "rule_report").rglob("*.log"))
    jobs = [job for job in cluster.jobs() if Path(job["workdir"]) == slurm]
    # 2 simulate, observe, 2 train attempts, 2 sample, validate, report, index.
    assert len(jobs) == 10, jobs
    states = sorted(job["state"] for job in jobs)
    assert states == ["COMPLETED"] * 9 + ["TIMEOUT"], jobs


def test_simulate_ran_two_mpi_ranks_through_srun(runs):
    slurm = runs["slurm"]
    logs = "".join(p.read_text() for p in (slurm / ".snakemake/slurm_logs").rglob("*.log"))
    assert "srun --mpi=pmi2 -n 2 pipeline simulate" in logs
    for split in ("train", "test"):
        with h5py.File(slurm / f"results/tiny/two_moons/sims/{split}.h5", "r") as f:
            assert f.attrs["mpi_ranks"] == 2


def test_train_killed_at_its_time_limit_resumed_on_retry(runs):
    # Snakemake clears a rule's log for the retry; SLURM's log of each attempt stays.
    logs = (runs["slurm"] / ".snakemake/slurm_logs/rule_train").rglob("*.log")
    attempts = sorted(logs, key=lambda path: int(path.stem))  # SLURM job ids
    first, second = (path.read_text() for path in attempts)
    assert "DUE TO TIME LIMIT" in first
    assert "stopped by SIGTERM (time limit or preemption)" in first
    assert "resuming from" in second
    assert "resuming from" in (runs["slurm"] / "results/tiny/logs/train/two_moons.log").read_text()
    history = (runs["slurm"] / "results/tiny/two_moons/model/metrics.csv").read_text()
    # One train and one validation row per epoch, none repeated by the two attempts.
    epochs = [int(line.split(",")[0]) for line in history.splitlines()[1:]]
    assert sorted(set(epochs)) == list(range(500)) and len(epochs) == 2 * 500


def test_outputs_match_the_local_run(runs):
    assert_same_outputs(outputs(runs["local"]), outputs(runs["slurm"]))
    spec = json.loads((runs["slurm"] / "results/tiny/two_moons/model/posterior.json").read_text())
    assert spec["world_size"] == 1


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"simulate": {"mpi": "srun --mpi=pmi2", "tasks": 64}}, "more processors requested"),
        ({"simulate": {"mpi": "srun --mpi=pmi2", "tasks": 2, "gres": "gpu:1"}}, "(gres)"),
    ],
)
def test_impossible_requests_fail_at_submission(runs, resources, message):
    slurm = runs["slurm"]
    model = slurm / "results/tiny/two_moons/model/posterior.pt"
    before = model.read_bytes()
    profile = sized_profile(slurm, **resources)
    config = experiment_config(slurm, name="impossible")
    start = time.monotonic()
    # No retries: a refused submission would otherwise be tried again while other jobs run.
    result = run_snakemake(
        slurm,
        "--configfile",
        str(config),
        "--retries",
        "0",
        profile=profile,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "sbatch" in text and message in text.lower(), text[-3000:]
    assert time.monotonic() - start < 120  # refused at submission, not after running
    assert model.read_bytes() == before  # the earlier experiment is untouched


def test_a_users_task_runs_by_its_path_in_every_slurm_job(cluster, tmp_path):
    """examples/oscillator on the cluster: the task file is resolved in each sbatch job and in
    both srun-started MPI ranks of simulate, with no registration anywhere."""
    from tests.test_examples import project

    workdir, config = project(tmp_path, "oscillator", {})
    run_snakemake(workdir, "--configfile", str(config), profile=sized_profile(workdir))
    jobs = [job for job in cluster.jobs() if Path(job["workdir"]) == workdir]
    # 2 simulate, observe, train, 2 sample, validate, report, index: all through sbatch.
    assert sorted(job["state"] for job in jobs) == ["COMPLETED"] * 9, jobs
    task = workdir / "results/oscillator/oscillator"
    with h5py.File(task / "sims/train.h5", "r") as f:
        assert f.attrs["mpi_ranks"] == 2
        assert f.attrs["task"] == "examples/oscillator/oscillator.py:Oscillator"
    assert (workdir / "results/oscillator/report.html").exists()

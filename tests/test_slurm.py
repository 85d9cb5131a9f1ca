"""The workflow on a real SLURM cluster (one node: this machine), through the shipped profile.

The cluster comes from Debian's slurm-wlm and munge (installed when absent, as root; see
tests/slurm_cluster.py). One tiny two_moons DAG runs locally and under ``--executor slurm``:
every job goes through sbatch, simulate runs 2 MPI ranks through srun inside its allocation,
train is ended by SLURM as a time limit or a preemption ends a job (SIGTERM to every process,
SIGKILL after KillWait) once it has written a checkpoint, its retry resumes from that
checkpoint, and the outputs equal the local run's. The test acts on events (a checkpoint, a
job state), never on durations, so it holds on any machine speed.
"""

from __future__ import annotations

import json
import subprocess
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
    run_env,
    run_snakemake,
    tool,
)
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 200
EXPERIMENT = {
    "tasks": ["two_moons"],
    "simulate": {"num_simulations": 5000, "chunk_size": 1250},
    # config.yaml's two_moons block (an experiment's block replaces it) with 3 transforms.
    "task_train": {
        "two_moons": {
            **yaml.safe_load((ROOT / "config/config.yaml").read_text())["task_train"]["two_moons"],
            "max_epochs": EPOCHS,
            "patience": EPOCHS,
            "transforms": 3,
        }
    },
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
    """workflow/profiles/slurm, sized for this node: small memory, 2 simulate ranks, one CPU
    for training, limits no machine reaches (the preemption is the test's own doing)."""
    profile = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
    profile["default-resources"] |= {"mem_mb": 500, "runtime": 10}
    shipped = profile["set-resources"]
    profile["set-resources"] = {
        "simulate": {**shipped["simulate"], "tasks": 2, "mem_mb": 500},
        "train": {"runtime": 60, "mem_mb": 1000},
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


def preempt_first_training(cluster: SlurmCluster, workdir: Path, run: subprocess.Popen) -> str:
    """Waits until the train job of ``workdir`` has written its first checkpoint, then ends it
    with ``scancel``: SIGTERM to every process of the job and SIGKILL after KillWait, what SLURM
    does at a time limit or a preemption. Returns the job's id."""
    model = workdir / "results/tiny/two_moons"
    deadline = time.monotonic() + 600  # a bound for a stuck run, not a timing assumption
    while not list(model.glob("model.checkpoints/*/last.ckpt")):
        if run.poll() is not None:
            raise AssertionError("Snakemake ended before train wrote a checkpoint")
        assert time.monotonic() < deadline, "train wrote no checkpoint in 10 minutes"
        time.sleep(0.1)
    (job,) = [
        job
        for job in cluster.jobs()
        if Path(job["workdir"]) == workdir and job["comment"].startswith("rule_train")
    ]
    assert job["state"] == "RUNNING", f"train finished before it could be preempted: {job}"
    subprocess.run(["scancel", job["id"]], check=True)
    return job["id"]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict[str, object]:
    """The same DAG run locally and on SLURM, the first train job of the latter preempted."""
    local = copy_workflow(tmp_path_factory.mktemp("local"))
    run_snakemake(local, "--cores", "2", "--configfile", str(experiment_config(local)))
    slurm = copy_workflow(tmp_path_factory.mktemp("on-slurm"))
    command = [tool("snakemake"), "--workflow-profile", str(sized_profile(slurm))]
    command += ["--configfile", str(experiment_config(slurm))]
    log = slurm / "snakemake.out"
    with log.open("w") as output:
        run = subprocess.Popen(
            command, cwd=slurm, env=run_env(), stdout=output, stderr=subprocess.STDOUT
        )
        try:
            preempted = preempt_first_training(cluster, slurm, run)
            run.wait(timeout=1200)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0, f"snakemake failed:\n{log.read_text()[-8000:]}"
    return {"local": local, "slurm": slurm, "preempted": preempted, "log": log.read_text()}


def test_every_job_went_through_sbatch(runs, cluster):
    slurm = runs["slurm"]
    logs = slurm / ".snakemake/slurm_logs"
    for rule in ("simulate", "observe", "train", "sample_test", "sample_observations"):
        assert list((logs / f"rule_{rule}").rglob("*.log")), f"no SLURM log of {rule}"
    assert list((logs / "rule_report").rglob("*.log"))
    jobs = [job for job in cluster.jobs() if Path(job["workdir"]) == slurm]
    # 2 simulate, observe, 2 train attempts, 2 sample, validate, report, index.
    assert len(jobs) == 10, jobs
    states = {job["id"]: job["state"] for job in jobs}
    assert states.pop(runs["preempted"]) == "CANCELLED"
    assert set(states.values()) == {"COMPLETED"}, jobs


def test_simulate_ran_two_mpi_ranks_through_srun(runs):
    slurm = runs["slurm"]
    logs = "".join(p.read_text() for p in (slurm / ".snakemake/slurm_logs").rglob("*.log"))
    assert "srun --mpi=pmi2 -n 2 pipeline simulate" in logs
    for split in ("train", "test"):
        with h5py.File(slurm / f"results/tiny/two_moons/sims/{split}.h5", "r") as f:
            assert f.attrs["mpi_ranks"] == 2


def test_preempted_train_resumed_on_retry(runs):
    # Snakemake clears a rule's log for the retry; SLURM's log of each attempt stays.
    logs = (runs["slurm"] / ".snakemake/slurm_logs/rule_train").rglob("*.log")
    attempts = sorted(logs, key=lambda path: int(path.stem))  # SLURM job ids
    assert [path.stem for path in attempts][0] == runs["preempted"]
    first, second = (path.read_text() for path in attempts)
    assert f"JOB {runs['preempted']} ON" in first and "CANCELLED" in first
    assert "stopped by SIGTERM (time limit or preemption)" in first
    assert "resuming from" in second
    assert "resuming from" in (runs["slurm"] / "results/tiny/logs/train/two_moons.log").read_text()
    history = (runs["slurm"] / "results/tiny/two_moons/model/metrics.csv").read_text()
    # One train and one validation row per epoch, none repeated by the two attempts.
    epochs = [int(line.split(",")[0]) for line in history.splitlines()[1:]]
    assert sorted(set(epochs)) == list(range(EPOCHS)) and len(epochs) == 2 * EPOCHS


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
def test_impossible_requests_fail_at_submission(runs, cluster, resources, message):
    slurm = runs["slurm"]
    model = slurm / "results/tiny/two_moons/model/posterior.pt"
    before = model.read_bytes()
    profile = sized_profile(slurm, **resources)
    config = experiment_config(slurm, name="impossible")

    def simulate_jobs() -> list[dict[str, str]]:
        jobs = [job for job in cluster.jobs() if Path(job["workdir"]) == slurm]
        return [job for job in jobs if job["comment"].startswith("rule_simulate")]

    submitted = simulate_jobs()
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
    # Refused at submission: SLURM never held a simulate job of that request.
    assert simulate_jobs() == submitted
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


def test_a_search_runs_its_trials_as_slurm_jobs_and_chooses_as_locally(cluster, tmp_path):
    """Four trials (two generations) as sbatch jobs: the same proposals, scores and choice as
    the same search run locally, since a trial depends on the earlier generations' files only."""
    from tests.test_workflow import SEARCH

    workdirs = {}
    for where in ("local", "slurm"):
        (tmp_path / where).mkdir()
        workdir = copy_workflow(tmp_path / where)
        config = experiment_config(workdir, name="search")
        settings = yaml.safe_load(config.read_text())
        settings["search"] = SEARCH
        settings["task_train"]["two_moons"] |= {"max_epochs": 20, "patience": 20}
        config.write_text(yaml.safe_dump(settings))
        target = "results/search/two_moons/search/best.json"
        if where == "local":
            run_snakemake(workdir, "--cores", "2", target, "--configfile", str(config))
        else:
            profile = sized_profile(workdir, search_trial={"runtime": 60, "mem_mb": 1000})
            run_snakemake(workdir, target, "--configfile", str(config), profile=profile)
        workdirs[where] = workdir / "results/search/two_moons/search"
    jobs = [job for job in cluster.jobs() if Path(job["workdir"]) == workdirs["slurm"].parents[3]]
    trials = [job for job in jobs if job["comment"].startswith("rule_search_trial")]
    assert sorted(job["state"] for job in trials) == ["COMPLETED"] * 4, jobs
    for trial in range(4):
        local, slurm = (
            json.loads((folder / f"trial-{trial:03d}/score.json").read_text())
            for folder in (workdirs["local"], workdirs["slurm"])
        )
        assert (slurm["options"], slurm["held_out"]) == (local["options"], local["held_out"])
    local, slurm = (json.loads((w / "best.json").read_text()) for w in workdirs.values())
    assert (slurm["chosen"], slurm["options"]) == (local["chosen"], local["options"])

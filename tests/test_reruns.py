"""Reruns are exact: Snakemake reruns what a change touches, and nothing else.

One tiny two_moons run (about 30 s) is shared by the dry-run checks; the shard and kill checks
run the DAG in copies of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline import storage
from tests.conftest import (
    assert_same_outputs,
    copy_workflow,
    merged,
    outputs,
    planned_jobs,
    run_env,
    run_snakemake,
    tool,
)

pytestmark = pytest.mark.slow

# The index page over experiments is rebuilt with every report.
DOWNSTREAM_OF_TRAIN = {"train", "sample_test", "sample_observations", "validate", "report"}
DOWNSTREAM_OF_TRAIN |= {"index", "all"}


def tiny_config(folder: Path, name: str = "config.yaml", **changes: dict) -> Path:
    """The tiny experiment on two_moons only, with ``changes`` merged in at every depth.

    Like every experiment file it is layered over config/config.yaml, whose task_train gives
    two_moons 300 epochs: time to kill a run while it trains.
    """
    config = yaml.safe_load((folder / "config/experiments/tiny.yaml").read_text())
    config = merged({**config, "tasks": ["two_moons"]}, changes)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, "--cores", "2", "--configfile", str(config), *args, **kwargs)


def dry_run(workdir: Path, config: Path) -> dict[str, int]:
    return planned_jobs(snakemake(workdir, config, "--dry-run"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workflow copy whose tiny two_moons DAG has run to the end."""
    workdir = copy_workflow(tmp_path_factory.mktemp("reruns"))
    snakemake(workdir, tiny_config(workdir))
    return workdir


def test_a_second_run_does_nothing(finished):
    assert dry_run(finished, finished / "config.yaml") == {}


def test_a_training_option_reruns_train_and_everything_after_it(finished):
    changed = tiny_config(finished, "changed.yaml", train={"gradient_clip": 1.0})
    assert dry_run(finished, changed) == {rule: 1 for rule in DOWNSTREAM_OF_TRAIN}


def test_the_simulation_budget_reruns_its_simulations_and_everything_after(finished):
    changed = tiny_config(finished, "budget.yaml", simulate={"num_simulations": 900})
    # Only the training split's simulate job: the held-out split and observations keep.
    assert dry_run(finished, changed) == {"simulate": 1} | {r: 1 for r in DOWNSTREAM_OF_TRAIN}


def test_a_changed_option_reruns_its_jobs_without_snakemakes_own_records(finished, tmp_path):
    """Snakemake compares params by its records in the working directory's .snakemake; a
    results folder another checkout made (or one whose .snakemake was removed) has none, so the
    jobs' stamps of their options carry the change: the run redoes train and what follows."""
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir, symlinks=True)
    shutil.rmtree(workdir / ".snakemake")
    changed = tiny_config(workdir, "changed.yaml", train={"gradient_clip": 1.0})
    # A dry run plans it, and leaves the stamps as they are (its config may never run).
    assert dry_run(workdir, changed) == {rule: 1 for rule in DOWNSTREAM_OF_TRAIN}
    assert dry_run(workdir, workdir / "config.yaml") == {}
    ran = snakemake(workdir, changed, "--until", "train", "--rerun-triggers", "mtime")
    assert planned_jobs(ran) == {"train": 1}
    spec = json.loads((workdir / "results/tiny/two_moons/model/posterior.json").read_text())
    assert spec["train_config"]["gradient_clip"] == 1.0
    # Back to the first config: a change again, so train reruns with it.
    assert dry_run(workdir, workdir / "config.yaml") == {rule: 1 for rule in DOWNSTREAM_OF_TRAIN}


def test_a_changed_option_reruns_its_jobs_under_trust_io_cache(finished, tmp_path):
    """--trust-io-cache takes files' times from the last dry run's records: a stamp the run
    rewrites after them must be read afresh, or its change is missed."""
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir, symlinks=True)
    assert dry_run(workdir, workdir / "config.yaml") == {}  # records the stamps' times
    changed = tiny_config(workdir, "changed.yaml", train={"gradient_clip": 1.0})
    trusted = ("--trust-io-cache", "--rerun-triggers", "mtime", "--until", "train")
    assert planned_jobs(snakemake(workdir, changed, *trusted)) == {"train": 1}


def test_a_run_refused_by_another_runs_lock_leaves_the_stamps_alone(finished, tmp_path):
    """Snakemake builds the DAG, which reads the stamps, before it takes its lock: a run it then
    refuses must not have recorded a config it never ran, which the running one's outputs would
    seem to match afterwards."""
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir, symlinks=True)
    stamp = workdir / "results/tiny/two_moons/stamps/train.json"
    before = stamp.read_bytes(), stamp.stat().st_mtime_ns
    locks = workdir / ".snakemake/locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text("results/tiny/two_moons/model/posterior.pt\n")
    changed = tiny_config(workdir, "changed.yaml", train={"gradient_clip": 1.0})
    refused = snakemake(workdir, changed, check=False)
    assert refused.returncode != 0 and "LockException" in refused.stdout + refused.stderr
    assert (stamp.read_bytes(), stamp.stat().st_mtime_ns) == before


def test_targets_whose_stamps_share_a_folder_run_from_nothing(tmp_path):
    """Snakemake lists a folder once per DAG build and takes a file missing from that listing as
    absent: the stamp of a second target's job, written after the first's in the same folder,
    must still be found (a dry run's previews and a run's stamps alike)."""
    workdir = copy_workflow(tmp_path)
    config = tiny_config(workdir)
    targets = [f"results/tiny/two_moons/sims/{split}.h5" for split in ("train", "test")]
    # Targets before --configfile, which takes every name after it.
    plan = planned_jobs(run_snakemake(workdir, *targets, "--configfile", str(config), "-n"))
    assert plan == {"simulate": 2}
    run_snakemake(workdir, *targets, "--cores", "2", "--configfile", str(config))
    assert all((workdir / target).is_file() for target in targets)
    stamps = workdir / "results/tiny/two_moons/stamps"
    assert {p.name for p in stamps.glob("simulate-*.json")} == {
        "simulate-split=train.json",
        "simulate-split=test.json",
    }


def test_a_run_that_fails_before_its_report_leaves_the_old_verdict_marked_stale(
    finished, tmp_path
):
    """Sampling rerun (another seed) with weights a disk fault broke: Snakemake removes the old
    samples, the jobs fail, and no result is newer than the verdict, which is of the samples
    removed; the failed run rebuilds the index, which lists the verdict as stale."""
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir, symlinks=True)
    index = workdir / "results/index.html"
    assert "STALE" not in index.read_text()
    weights = workdir / "results/tiny/two_moons/model/posterior.pt"
    stamp = weights.stat()  # garbage of the same size and time: only the samples' removal shows
    weights.write_bytes(b"\0" * stamp.st_size)
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    failing = tiny_config(workdir, "failing.yaml", sample={"seed": 6})
    result = snakemake(workdir, failing, check=False)
    assert result.returncode != 0 and "Error in rule sample" in result.stdout + result.stderr
    assert not (workdir / "results/tiny/two_moons/samples/observations.h5").exists()
    text = " ".join(re.sub(r"<[^>]+>", " ", index.read_text()).split())
    assert "STALE (was" in text and "two_moons/samples/observations.h5 removed" in text


def test_deleting_one_shard_recomputes_only_that_shard(tmp_path):
    workdir = copy_workflow(tmp_path)
    config = tiny_config(workdir, simulate={"scatter": True, "merge": "virtual"})
    snakemake(workdir, config)
    shards = sorted((workdir / "results/tiny/two_moons/sims/train.h5.shards").glob("*.h5"))
    assert len(shards) == 2
    before = outputs(workdir)
    kept = shards[1].stat().st_mtime_ns
    shards[0].unlink()
    plan = dry_run(workdir, config)
    assert plan["simulate_chunk"] == 1 and plan["merge_simulations"] == 1
    assert "observe" not in plan
    snakemake(workdir, config)
    assert shards[0].exists() and shards[1].stat().st_mtime_ns == kept
    assert_same_outputs(before, outputs(workdir))
    # Another seed reruns every chunk job: Snakemake removes each job's shard before it runs,
    # so the stage's refusal of another run's shard (without --overwrite) never stops them.
    simulate = {"scatter": True, "merge": "virtual", "seed": 7}
    reseeded = tiny_config(workdir, "seed.yaml", simulate=simulate)
    assert dry_run(workdir, reseeded)["simulate_chunk"] == 2
    snakemake(workdir, reseeded)
    assert storage.read_attrs(shards[0])["seed"] == 7


def test_rerun_incomplete_after_a_killed_run_gives_the_same_results(finished, tmp_path):
    workdir = copy_workflow(tmp_path)
    config = tiny_config(workdir)
    command = [tool("snakemake"), "--workflow-profile", "workflow/profiles/local"]
    command += ["--cores", "2", "--configfile", str(config)]
    run = subprocess.Popen(
        command,
        cwd=workdir,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill Snakemake and its jobs at once while training runs (as a node failure would).
    train_log = workdir / "results/tiny/logs/train/two_moons.log"
    deadline = time.monotonic() + 300
    while not (train_log.exists() and "epoch 10/" in train_log.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (workdir / "results/tiny/two_moons/model/posterior.pt").exists()
    # No hook ran: the run's mark stays, for the index to say the run did not finish.
    assert (workdir / "results/tiny/unfinished-run.json").exists()
    shutil.rmtree(workdir / ".snakemake/locks", ignore_errors=True)
    # The local profile sets rerun-incomplete: the interrupted job starts again.
    snakemake(workdir, config)
    assert_same_outputs(outputs(finished), outputs(workdir))
    assert not (workdir / "results/tiny/unfinished-run.json").exists()

"""Faults while writing: a full disk or a crash mid-write never leaves a half file under an
output's name, never touches the earlier file, leaves no temporary, and says what happened."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import atomic, simulation, storage
from pipeline.cli import main
from pipeline.models import posterior as posterior_module
from pipeline.models.posterior import NeuralPosterior, PosteriorSpec, save_posterior
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from pipeline.training import TrainConfig, check_checkpoints
from tests.conftest import run_env, tool


def full_disk(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("write", ["text", "json"])
def test_a_full_disk_keeps_the_earlier_file_and_says_so(tmp_path, monkeypatch, write):
    out = tmp_path / "metrics.json"
    out.write_text('{"earlier": true}\n')
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match=r"disk full .* while writing .*metrics.json: free space"):
        if write == "text":
            atomic.write_text(out, "new")
        else:
            atomic.write_json(out, {"new": 1})
    monkeypatch.undo()
    assert out.read_text() == '{"earlier": true}\n'
    assert leftovers(tmp_path) == []


def test_a_crash_mid_write_leaves_no_temporary_and_no_partial_file(tmp_path):
    out = tmp_path / "report.html"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic.atomic_path(out) as temporary:
            temporary.write_text("half a rep")
            raise RuntimeError("killed")
    assert not out.exists() and leftovers(tmp_path) == []


def spec() -> PosteriorSpec:
    return PosteriorSpec(
        parameter_names=("a", "b"),
        x_shape=(3,),
        transforms=1,
        flow_hidden=(8,),
        embedding_dim=4,
        embedding_hidden=(8,),
    )


def test_a_model_export_on_a_full_disk_keeps_the_earlier_model(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    save_posterior(NeuralPosterior(spec()), folder, {"task": "earlier"})
    before = {name: (folder / name).read_bytes() for name in ("posterior.pt", "posterior.json")}
    monkeypatch.setattr(posterior_module.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"disk full .*posterior.pt"):
        save_posterior(NeuralPosterior(spec()), folder, {"task": "later"})
    monkeypatch.undo()
    after = {name: (folder / name).read_bytes() for name in before}
    assert after == before and leftovers(folder) == []
    # And the JSON written second: the weights are new, but a reader never sees a half file.
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match=r"disk full .*posterior.json"):
        save_posterior(NeuralPosterior(spec()), folder, {"task": "later"})
    monkeypatch.undo()
    assert json.loads((folder / "posterior.json").read_text())["task"] == "earlier"
    assert leftovers(folder) == []
    torch.load(folder / "posterior.pt", weights_only=True)  # whole, loadable


def test_an_unreadable_checkpoint_stamp_is_named_with_the_fix(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "identity.json").write_text("")  # a stamp whose write was cut off
    with pytest.raises(ValueError, match=r"identity.json is unreadable .* move .*ckpt away"):
        check_checkpoints(folder, TrainConfig(), "abc", write=True)


def test_the_command_line_reports_a_full_disk_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "index.html"
    assert main(["index", "--results", str(tmp_path), "--out", str(out)]) == 2
    message = "index failed: [Errno 28] disk full (or quota reached) while writing"
    assert message in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.integration
def test_a_rerun_removes_what_killed_writes_on_this_node_left_and_nothing_else(tmp_path):
    out = tmp_path / "samples.h5"
    dead = tmp_path / f".samples.h5.tmp-{atomic.HOST}-{_pid_of_ended()}"
    dead.write_text("half")
    elsewhere = tmp_path / ".samples.h5.tmp-othernode-1"  # may still run on its node
    running = tmp_path / f".samples.h5.tmp-{atomic.HOST}-{os.getppid()}"
    other_output = tmp_path / f".other.h5.tmp-{atomic.HOST}-{_pid_of_ended()}"
    for path in (elsewhere, running, other_output):
        path.write_text("in progress")
    storage.write_simulations(out, np.zeros((3, 2)), np.zeros((3, 2)), {}, overwrite=False)
    assert not dead.exists()
    assert elsewhere.exists() and running.exists() and other_output.exists()
    assert out.exists()


def _pid_of_ended() -> int:
    """The pid of a process that has ended (free, unless the system reuses it at once)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root only; the test skips where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_that_fills_during_simulate_is_reported_and_the_rerun_resumes(small_disk):
    out = small_disk / "sims.h5"
    # 60000 two_moons rows are 0.96 MB of float32, so the up-front check lets them through;
    # HDF5's overhead fills the 1 MB disk at the sixth shard.
    command = [tool("pipeline"), "simulate", "--task", "two_moons", "--seed", "1"]
    command += ["--num-simulations", "60000", "--chunk-size", "10000", "--merge", "virtual"]
    command += ["--compression", "none", "--out", str(out)]
    failed = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "simulate failed: [Errno 28] disk full (or quota reached) while writing" in (
        failed.stderr
    )
    assert "Traceback" not in failed.stderr
    shards = simulation.shard_dir(out)
    kept = sorted(p.name for p in shards.iterdir() if not p.name.startswith(".lock"))
    assert not out.exists() and len(kept) == 5 and not [n for n in kept if ".tmp-" in n]
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    resumed = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.count("already simulated, kept") == 5
    expected = simulation.simulate_range(get_task("two_moons"), 1, 0, 60000)
    result = storage.read_simulations(out)
    np.testing.assert_array_equal(result.x, expected[1])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["spec"].update(bogus=1), "unexpected keyword argument 'bogus'"),
        (lambda d: d["spec"].pop("x_shape"), "missing 1 required positional argument"),
        (lambda d: d.pop("spec"), "KeyError"),
        (lambda d: d["spec"].update(flow_hidden=[4]), "does not hold the weights"),
    ],
)
def test_a_damaged_model_description_is_named_with_the_fix(tmp_path, edit, message):
    from pipeline.models.posterior import load_posterior

    folder = tmp_path / "model"
    save_posterior(NeuralPosterior(spec()), folder, {"task": "t"})
    document = json.loads((folder / "posterior.json").read_text())
    edit(document)
    (folder / "posterior.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=f"{message}.*train again into .*model with --overwrite"):
        load_posterior(folder)


# A pipeline command that kills itself (SIGKILL, as a node failure or the OOM killer would) at
# the moment it would rename its finished output KILL_AT into place: the exact point where a
# kill leaves the most behind.
KILL_AT_RENAME = """
import os, signal, sys
from pipeline.cli import main

rename = os.replace

def replace(source, target, *args, **kwargs):
    if os.path.basename(str(target)) == os.environ["KILL_AT"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(source, target, *args, **kwargs)

os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def killed_then_rerun(argv: list[str], target: Path) -> subprocess.CompletedProcess:
    """Runs ``pipeline ARGV`` killed as it renames ``target``, checks what the kill left, then
    runs it again undisturbed and returns that run."""
    killer = [sys.executable, "-c", KILL_AT_RENAME, *argv]
    env = run_env() | {"KILL_AT": target.name}
    killed = subprocess.run(killer, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not target.exists() and leftovers(target.parent)  # the kill's debris
    rerun = subprocess.run(
        [tool("pipeline"), *argv], env=run_env(), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert target.exists() and leftovers(target.parent) == []
    return rerun


@pytest.mark.integration
def test_a_merge_killed_before_its_rename_reruns_to_the_same_data(tmp_path):
    out = tmp_path / "sims.h5"
    argv = ["simulate", "--task", "two_moons", "--num-simulations", "3000", "--seed", "1"]
    rerun = killed_then_rerun([*argv, "--out", str(out)], out)
    assert rerun.stderr.count("already simulated, kept") == 3
    expected = simulation.simulate_range(get_task("two_moons"), 1, 0, 3000)
    np.testing.assert_array_equal(storage.read_simulations(out).x, expected[1])


@pytest.mark.integration
def test_samples_killed_before_their_rename_are_redone(tmp_path):
    model = tmp_path / "model"
    save_posterior(NeuralPosterior(spec()), model, {"task": "t", "provenance": {}})
    np.save(tmp_path / "x.npy", np.zeros((2, 3), dtype=np.float32))
    out = tmp_path / "samples" / "s.h5"
    argv = ["sample", "--model", str(model), "--observations", str(tmp_path / "x.npy")]
    killed_then_rerun([*argv, "--num-samples", "10", "--out", str(out)], out)
    with h5py.File(out) as f:
        assert f["samples"].shape == (2, 10, 2)


@pytest.mark.integration
def test_a_model_export_killed_before_its_rename_is_redone_by_the_rerun(tmp_path):
    data = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 600, 1, 600)
    simulation.run(plan, get_task("two_moons"), data, SerialComm(), overwrite=False)
    options = {"max_epochs": 2, "flow_hidden": [8], "embedding_hidden": [8], "transforms": 1}
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "model")]
    rerun = killed_then_rerun(
        [*argv, "--options", json.dumps(options)], tmp_path / "model" / "posterior.pt"
    )
    assert "resuming from" in rerun.stderr
    assert json.loads((tmp_path / "model" / "posterior.json").read_text())["epochs"] == 2

"""Faults while writing: a full disk or a crash mid-write never leaves a half file under an
output's name, never touches the earlier file, leaves no temporary, and says what happened."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import atomic, storage
from pipeline.cli import main
from pipeline.models import posterior as posterior_module
from pipeline.models.posterior import NeuralPosterior, PosteriorSpec, save_posterior
from pipeline.training import TrainConfig, check_checkpoints


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

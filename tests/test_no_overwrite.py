"""Every stage that writes refuses an existing output unless --overwrite (Snakemake passes it):
a mistyped --out never replaces an earlier result."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli


@pytest.mark.parametrize(
    ("stage", "target"),
    [
        (["observe", "--task", "two_moons", "--num-observations", "1", "--seed", "1"], "obs.h5"),
        (["sample", "--model", "model", "--observations", "obs.h5", "--num-samples", "5"], "s.h5"),
        (["train", "--data", "sims.h5"], "model/posterior.pt"),
    ],
)
def test_an_existing_output_is_kept_and_named(tmp_path: Path, capsys, stage, target) -> None:
    out = tmp_path / target
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"an earlier result")
    argv = [a if a not in ("model", "obs.h5", "sims.h5") else str(tmp_path / a) for a in stage]
    destination = out.parent if target.startswith("model/") else out
    assert cli.main([*argv, "--out", str(destination)]) == 2
    error = capsys.readouterr().err
    assert f"{out} exists" in error and "pass --overwrite to replace it" in error
    assert out.read_bytes() == b"an earlier result"


def test_observe_replaces_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "obs.h5"
    out.write_bytes(b"an earlier result")
    argv = ["observe", "--task", "two_moons", "--num-observations", "1", "--seed", "1"]
    assert (
        cli.main([*argv, "--num-reference-samples", "10", "--out", str(out), "--overwrite"]) == 0
    )
    assert out.read_bytes()[:4] == b"\x89HDF"

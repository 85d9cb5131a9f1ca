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
        (
            ["c2st", "--observation-samples", "s.h5", "--observations", "obs.h5", "--budget", "9"],
            "c.json",
        ),
        (
            ["validate", "--test-samples", "s.h5", "--observation-samples", "s.h5"]
            + ["--observations", "obs.h5"],
            "validation/metrics.json",
        ),
    ],
)
def test_an_existing_output_is_kept_and_named(tmp_path: Path, capsys, stage, target) -> None:
    out = tmp_path / target
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"an earlier result")
    argv = [a if a not in ("model", "obs.h5", "sims.h5") else str(tmp_path / a) for a in stage]
    destination = out.parent if target.startswith(("model/", "validation/")) else out
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


@pytest.mark.parametrize(
    "stage",
    [
        ["observe", "--task", "two_moons", "--num-observations", "3"],
        ["simulate", "--task", "two_moons", "--num-simulations", "10"],
    ],
)
def test_an_output_that_cannot_be_written_fails_before_the_work(
    tmp_path: Path, capsys, monkeypatch, stage
) -> None:
    """A file where the output's folder should be stops the stage before any simulation or
    reference is drawn, naming the path and the fix."""
    from pipeline.tasks.two_moons import TwoMoons

    def never(*args, **kwargs):
        raise AssertionError("the stage started its work before checking its output")

    monkeypatch.setattr(TwoMoons, "simulate", never)
    monkeypatch.setattr(TwoMoons, "reference", never)
    (tmp_path / "blocker").write_text("")
    out = tmp_path / "blocker" / "out.h5"
    assert cli.main([*stage, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot make the folder of {out}" in error and "choose another --out" in error


def test_references_that_cannot_fit_are_refused_before_any_is_drawn(tmp_path: Path, capsys):
    argv = ["observe", "--task", "two_moons", "--num-observations", "1000"]
    argv += ["--num-reference-samples", "10000000000", "--out", str(tmp_path / "obs.h5")]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "1000 observations with 10000000000 reference samples each take" in error
    assert "lower observations.num_reference_samples" in error
    assert not (tmp_path / "obs.h5").exists()

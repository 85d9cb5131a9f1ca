"""ExternalSimulator: a program as simulator, through its file contract.

The contract tests run a small Python script as "the user's program" (it supports both
``per`` modes and can be told to crash, hang, fail once or miscount); the realistic test
compiles ``examples/c_program/oscillator.c``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.tasks.external import ExternalSimulator
from tests import apt

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "c_program"
X_SHAPE = (3,)

# x[j] = theta_0 * (j + 1) + theta_1 + N(0, 0.1) noise from the seed; one row per simulation.
SCRIPT = textwrap.dedent(
    """
    import argparse, os, random, sys, time

    parser = argparse.ArgumentParser()
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--crash-above", type=float)
    parser.add_argument("--sleep-above", type=float)
    parser.add_argument("--short-above", type=float)
    parser.add_argument("--fail-once")
    parser.add_argument("--columns", action="store_true")  # one column per simulation
    parser.add_argument("values", nargs="*")
    args = parser.parse_args()
    if args.input:
        rows = [line.split() for line in open(args.input)]
    else:
        rows = [args.values]
    lines = []
    for row in rows:
        seed, theta = int(row[0]), [float(value) for value in row[1:]]
        fixed = os.environ.get("SIMULATOR_FIXED")  # the node's missing library installed
        if args.crash_above is not None and theta[0] > args.crash_above and not fixed:
            print("boom: theta_0 too large", file=sys.stderr)
            sys.exit(3)
        if args.sleep_above is not None and theta[0] > args.sleep_above:
            time.sleep(3600)  # never ends on its own
        if args.fail_once:
            marker = os.path.join(args.fail_once, str(seed))
            if not os.path.exists(marker):
                open(marker, "w").close()
                sys.exit(1)
        noise = random.Random(seed)
        x = [theta[0] * (j + 1) + theta[1] + noise.gauss(0, 0.1) for j in range(3)]
        if args.short_above is not None and theta[0] > args.short_above:
            x = x[:-1]
        lines.append(" ".join(repr(value) for value in x))
    if args.columns:
        lines = [" ".join(column) for column in zip(*(line.split() for line in lines))]
    text = "\\n".join(lines) + "\\n"
    if args.output and args.output.endswith(".npy"):
        import numpy
        numpy.save(args.output, numpy.array([line.split() for line in lines], dtype=float))
    elif args.output:
        open(args.output, "w").write(text)
    else:
        sys.stdout.write(text)
    """
)

pytestmark = pytest.mark.integration  # every test runs the external program


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("program") / "sim.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def oscillator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/c_program/oscillator.c compiled into a temporary folder."""
    if shutil.which("gcc") is None:
        if not apt.can_install():
            pytest.skip("gcc is not installed, and apt-get cannot install it here (not root)")
        apt.install("gcc", "libc6-dev")
    binary = tmp_path_factory.mktemp("c_program") / "oscillator"
    source = EXAMPLE / "oscillator.c"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), "-lm"], check=True)
    return binary


def simulator(script: Path, *flags: str, **options: object) -> ExternalSimulator:
    """The script as per-simulation simulator (``per="chunk"`` reads ``{input}``)."""
    if options.get("per") == "chunk":
        arguments = ["--input", "{input}", "--output", "{output}"]
    else:
        arguments = ["{seed}", "{theta}"]
    command = [sys.executable, str(script), *flags, *arguments]
    return ExternalSimulator.from_options({"command": command, **options}, script.parent, X_SHAPE)


def theta_grid(n: int = 6) -> np.ndarray:
    """``(n, 2)`` parameters with ``theta_0`` = 0, 0.2, ..., distinct per row."""
    return np.stack([np.linspace(0.0, 0.2 * (n - 1), n), np.full(n, 0.5)], axis=1)


def test_matches_a_direct_run_of_the_c_program(oscillator: Path) -> None:
    options = yaml.safe_load((EXAMPLE / "task.yaml").read_text())["simulator"]
    task_simulator = ExternalSimulator.from_options(options, oscillator.parent, (50,))
    theta = np.array([[1.5, 0.2], [0.7, 0.45], [2.9, 0.06]])
    x = task_simulator(theta, np.random.default_rng(7))
    assert x.shape == (3, 50) and x.dtype == np.float64
    seeds = np.random.default_rng(7).integers(0, 2**31 - 1, size=3)
    for row, seed, parameters in zip(x, seeds, theta, strict=True):
        arguments = [str(seed), *(format(value, ".17g") for value in parameters)]
        printed = subprocess.run(
            [str(oscillator), *arguments], capture_output=True, text=True, check=True
        ).stdout
        np.testing.assert_array_equal(row, np.array(printed.split(), dtype=np.float64))


def test_c_program_simulates_the_damped_oscillator(oscillator: Path) -> None:
    options = yaml.safe_load((EXAMPLE / "task.yaml").read_text())["simulator"]
    task_simulator = ExternalSimulator.from_options(options, oscillator.parent, (50,))
    theta = np.tile([[1.5, 0.2]], (40, 1))
    x = task_simulator(theta, np.random.default_rng(0))
    t = 0.2 * np.arange(50)
    residual = x - np.exp(-0.2 * t) * np.cos(1.5 * t)
    assert abs(residual.mean()) < 0.01  # 2000 draws of N(0, 0.1^2): standard error 0.002
    assert 0.09 < residual.std() < 0.11


def test_same_rng_same_x_other_seed_other_x(script: Path) -> None:
    program = simulator(script)
    theta = theta_grid(4)
    first = program(theta, np.random.default_rng(1))
    np.testing.assert_array_equal(first, program(theta, np.random.default_rng(1)))
    assert not np.any(first == program(theta, np.random.default_rng(2)))


def test_theta_reaches_the_program_at_full_precision(script: Path) -> None:
    theta = np.array([[0.1 + 1e-16 * 3, 1 / 3], [np.pi, -np.e]])
    x = simulator(script)(theta, np.random.default_rng(3))
    seeds = np.random.default_rng(3).integers(0, 2**31 - 1, size=2)
    # The script's x from (seed, theta) in Python: equal only if theta arrived bit for bit.
    for row, seed, (a, b) in zip(x, seeds, theta, strict=True):
        noise = random.Random(int(seed))
        np.testing.assert_array_equal(
            row, [a * (j + 1) + b + noise.gauss(0, 0.1) for j in range(3)]
        )


@pytest.mark.parametrize("output", ["stdout", "file", "npy"])
def test_per_chunk_equals_per_simulation(script: Path, output: str) -> None:
    theta = theta_grid(5)
    per_simulation = simulator(script)(theta, np.random.default_rng(4))
    options: dict[str, object] = {"per": "chunk"}
    if output == "npy":
        options["output_file"] = "x.npy"
    if output == "stdout":  # the chunk's rows on stdout instead of {output}
        command = [sys.executable, str(script), "--input", "{input}"]
        chunk = ExternalSimulator.from_options(
            {"command": command, "per": "chunk", "output": "stdout"}, script.parent, X_SHAPE
        )
    else:
        chunk = simulator(script, **options)
    np.testing.assert_array_equal(chunk(theta, np.random.default_rng(4)), per_simulation)


def test_a_chunk_written_a_column_per_simulation_is_not_read_across_simulations(
    script: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three lines of five numbers, for five simulations of three: a column per simulation.
    The chunk is refused (and each simulation run alone, whose one column is its x), where its
    numbers were read row after row, across simulations; rows wrapped at any other width are
    read as rows."""
    theta = theta_grid(5)
    expected = simulator(script)(theta, np.random.default_rng(12))
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.external"):
        x = simulator(script, "--columns", per="chunk", retries=0)(
            theta, np.random.default_rng(12)
        )
    np.testing.assert_array_equal(x, expected)
    assert "x.txt has 3 lines of 5 numbers: one column per simulation" in caplog.text
    program = simulator(script, per="chunk")  # x of 3 numbers
    program._check_lines(2, 3, 2, "x.txt")  # a line per simulation
    program._check_lines(1, 6, 2, "x.txt")  # all on one line
    program._check_lines(3, 3, 3, "x.txt")  # three of three: cannot be told from rows
    with pytest.raises(ValueError, match="3 lines of 2 numbers: one column per simulation"):
        program._check_lines(3, 2, 2, "x.txt")


def test_a_crash_costs_its_own_rows_only(script: Path, caplog: pytest.LogCaptureFixture) -> None:
    theta = theta_grid(6)  # theta_0 = 0, 0.2, ..., 1.0
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.external"):
        x = simulator(script, "--crash-above", "0.7")(theta, np.random.default_rng(5))
    crashed = theta[:, 0] > 0.7
    assert np.all(np.isnan(x[crashed])) and np.all(np.isfinite(x[~crashed]))
    assert x.shape == (6, *X_SHAPE)
    assert caplog.text.count("exit status 3") == crashed.sum()
    assert "boom: theta_0 too large" in caplog.text
    assert "theta = [0.8, 0.5]" in caplog.text


def test_chunk_failure_falls_back_to_one_row_at_a_time(
    script: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theta = theta_grid(6)
    good = simulator(script)(theta, np.random.default_rng(6))
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.external"):
        chunk = simulator(script, "--crash-above", "0.7", per="chunk", retries=0)
        x = chunk(theta, np.random.default_rng(6))
    crashed = theta[:, 0] > 0.7
    assert np.all(np.isnan(x[crashed]))
    np.testing.assert_array_equal(x[~crashed], good[~crashed])
    assert "a chunk of 6 simulations failed" in caplog.text


def test_timeout_kills_the_run(script: Path, caplog: pytest.LogCaptureFixture) -> None:
    theta = theta_grid(3)  # only theta_0 = 0.4 sleeps
    # 5 s: far more than the other two runs need on any machine, a bound and not a race.
    program = simulator(script, "--sleep-above", "0.3", timeout=5, retries=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.external"):
        x = program(theta, np.random.default_rng(8))
    assert np.all(np.isnan(x[2])) and np.all(np.isfinite(x[:2]))
    assert "timed out after 5 s" in caplog.text


def task_file(
    folder: Path, script: Path, *flags: str, seed_block_size: int = 10, **options: object
) -> Path:
    """A task.yaml running the script per simulation (one call per seed block)."""
    command = [sys.executable, str(script), *flags, "{seed}", "{theta}"]
    task = {
        "parameters": {"names": ["a", "b"]},
        "prior": {"uniform": {"low": [0, 0], "high": [1, 1]}},
        "x": {"shape": list(X_SHAPE)},
        "seed_block_size": seed_block_size,
        "simulator": {"command": command, "retries": 0, **options},
    }
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def test_a_resumed_run_simulates_again_the_chunks_whose_every_run_failed(
    script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Program runs that all failed for a cause fixed since (a library missing on a node): a
    resumed run simulates those chunks again and keeps the others, so its file is the one a run
    without failures writes, where every resume kept the NaN rows and stopped again with "fix
    the simulator". A chunk where some runs failed is kept: such failures are mostly the
    parameters', and simulating it again on every resume would undo what resuming saves."""
    from pipeline import simulation, storage
    from pipeline.parallel import SerialComm
    from pipeline.tasks import get_task

    spec = str(task_file(tmp_path, script, "--crash-above", "-1", seed_block_size=1))
    plan = simulation.SimulationPlan(spec, 40, 3, 10)
    out = tmp_path / "sims.h5"
    for start in (0, 10):  # chunk jobs on a node without the library
        simulation.run_chunk(plan, get_task(spec), out, start)
    monkeypatch.setenv("SIMULATOR_FIXED", "1")
    for start in (20, 30):  # the others on a node with it, then the run is killed
        simulation.run_chunk(plan, get_task(spec), out, start)
    shards = [storage.read_attrs(path) for path in sorted(simulation.shard_dir(out).glob("*.h5"))]
    assert [attrs["num_failed_runs"] for attrs in shards] == [10, 10, 0, 0]
    with caplog.at_level(logging.INFO, logger="pipeline.simulation"):
        simulation.run(plan, get_task(spec), out, SerialComm(), overwrite=False)
    assert caplog.text.count("failed: simulating it again") == 2
    assert caplog.text.count("already simulated, kept") == 2
    fresh = tmp_path / "fresh.h5"
    simulation.run(plan, get_task(spec), fresh, SerialComm(), overwrite=False)
    for key in ("theta", "x"):
        np.testing.assert_array_equal(
            getattr(storage.read_simulations(out), key),
            getattr(storage.read_simulations(fresh), key),
        )
    assert storage.read_attrs(out)["num_failed_runs"] == 0
    some = {"num_failed_runs": 3, "num_simulations": 10}
    assert not simulation.simulated_again(some, out)


def test_a_rounds_task_counts_its_programs_failed_runs(script: Path, tmp_path: Path) -> None:
    """A round's simulate job runs the user's task behind its region: the failures it counts
    are the program's."""
    from pipeline.rounds.region import TruncatedTask
    from pipeline.tasks import get_task

    task = get_task(str(task_file(tmp_path, script, "--crash-above", "0.5", seed_block_size=1)))
    task.simulate(theta_grid(6), np.random.default_rng(0))  # theta_0 0.6, 0.8, 1.0 crash
    truncated = TruncatedTask.__new__(TruncatedTask)  # its region does not enter here
    truncated.task = task
    assert truncated.failed_runs() == task.failed_runs() == (3, 0)


def test_timed_out_simulations_are_counted_and_warned_about(
    script: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Which runs outlive a timeout depends on the machines' load, so such a file may differ
    from another run's with the same seed: it counts them and the log says so."""
    from pipeline import simulation, storage
    from pipeline.parallel import SerialComm
    from pipeline.tasks import get_task

    # 5 s: far more than the other runs need on any machine, a bound and not a race.
    spec = str(task_file(tmp_path, script, "--sleep-above", "0.805", timeout=5))
    plan = simulation.SimulationPlan(spec, 30, 3, 10)
    out = tmp_path / "sims.h5"
    with caplog.at_level(logging.WARNING):
        simulation.run(plan, get_task(spec), out, SerialComm(), overwrite=False)
    slow = int((storage.read_simulations(out).theta[:, 0] > 0.805).sum())
    attrs = storage.read_attrs(out)
    assert slow > 0 and attrs["num_timed_out"] == attrs["num_failed_runs"] == slow
    assert f"{slow} of these simulations timed out: which ones depends on" in caplog.text


def test_retry_after_a_failed_first_attempt(script: Path, tmp_path: Path) -> None:
    theta = theta_grid(3)
    expected = simulator(script)(theta, np.random.default_rng(9))
    flaky = simulator(script, "--fail-once", str(tmp_path), retries=1)
    np.testing.assert_array_equal(flaky(theta, np.random.default_rng(9)), expected)
    assert len(list(tmp_path.iterdir())) == 3  # every simulation did fail once


def test_wrong_number_of_values_is_a_nan_row(
    script: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theta = theta_grid(3)
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.external"):
        x = simulator(script, "--short-above", "0.3", retries=0)(theta, np.random.default_rng(10))
    assert np.all(np.isnan(x[2])) and np.all(np.isfinite(x[:2]))
    assert "stdout held 2 numbers, expected 3" in caplog.text


def test_every_simulation_failing_raises(script: Path, tmp_path: Path) -> None:
    program = simulator(script, "--crash-above", "-1", retries=0)
    with pytest.raises(RuntimeError, match="all 3 simulations failed") as failure:
        program(theta_grid(3), np.random.default_rng(11))
    message = str(failure.value)
    assert str(script) in message and "exit status 3" in message
    assert "boom: theta_0 too large" in message


def test_no_rows_run_nothing(script: Path) -> None:
    x = simulator(script, "--crash-above", "-1")(np.zeros((0, 2)), np.random.default_rng(0))
    assert x.shape == (0, *X_SHAPE)


def test_missing_or_not_executable_program(tmp_path: Path) -> None:
    (tmp_path / "oscillator.c").write_text("int main(void) { return 0; }\n")
    options = {"command": ["./oscillator", "{seed}", "{theta}"]}
    with pytest.raises(ValueError, match="does not exist; compile it first"):
        ExternalSimulator.from_options(options, tmp_path, (50,))
    (tmp_path / "oscillator").write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="not executable: chmod \\+x"):
        ExternalSimulator.from_options(options, tmp_path, (50,))
    os.chmod(tmp_path / "oscillator", 0o755)
    program = ExternalSimulator.from_options(options, tmp_path, (50,))
    assert program.command[0] == str((tmp_path / "oscillator").resolve())
    with pytest.raises(ValueError, match=r"'oscillator' is not on PATH; to run .*, write ./osc"):
        ExternalSimulator.from_options({"command": ["oscillator", "{theta}"]}, tmp_path, (1,))
    # A bare name is looked up when run: stages that never simulate may have another PATH.
    ExternalSimulator.from_options({"command": ["no-such-program-xyz", "{theta}"]}, tmp_path, (1,))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": 3}, "allowed ones are \\['command', 'per'"),
        ({"per": "row"}, "per is 'row'"),
        ({"output": "pipe"}, "output is 'pipe'"),
        ({"timeout": 0}, "timeout is 0"),
        ({"retries": -1}, "retries is -1"),
        ({"command": [sys.executable, "{theta}", "{sed}"]}, "unknown placeholder"),
        ({"command": [sys.executable, "--theta={theta}"]}, "argument by itself"),
        ({"command": [sys.executable, "{seed}"]}, "passes no parameters"),
        ({"per": "chunk", "command": [sys.executable, "{seed}", "{input}"]}, "cannot hold"),
        ({"output": "file", "output_file": "../x.txt"}, "plain file name"),
        ({"command": "python sim.py {theta}"}, "a list of arguments"),
    ],
)
def test_invalid_options(tmp_path: Path, options: dict[str, object], message: str) -> None:
    options = {"command": [sys.executable, "{output}", "{theta}"], **options}
    with pytest.raises(ValueError, match=message):
        ExternalSimulator.from_options(options, tmp_path, X_SHAPE)


def test_a_command_that_passes_no_seed_is_warned_about(
    script: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A program given no seed draws the same noise for every simulation (or seeds itself from
    the clock): the data look fine and the posterior is over-confident, so the task's load
    says so; with {seed} or {input} it says nothing."""
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.external"):
        simulator(script)
        simulator(script, per="chunk")
        assert "passes no seed" not in caplog.text
        command = [sys.executable, str(script), "0", "{theta}"]
        ExternalSimulator.from_options({"command": command}, script.parent, X_SHAPE)
    assert "passes no seed ({seed}, or {input} with its seeds)" in caplog.text

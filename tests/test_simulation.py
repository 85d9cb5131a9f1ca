import subprocess

import numpy as np
import pytest

from pipeline import simulation, storage
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from tests.conftest import run_env, tool


def simulate(out, task="two_moons", n=2500, seed=3, chunk_size=1000):
    plan = simulation.SimulationPlan(task, n, seed, chunk_size)
    simulation.run(plan, get_task(task), out, SerialComm(), overwrite=False)
    return storage.read_simulations(out)


def test_data_do_not_depend_on_chunk_size_or_total(tmp_path):
    a = simulate(tmp_path / "a.h5", chunk_size=1000)
    b = simulate(tmp_path / "b.h5", chunk_size=333)
    c = simulate(tmp_path / "c.h5", n=1200, chunk_size=500)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.x[:1200], c.x)


def test_seed_changes_data(tmp_path):
    a = simulate(tmp_path / "a.h5", seed=1)
    b = simulate(tmp_path / "b.h5", seed=2)
    assert not np.allclose(a.x, b.x)


def test_output_is_self_describing_and_shards_are_removed(tmp_path):
    sims = simulate(tmp_path / "sims.h5", task="sn_cosmology", n=100, chunk_size=50)
    assert sims.x.shape == (100, 40) and sims.theta.shape == (100, 2)
    assert sims.attrs["parameter_names"] == ["Omega_m", "w0"]
    assert sims.attrs["x_unit"] == "mag" and sims.attrs["seed"] == 3
    assert sims.attrs["index_start"] == 0 and sims.attrs["index_stop"] == 100
    assert len(sims.attrs["config_digest"]) == 16
    assert "numpy" in sims.attrs["provenance"]["versions"]
    assert not simulation.shard_dir(tmp_path / "sims.h5").exists()


def test_nonfinite_simulations_are_counted_and_kept(tmp_path):
    sims = simulate(tmp_path / "sims.h5", task="nan_two_moons", n=2000)
    expected = int(np.sum(sims.theta[:, 0] > 0.8))
    assert expected > 100  # ~10% of U(-1, 1) draws
    assert sims.attrs["num_nonfinite"] == expected == int((~sims.finite).sum())


def test_resume_keeps_valid_shards_and_redoes_broken_ones(tmp_path, monkeypatch):
    out = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 3000, 3, 1000)
    task = get_task("two_moons")
    identity = plan.identity(task)
    for start, stop in plan.chunks()[:2]:
        simulation.write_shard(
            task, plan, identity, simulation.shard_path(out, start, stop), start, stop
        )
    # A half-written shard from a killed run must not count as done.
    simulation.shard_path(out, 1000, 2000).write_bytes(b"garbage")
    written = []
    original = simulation.write_shard
    monkeypatch.setattr(
        simulation, "write_shard", lambda *a: written.append(a[4:]) or original(*a)
    )
    simulation.run(plan, task, out, SerialComm(), overwrite=False)
    assert written == [(1000, 2000), (2000, 3000)]
    reference = simulate(tmp_path / "ref.h5", n=3000)
    np.testing.assert_array_equal(storage.read_simulations(out).x, reference.x)


@pytest.mark.parametrize(
    ("n", "chunk", "ranks", "message"),
    [
        (0, 10, 1, "must be positive"),
        (10, 0, 1, "--chunk-size must be positive"),
        (100, 100, 2, "2 MPI ranks but only 1 chunk"),
    ],
)
def test_bad_plans_are_refused(n, chunk, ranks, message):
    with pytest.raises(ValueError, match=message):
        simulation.check_plan(simulation.SimulationPlan("two_moons", n, 0, chunk), ranks)


def test_task_with_wrong_shape_is_named(tmp_path):
    with pytest.raises(ValueError, match="'wrong_shape' returned .* expected"):
        simulate(tmp_path / "sims.h5", task="wrong_shape", n=10)
    assert not (tmp_path / "sims.h5").exists()


def test_cli_refuses_existing_output(tmp_path):
    out = tmp_path / "sims.h5"
    simulate(out, n=10)
    args = ["simulate", "--task", "two_moons", "--num-simulations", "10", "--seed", "3"]
    from pipeline.cli import main

    assert main([*args, "--out", str(out)]) == 2
    assert main([*args, "--out", str(out), "--overwrite"]) == 0


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_ranks_give_identical_files(tmp_path, ranks):
    serial = simulate(tmp_path / "serial.h5", n=2500, chunk_size=500)
    out = tmp_path / f"mpi{ranks}.h5"
    command = [
        tool("mpiexec"),
        "-n",
        str(ranks),
        tool("pipeline"),
        "simulate",
        "--task",
        "two_moons",
        "--num-simulations",
        "2500",
        "--seed",
        "3",
        "--chunk-size",
        "500",
        "--out",
        str(out),
        "--log",
        str(tmp_path / "sim.log"),
    ]
    subprocess.run(command, check=True, env=run_env(), timeout=300)
    parallel = storage.read_simulations(out)
    np.testing.assert_array_equal(serial.x, parallel.x)
    np.testing.assert_array_equal(serial.theta, parallel.theta)
    assert "simulations on rank 0" in (tmp_path / "sim.log").read_text()


@pytest.mark.mpi
def test_failing_rank_aborts_the_job(tmp_path):
    command = [
        tool("mpiexec"),
        "-n",
        "2",
        tool("pipeline"),
        "simulate",
        "--task",
        "nope",
        "--num-simulations",
        "10",
        "--seed",
        "0",
        "--out",
        str(tmp_path / "x.h5"),
    ]
    result = subprocess.run(command, env=run_env(), timeout=120, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown task 'nope'" in result.stderr

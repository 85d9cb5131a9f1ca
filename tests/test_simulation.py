import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import resources, simulation, storage
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from pipeline.tasks.two_moons import TwoMoons
from tests.conftest import run_env, tool


def simulate(out, task="two_moons", n=2500, seed=3, chunk_size=1000, merge="copy"):
    plan = simulation.SimulationPlan(task, n, seed, chunk_size)
    simulation.run(plan, get_task(task), out, SerialComm(), overwrite=False, merge=merge)
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
    attrs = simulation.shard_attrs(plan, task)
    for start, stop in plan.chunks()[:2]:
        theta, x = simulation.simulate_range(task, plan.seed, start, stop)
        path = simulation.shard_path(out, start, stop)
        counted = {**attrs, "num_nonfinite": storage.count_nonfinite_rows(theta, x)}
        simulation.write_shard(path, theta, x, counted, start, stop)
    # A half-written shard from a killed run must not count as done.
    simulation.shard_path(out, 1000, 2000).write_bytes(b"garbage")
    written = []
    original = simulation.write_shard
    monkeypatch.setattr(
        simulation, "write_shard", lambda *a: written.append(a[4:6]) or original(*a)
    )
    simulation.run(plan, task, out, SerialComm(), overwrite=False)
    assert written == [(1000, 2000), (2000, 3000)]
    reference = simulate(tmp_path / "ref.h5", n=3000)
    np.testing.assert_array_equal(storage.read_simulations(out).x, reference.x)


def test_a_resume_names_the_code_revisions_of_the_shards_it_kept(tmp_path, monkeypatch, caplog):
    """A shard is kept by task, seed, chunk and region, not by the code that drew it: the merged
    file lists every revision its shards were simulated at, and the log says which were not
    this run's and what to delete if the simulator changed between them."""
    out = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 3000, 3, 1000)
    task = get_task("two_moons")
    revision = simulation.shard_attrs(plan, task)["provenance"]["code_revision"]
    attrs = simulation.shard_attrs(plan, task)
    attrs["provenance"] = {**attrs["provenance"], "code_revision": "0123abc"}
    theta, x = simulation.simulate_range(task, plan.seed, 0, 1000)
    counted = {**attrs, "num_nonfinite": 0}
    simulation.write_shard(simulation.shard_path(out, 0, 1000), theta, x, counted, 0, 1000)
    simulation.run(plan, task, out, SerialComm(), overwrite=False)
    assert storage.read_attrs(out)["shard_code_revisions"] == sorted(["0123abc", revision])
    assert "1 of 3 shards" in caplog.text and "code revision 0123abc" in caplog.text
    assert f"delete {simulation.shard_dir(out)} and rerun" in caplog.text
    caplog.clear()
    simulate(tmp_path / "fresh.h5", n=3000)
    assert storage.read_attrs(tmp_path / "fresh.h5")["shard_code_revisions"] == [revision]
    assert "code revision" not in caplog.text


def test_failed_shard_write_stops_the_run_and_keeps_finished_shards(tmp_path, monkeypatch):
    out = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 5000, 3, 1000)
    original = simulation.write_shard

    def disk_full_at_the_third(path, theta, x, attrs, start, stop, compression="gzip"):
        if start == 2000:
            raise OSError(28, "No space left on device")
        original(path, theta, x, attrs, start, stop, compression)

    # The write fails on the writer thread; the error must reach the caller, not vanish.
    monkeypatch.setattr(simulation, "write_shard", disk_full_at_the_third)
    with pytest.raises(OSError, match="No space left"):
        simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=False)
    assert not out.exists()
    finished = sorted(p.name for p in simulation.shard_dir(out).glob("chunk-*.h5"))
    assert finished[:2] == [
        "chunk-000000000000-000000001000.h5",
        "chunk-000000001000-000000002000.h5",
    ]
    assert "chunk-000000002000-000000003000.h5" not in finished


def test_slow_writes_get_their_own_chunk_not_a_reused_buffer(tmp_path, monkeypatch):
    # Chunks are simulated into two buffers in turn; a write still running when the rank has
    # simulated two more chunks must not see the buffer overwritten by the later one.
    out = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 5500, 3, 1000)
    original = simulation.write_shard

    def slow(path, theta, x, attrs, start, stop, compression="gzip"):
        time.sleep(0.05)  # far longer than simulating a chunk of 1000
        original(path, theta, x, attrs, start, stop, compression)

    monkeypatch.setattr(simulation, "write_shard", slow)
    simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=False)
    theta, x = simulation.simulate_range(get_task("two_moons"), 3, 0, 5500)
    result = storage.read_simulations(out)
    np.testing.assert_array_equal(result.theta, theta)
    np.testing.assert_array_equal(result.x, x)


def test_chunk_buffers_hand_out_two_pairs_in_turn():
    buffers = simulation.ChunkBuffers(get_task("sn_cosmology"), 100)
    first, second, third = buffers.next(100), buffers.next(100), buffers.next(30)
    assert first[0].shape == (100, 2) and first[1].shape == (100, 40)
    assert third[0].shape == (30, 2) and third[1].dtype == np.float32
    assert not np.shares_memory(first[1], second[1])
    assert np.shares_memory(first[0], third[0]) and np.shares_memory(first[1], third[1])


def test_rerun_removes_temporaries_of_killed_writes(tmp_path):
    out = tmp_path / "sims.h5"
    shard = simulation.shard_path(out, 1000, 2000)
    shard.parent.mkdir(parents=True)
    stale = shard.with_name(f".{shard.name}.tmp-999999")  # as atomic_h5 names them
    stale.write_bytes(b"half a shard")
    simulate(out, merge="virtual")
    assert not stale.exists()
    assert sorted(p.name for p in shard.parent.iterdir()) == [
        "chunk-000000000000-000000001000.h5",
        "chunk-000000001000-000000002000.h5",
        "chunk-000000002000-000000002500.h5",
    ]


def test_virtual_merge_maps_the_shards_and_names_a_missing_one(tmp_path):
    copied = simulate(tmp_path / "copy.h5", n=2500, chunk_size=700)
    out = tmp_path / "run" / "virtual.h5"
    mapped = simulate(out, n=2500, chunk_size=700, merge="virtual")
    np.testing.assert_array_equal(copied.theta, mapped.theta)
    np.testing.assert_array_equal(copied.x, mapped.x)
    assert mapped.attrs["merge"] == "virtual"
    # Paths are relative: the experiment folder may move as a whole.
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    np.testing.assert_array_equal(storage.read_simulations(moved / "virtual.h5").x, copied.x)
    shards = sorted(simulation.shard_dir(moved / "virtual.h5").iterdir())
    assert len(shards) == 4
    shards[2].unlink()
    with pytest.raises(storage.DataFileError, match=r"1 of them are missing .*chunk-0+1400"):
        storage.read_simulations(moved / "virtual.h5")


def test_a_virtual_file_whose_shard_another_run_rewrote_is_refused(tmp_path):
    out = tmp_path / "virtual.h5"
    simulate(out, n=2000, chunk_size=1000, merge="virtual", seed=1)
    # Another seed's chunk job into the same folder is refused: the file reads that shard.
    other = simulation.SimulationPlan("two_moons", 2000, 2, 1000)
    shard = simulation.shard_path(out, 1000, 2000)
    before = shard.read_bytes()
    with pytest.raises(
        storage.DataFileError, match=r"another run \(.*seed 1.*seed 2.*--overwrite"
    ):
        simulation.run_chunk(other, get_task("two_moons"), out, 1000)
    assert shard.read_bytes() == before
    # Told to replace it, the file would now read its rows: it refuses them instead.
    simulation.run_chunk(other, get_task("two_moons"), out, 1000, overwrite=True)
    with pytest.raises(storage.DataFileError, match=r"1 of them were written again .*-0+1000-"):
        storage.read_simulations(out)


def test_compression_changes_the_bytes_not_the_data(tmp_path):
    reference = simulate(tmp_path / "gzip.h5", n=1500, chunk_size=500)
    for compression in ("lzf", "none"):
        out = tmp_path / f"{compression}.h5"
        plan = simulation.SimulationPlan("two_moons", 1500, 3, 500)
        simulation.run(
            plan,
            get_task("two_moons"),
            out,
            SerialComm(),
            overwrite=False,
            compression=compression,
        )
        sims = storage.read_simulations(out)
        np.testing.assert_array_equal(sims.x, reference.x)
        assert sims.attrs["compression"] == compression
    with pytest.raises(ValueError, match="--merge must be one of copy, virtual, got 'vds'"):
        simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=True, merge="vds")
    with pytest.raises(ValueError, match="--compression must be one of gzip, lzf, none"):
        simulation.run(
            plan, get_task("two_moons"), out, SerialComm(), overwrite=True, compression="zstd"
        )


def test_a_virtual_file_states_the_compression_of_the_shards_it_maps(tmp_path):
    # The shards kept from an lzf run are mapped as they are, whatever the rerun asked.
    out, task = tmp_path / "virtual.h5", get_task("two_moons")
    plan = simulation.SimulationPlan("two_moons", 1000, 3, 500)
    for compression, overwrite in (("lzf", False), ("gzip", True)):
        simulation.run(
            plan,
            task,
            out,
            SerialComm(),
            overwrite=overwrite,
            merge="virtual",
            compression=compression,
        )
    assert storage.read_simulations(out).attrs["compression"] == "lzf"


def test_every_shard_carries_its_provenance(tmp_path):
    out = tmp_path / "sims.h5"
    simulate(out, task="sn_cosmology", n=100, chunk_size=40, merge="virtual")
    shard = simulation.shard_path(out, 40, 80)
    attrs = storage.read_attrs(shard)
    assert attrs["task"] == "sn_cosmology" and attrs["seed"] == 3
    assert (attrs["index_start"], attrs["index_stop"], attrs["num_simulations"]) == (40, 80, 40)
    assert attrs["parameter_names"] == ["Omega_m", "w0"] and attrs["x_unit"] == "mag"
    assert attrs["config_digest"] == storage.read_attrs(out)["config_digest"]
    assert {"numpy", "h5py"} <= set(attrs["provenance"]["versions"])
    assert attrs["provenance"]["code_revision"]
    with h5py.File(shard) as f:
        assert f["x"].compression == "gzip" and f["x"].dtype == np.float32


def test_unwritable_output_folder_is_named_and_nothing_is_left(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot make the folder of .*file/sims.h5 .*another --out"):
        simulate(tmp_path / "file" / "sims.h5", n=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_concurrent_chunk_jobs_probing_one_shard_folder_do_not_collide(tmp_path):
    # Scatter jobs start together and each probes OUT.shards/ first. Were the probe's name
    # shared, one job would delete the other's probe and the other would fail: 8 threads x 200
    # probes collide within a few calls that way.
    folder = tmp_path / "sims.h5.shards"

    def probe_many(_):
        for _ in range(200):
            simulation.check_writable(folder)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(probe_many, range(8)))
    assert list(folder.iterdir()) == []


def test_inspect_prints_attributes_shapes_and_nonfinite_counts(tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "sims.h5"
    sims = simulate(out, task="nan_two_moons", n=1000, chunk_size=500, merge="virtual")
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "@task = nan_two_moons" in printed and "@parameter_names" in printed
    bad = 2 * sims.attrs["num_nonfinite"]  # both columns of x are NaN in a bad row
    assert f"x: shape (1000, 2), float32, virtual over 2 shard(s), {bad} non-finite" in printed


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


def test_chunks_that_cut_seed_blocks_say_what_they_cost(tmp_path, caplog):
    """A chunk draws every seed block it touches in full, so chunks of 300 simulations over
    blocks of 1000 draw most blocks several times: the same data, at a cost the log states
    with the chunk size that avoids it. Chunks of whole blocks say nothing."""
    plan = simulation.SimulationPlan("two_moons", 3000, 3, 300)
    assert get_task("two_moons").seed_block_size == 1000
    # Chunks [0, 300), ..., [2700, 3000): eight touch one block, two ([900, 1200) and
    # [1800, 2100)) touch two.
    assert simulation.drawn_rows(plan, 1000) == 12_000
    out = tmp_path / "sims.h5"
    simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=False)
    assert "simulates 12000 rows for 3000 kept (4.0 times" in caplog.text
    assert "a multiple of 1000" in caplog.text
    np.testing.assert_array_equal(
        storage.read_simulations(out).x, simulate(tmp_path / "r.h5", n=3000).x
    )
    caplog.clear()
    simulate(tmp_path / "whole.h5", n=2500, chunk_size=2000)
    assert "seed blocks" not in caplog.text


class OffsetTwoMoons(TwoMoons):
    """two_moons whose x carries an offset float32 cannot resolve it on (arrival times in s)."""

    name = "offset_two_moons"
    seed_block_size = 1  # one simulation per block: the check must gather rows across blocks

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return super().simulate(theta, rng) + 1e9


def test_simulations_float32_cannot_resolve_are_refused_before_any_shard(tmp_path):
    plan = simulation.SimulationPlan("offset_two_moons", 200, 3, 100)
    out = tmp_path / "sims.h5"
    with pytest.raises(ValueError, match="x of task 'offset_two_moons': feature 0 varies by"):
        simulation.run(plan, OffsetTwoMoons(), out, SerialComm(), overwrite=False)
    assert not out.exists() and not list(tmp_path.rglob("chunk-*.h5"))


def test_fitted_plan_gives_every_rank_a_chunk():
    plan = simulation.SimulationPlan("two_moons", 100, 0, 100)
    assert plan.fitted_to(1) == plan
    fitted = plan.fitted_to(3)
    assert fitted.chunk_size == 34 and len(fitted.chunks()) == 3
    simulation.check_plan(fitted, 3)
    # Small chunks are kept; only too few chunks are split.
    assert simulation.SimulationPlan("two_moons", 100, 0, 10).fitted_to(3).chunk_size == 10
    # In whole seed blocks: a block cut between two ranks would be simulated by both.
    blocks = simulation.SimulationPlan("two_moons", 2500, 0, 2500)
    assert blocks.fitted_to(2, seed_block_size=1000).chunks() == [(0, 2000), (2000, 2500)]
    assert blocks.fitted_to(4, seed_block_size=1000).chunks() == [
        (0, 1000),
        (1000, 2000),
        (2000, 2500),
    ]
    assert simulation.SimulationPlan("two_moons", 20, 0, 20).fitted_to(4, 1000).chunk_size == 1000
    # A configured chunk smaller than a block is rounded up too: four chunks of 300 would
    # each simulate block 0 in full.
    assert simulation.SimulationPlan("two_moons", 1000, 0, 300).fitted_to(4, 1000).chunks() == [
        (0, 1000)
    ]


@pytest.mark.parametrize("merge", ["copy", "virtual"])
def test_scattered_chunks_merge_into_the_same_data(tmp_path, merge):
    reference = simulate(tmp_path / "one-run.h5", n=2500, chunk_size=1000)
    plan = simulation.SimulationPlan("two_moons", 2500, 3, 1000)
    out, task = tmp_path / "sims.h5", get_task("two_moons")
    # One job per chunk, in any order, each without MPI.
    shards = [simulation.run_chunk(plan, task, out, start) for start in (2000, 0, 1000)]
    assert [p.name for p in shards][1] == "chunk-000000000000-000000001000.h5"
    simulation.merge(plan, task, out, overwrite=False, merge=merge)
    merged = storage.read_simulations(out)
    np.testing.assert_array_equal(reference.x, merged.x)
    np.testing.assert_array_equal(reference.theta, merged.theta)
    assert merged.attrs["num_simulations"] == 2500
    # The shards are the scatter jobs' outputs: kept, so that no job reruns.
    assert all(p.exists() for p in shards)
    # A rerun of one chunk keeps its finished shard.
    before = shards[0].stat().st_mtime_ns
    simulation.run_chunk(plan, task, out, 2000)
    assert shards[0].stat().st_mtime_ns == before


def test_a_chunk_job_removes_its_killed_write_and_no_other(tmp_path):
    plan = simulation.SimulationPlan("two_moons", 2500, 3, 1000)
    out, task = tmp_path / "sims.h5", get_task("two_moons")
    mine, other = simulation.shard_path(out, 0, 1000), simulation.shard_path(out, 1000, 2000)
    mine.parent.mkdir(parents=True)
    stale = [p.with_name(f".{p.name}.tmp-999999") for p in (mine, other)]  # as atomic_h5 names
    for path in stale:
        path.write_bytes(b"half a shard")
    assert simulation.run_chunk(plan, task, out, 0) == mine
    # The other chunk's temporary may be a live write of a job running beside this one.
    assert not stale[0].exists() and stale[1].exists()
    assert storage.read_simulations(mine).attrs["index_stop"] == 1000


def test_merge_names_missing_shards_and_writes_nothing(tmp_path):
    plan = simulation.SimulationPlan("two_moons", 2500, 3, 1000)
    out, task = tmp_path / "sims.h5", get_task("two_moons")
    simulation.run_chunk(plan, task, out, 0)
    with pytest.raises(storage.DataFileError, match=r"2 of 3 shards .*chunk-0+1000-"):
        simulation.merge(plan, task, out, overwrite=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="--chunk 700 is not the start of a chunk"):
        simulation.run_chunk(plan, task, out, 700)
    # Another run's shards are named as such, not as missing (whose advice, to simulate the
    # chunk, would have rewritten the other run's shard).
    other = simulation.SimulationPlan("two_moons", 2500, 4, 1000)
    with pytest.raises(storage.DataFileError, match=r"chunk-0+-0+1000.h5 belongs to another run"):
        simulation.merge(other, task, out, overwrite=False)


def test_cli_scatter_and_merge(tmp_path):
    from pipeline.cli import main

    out = tmp_path / "sims.h5"
    plan = ["--task", "two_moons", "--num-simulations", "30", "--seed", "3", "--chunk-size", "20"]
    assert main(["merge", *plan, "--out", str(out)]) == 2  # nothing simulated yet
    for start in ("0", "20"):
        assert main(["simulate", *plan, "--chunk", start, "--out", str(out)]) == 0
    assert main(["merge", *plan, "--out", str(out)]) == 0
    with h5py.File(simulation.shard_path(out, 0, 20), "r") as shard:
        assert shard["x"].compression == "gzip"
    lzf = tmp_path / "lzf.h5"
    assert (
        main(["simulate", *plan, "--chunk", "20", "--compression", "lzf", "--out", str(lzf)]) == 0
    )
    with h5py.File(simulation.shard_path(lzf, 20, 30), "r") as shard:
        assert shard["x"].compression == "lzf"
    np.testing.assert_array_equal(
        storage.read_simulations(out).x, simulate(tmp_path / "ref.h5", n=30).x
    )


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
@pytest.mark.parametrize(
    ("ranks", "chunk_size", "fit"),
    [(1, 500, False), (2, 500, False), (3, 300, False), (4, 2500, True)],
)
def test_mpi_ranks_give_identical_files(tmp_path, ranks, chunk_size, fit):
    # 3 and 4 ranks oversubscribe a 2-core machine, which MPICH allows.
    serial = simulate(tmp_path / "serial.h5", n=2500, chunk_size=1000)
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
        str(chunk_size),
        "--out",
        str(out),
        "--log",
        str(tmp_path / "sim.log"),
        *(["--fit-chunks"] if fit else []),
    ]
    subprocess.run(command, check=True, env=run_env(), timeout=300)
    parallel = storage.read_simulations(out)
    np.testing.assert_array_equal(serial.x, parallel.x)
    np.testing.assert_array_equal(serial.theta, parallel.theta)
    assert parallel.attrs["mpi_ranks"] == ranks
    assert "simulations on rank 0" in (tmp_path / "sim.log").read_text()


@pytest.mark.mpi
def test_fitted_chunks_leave_ranks_idle_when_there_are_fewer_simulations(tmp_path):
    # A workflow sets its ranks once (the SLURM profile's tasks); a split of two simulations
    # (one seed block, so one chunk) on three ranks must run, not ask for another chunk size.
    serial = simulate(tmp_path / "serial.h5", n=2, chunk_size=1000)
    out = tmp_path / "mpi.h5"
    command = [tool("mpiexec"), "-n", "3", tool("pipeline"), "simulate", "--task", "two_moons"]
    command += ["--num-simulations", "2", "--seed", "3", "--fit-chunks", "--out", str(out)]
    command += ["--log", str(tmp_path / "sim.log")]
    subprocess.run(command, check=True, env=run_env(), timeout=300)
    np.testing.assert_array_equal(serial.x, storage.read_simulations(out).x)
    assert "1 chunk(s) for 3 MPI ranks: 2 rank(s) stay idle" in (tmp_path / "sim.log").read_text()


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
        "--log",
        str(tmp_path / "sim.log"),
    ]
    result = subprocess.run(command, env=run_env(), timeout=120, capture_output=True, text=True)
    assert result.returncode != 0
    # Asserted on the log files: the launcher may drop a rank's last stderr lines when the first
    # rank to fail aborts the job, while each rank's log file is flushed before the abort.
    logs = [tmp_path / "sim.log", tmp_path / "sim.log.rank1"]
    assert any("unknown task 'nope'" in p.read_text() for p in logs if p.exists())


# A subprocess that simulates two_moons in seed blocks of 100 and, once a process has simulated
# GATE_AFTER blocks, waits until the file GATE exists: a test can kill a run at a known point
# whatever the machine's speed. A variant raises on MPI rank 1 while rank 0 waits at its gate.
GATED_SIMULATE = """
import os, sys, time
from pathlib import Path
from pipeline.cli import main
from pipeline.tasks import register
from pipeline.tasks.two_moons import TwoMoons

class GatedTwoMoons(TwoMoons):
    name = "gated_two_moons"
    seed_block_size = 100
    blocks = 0

    def simulate(self, theta, rng):
        GatedTwoMoons.blocks += 1
        if GatedTwoMoons.blocks > int(os.environ.get("GATE_AFTER", sys.maxsize)):
            while not Path(os.environ["GATE"]).exists():
                time.sleep(0.05)
        return super().simulate(theta, rng)

class BrokenOnRank1(GatedTwoMoons):
    name = "broken_two_moons"

    def simulate(self, theta, rng):
        if os.environ.get("PMI_RANK") == "1":
            raise ArithmeticError("simulator diverged")
        return super().simulate(theta, rng)

register("gated_two_moons", GatedTwoMoons)
register("broken_two_moons", BrokenOnRank1)
sys.exit(main(sys.argv[1:]))
"""


def gated_env(gate: Path, after: int) -> dict[str, str]:
    """The environment in which every process of GATED_SIMULATE stops after ``after`` blocks
    until ``gate`` exists."""
    return {**run_env(), "GATE": str(gate), "GATE_AFTER": str(after)}


@pytest.mark.mpi
@pytest.mark.parametrize("victim", ["job", "rank"])
def test_killed_run_resumes_from_its_finished_shards(tmp_path, victim):
    out, log_file, gate = tmp_path / "sims.h5", tmp_path / "sim.log", tmp_path / "gate"
    command = [
        tool("mpiexec"),
        "-n",
        "2",
        sys.executable,
        "-c",
        GATED_SIMULATE,
        "simulate",
        "--task",
        "gated_two_moons",
        "--num-simulations",
        "4000",
        "--seed",
        "3",
        "--chunk-size",
        "200",
        "--out",
        str(out),
        "--log",
        str(log_file),
    ]
    # Each rank simulates two chunks (four blocks), writes them and waits at the gate.
    job = subprocess.Popen(command, env=gated_env(gate, 4), start_new_session=True)
    shards = simulation.shard_dir(out)
    deadline = time.monotonic() + 300  # a bound for a stuck run, not a timing assumption
    while len(list(shards.glob("chunk-*.h5"))) < 4:
        assert job.poll() is None, "the run ended before it wrote four shards"
        assert time.monotonic() < deadline, "four shards not written in 5 minutes"
        time.sleep(0.05)
    if victim == "job":
        job.send_signal(signal.SIGKILL)  # mpiexec itself: the ranks lose their launcher
    else:
        pids = subprocess.run(
            ["pgrep", "-f", str(out)],
            capture_output=True,
            text=True,
        ).stdout.split()
        ranks = [int(p) for p in pids if int(p) != job.pid]
        assert ranks, "no rank process found"
        subprocess.run(["kill", "-KILL", str(max(ranks))])
    job.wait(timeout=60)
    subprocess.run(["pkill", "-KILL", "-f", str(out)])  # no orphan rank keeps writing
    assert job.returncode != 0 and not out.exists()
    finished = {p.name for p in shards.glob("chunk-*.h5")}
    assert len(finished) == 4, finished
    gate.touch()
    resumed = subprocess.run(
        command, env=gated_env(gate, 4), timeout=300, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    kept = resumed.stderr.count("already simulated, kept")
    assert kept == len(finished)
    # The same data as an uninterrupted run: two_moons in seed blocks of 100.
    two_moons = get_task("two_moons")
    two_moons.seed_block_size = 100
    theta, x = simulation.simulate_range(two_moons, 3, 0, 4000)
    result = storage.read_simulations(out)
    np.testing.assert_array_equal(result.theta, theta.astype(np.float32))
    np.testing.assert_array_equal(result.x, x.astype(np.float32))


@pytest.mark.mpi
def test_rank_that_raises_aborts_the_whole_job(tmp_path):
    out = tmp_path / "sims.h5"
    command = [tool("mpiexec"), "-n", "2", sys.executable, "-c", GATED_SIMULATE, "simulate"]
    command += ["--task", "broken_two_moons", "--num-simulations", "100000", "--seed", "3"]
    command += ["--chunk-size", "200", "--out", str(out), "--log", str(tmp_path / "sim.log")]
    # Rank 0 waits at a gate nobody opens after its first chunk: the run ends only if rank 1's
    # failure aborts it (the timeout is a bound for that never happening, not for its speed).
    env = gated_env(tmp_path / "gate", 2)
    result = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0 and not out.exists()
    assert (
        "rank 1 failed: ArithmeticError: simulator diverged"
        in (tmp_path / "sim.log.rank1").read_text()
    )


@pytest.mark.mpi
def test_one_chunk_refuses_mpi_ranks(tmp_path):
    command = [tool("mpiexec"), "-n", "2", tool("pipeline"), "simulate", "--task", "two_moons"]
    command += ["--num-simulations", "40", "--seed", "1", "--chunk-size", "20", "--chunk", "0"]
    command += ["--out", str(tmp_path / "sims.h5")]
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--chunk computes one chunk in one process, but 2 MPI ranks" in result.stderr
    assert not simulation.shard_dir(tmp_path / "sims.h5").exists()


def test_a_second_run_into_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    from pipeline.locking import OutputBusyError, OutputLock

    out = tmp_path / "sims.h5"
    # The first run, as another process holding the output's lock (a flock held by this test).
    with OutputLock(simulation.shard_dir(out), "sims.h5 (two_moons, seed 1)"):
        with pytest.raises(
            OutputBusyError,
            match=r"cannot write .*sims.h5 \(two_moons, seed 2\): another run holds it "
            r"\(process \d+ on .*writing sims.h5 \(two_moons, seed 1\)\)",
        ):
            simulate(out, seed=2)
        assert not out.exists()
    # Released (as when its holder exits, however it exits): the output is free again.
    assert simulate(out, seed=2).attrs["seed"] == 2
    assert not simulation.shard_dir(out).exists()


def test_a_lock_file_removed_by_its_releasing_holder_is_not_taken(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder released (and removed) it must
    not lock that removed file: a third run would lock a new one beside it."""
    from pipeline import locking

    flock = locking.fcntl.flock
    released = []

    def holder_releases_first(fd, operation):
        if not released:  # the holder's exit, between this run's open and its flock
            released.append(True)
            (tmp_path / ".lock").unlink()
        flock(fd, operation)

    monkeypatch.setattr(locking.fcntl, "flock", holder_releases_first)
    with locking.OutputLock(tmp_path, "sims.h5") as lock:
        assert released
        # The lock is held on the file that now stands at the path, so a third run is refused.
        assert os.path.samestat(os.fstat(lock.fd), os.stat(tmp_path / ".lock"))
        monkeypatch.setattr(locking.fcntl, "flock", flock)
        with pytest.raises(locking.OutputBusyError):
            locking.OutputLock(tmp_path, "sims.h5").__enter__()


def test_a_lock_file_that_never_reads_as_current_is_held_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    # A file system whose fstat and stat never agree: a bounded number of retries, then the
    # lock as taken, said in the log (not an endless loop).
    from pipeline import locking

    monkeypatch.setattr(locking.OutputLock, "_is_current", lambda self, fd: False)
    with locking.OutputLock(tmp_path, "sims.h5") as lock:
        assert lock.fd is not None
    assert "cannot tell whether" in caplog.text


def test_a_shard_of_another_run_is_never_merged(tmp_path, monkeypatch):
    """Two runs with different seeds writing one output's shards (a concurrent writer on a file
    system without locks): the merge refuses, naming both runs, and writes nothing."""
    out = tmp_path / "sims.h5"
    foreign = simulation.SimulationPlan("two_moons", 2500, 9, 1000)
    write = simulation.write_shard

    def write_and_intrude(path, theta, x, attrs, start, stop, compression="gzip"):
        write(path, theta, x, attrs, start, stop, compression)
        if start == 2000:  # after this run's last shard, the other run rewrites chunk 0
            other = simulation.simulate_range(get_task("two_moons"), 9, 0, 1000)
            other_attrs = {
                **simulation.shard_attrs(foreign, get_task("two_moons")),
                "num_nonfinite": 0,
            }
            write(simulation.shard_path(out, 0, 1000), *other, other_attrs, 0, 1000, compression)

    monkeypatch.setattr(simulation, "write_shard", write_and_intrude)
    with pytest.raises(
        storage.DataFileError, match=r"belongs to another run \(task 'two_moons', seed 9"
    ):
        simulate(out, seed=3)
    assert not out.exists()
    # The rerun recomputes the foreign chunk: the result equals a clean run's.
    monkeypatch.setattr(simulation, "write_shard", write)
    plan = simulation.SimulationPlan("two_moons", 2500, 3, 1000)
    simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=False)
    np.testing.assert_array_equal(
        storage.read_simulations(out).x, simulate(tmp_path / "clean.h5", seed=3).x
    )


def test_a_run_where_every_simulation_failed_is_not_merged(tmp_path):
    from pipeline.tasks.two_moons import TwoMoons

    class AllNaN(TwoMoons):
        def simulate(self, theta, rng):
            return np.full((len(theta), 2), np.nan)

    out = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 300, 1, 100)
    with pytest.raises(ValueError, match=r"all 300 simulations of two_moons returned NaN or inf"):
        simulation.run(plan, AllNaN(), out, SerialComm(), overwrite=False)
    assert not out.exists()
    assert len(list(simulation.shard_dir(out).glob("chunk-*.h5"))) == 3  # kept, not lost


def test_a_plan_larger_than_the_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "sims.h5"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda _: usage._replace(free=10**6))
    # 10^5 two_moons simulations: 1.6 MB of float32 theta and x, twice that for shards and copy.
    with pytest.raises(ValueError, match=r"take about 3.2 MB .*copy merge.* has 1.0 MB free"):
        simulate(out, n=100_000)
    assert not out.exists() and not simulation.shard_dir(out).exists()


def test_chunks_larger_than_memory_are_refused_and_short_plans_use_small_buffers(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(simulation, "available_memory", lambda: 10**6)
    with pytest.raises(ValueError, match=r"need 3.2 MB of memory .* lower --chunk-size"):
        simulate(tmp_path / "a.h5", n=200_000, chunk_size=100_000)
    # A chunk size far above the plan's size needs buffers of the plan's size only.
    assert len(simulate(tmp_path / "b.h5", n=1000, chunk_size=10**12).x) == 1000

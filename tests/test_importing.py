"""`pipeline import`: existing (theta, x) arrays into the pipeline's HDF5 layout."""

from __future__ import annotations

import logging
import shutil
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import cli, storage
from pipeline.importing import Source, import_simulations, open_array, parse_source
from pipeline.tasks import BoxUniform, get_task
from pipeline.tasks.declared import DeclaredTask
from pipeline.tasks.two_moons import TwoMoons
from tests.conftest import ROOT

TASK = get_task("two_moons")  # theta (N, 2), x (N, 2)


class OneParameter(TwoMoons):
    """A task with one parameter and maps of 4 x 3 values, for the shape rules."""

    name = "one_parameter"
    parameter_names = ("omega_m",)
    parameter_units = ("",)
    x_shape = (4, 3)

    @property
    def prior(self) -> BoxUniform:
        return BoxUniform((0.0,), (1.0,))


def arrays(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``theta`` (n, 2) and ``x`` (n, 2), as an earlier campaign would have saved."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, 2)), rng.normal(size=(n, 2))


def save_npy(folder: Path, theta: np.ndarray, x: np.ndarray) -> tuple[str, str]:
    np.save(folder / "theta.npy", theta)
    np.save(folder / "x.npy", x)
    return str(folder / "theta.npy"), str(folder / "x.npy")


def save_npz(folder: Path, theta: np.ndarray, x: np.ndarray) -> tuple[str, str]:
    np.savez(folder / "sims.npz", theta=theta, x=x)
    return f"{folder / 'sims.npz'}:theta", f"{folder / 'sims.npz'}:x"


def save_npz_compressed(folder: Path, theta: np.ndarray, x: np.ndarray) -> tuple[str, str]:
    np.savez_compressed(folder / "sims.npz", theta=theta, x=x)
    return f"{folder / 'sims.npz'}:theta.npy", f"{folder / 'sims.npz'}:x"


def save_hdf5(folder: Path, theta: np.ndarray, x: np.ndarray) -> tuple[str, str]:
    with h5py.File(folder / "camels.hdf5", "w") as f:
        f["LH/params/theta"] = theta
        f.create_dataset("LH/x", data=x, chunks=(64, 2), compression="gzip")
        f["LH/notes"] = np.arange(3)
    return f"{folder / 'camels.hdf5'}:LH/params/theta", f"{folder / 'camels.hdf5'}:/LH/x"


SAVERS = [save_npy, save_npz, save_npz_compressed, save_hdf5]


def leftovers(folder: Path, *inputs: str) -> list[str]:
    """Files in ``folder`` besides the sources: outputs or temporaries left by an import."""
    kept = {Path(text.split(":")[0]).name for text in inputs}
    return sorted(p.name for p in folder.iterdir() if p.name not in kept)


@pytest.mark.parametrize("save", SAVERS, ids=lambda f: f.__name__)
def test_round_trip_gives_the_exact_float32_rows_and_simulate_like_attributes(
    tmp_path: Path, save: Callable
) -> None:
    theta, x = arrays()
    sources = save(tmp_path, theta, x)
    out = tmp_path / "out" / "train.h5"
    written = import_simulations(TASK, *sources, out, block_rows=64)
    sims = storage.read_simulations(out, task="two_moons")
    np.testing.assert_array_equal(sims.theta, theta.astype(np.float32))
    np.testing.assert_array_equal(sims.x, x.astype(np.float32))
    assert sims.theta.dtype == sims.x.dtype == np.float32
    attrs = sims.attrs
    assert attrs == written
    assert attrs["parameter_names"] == ["theta_1", "theta_2"] and attrs["x_unit"] == ""
    assert attrs["imported"] is True and "seed" not in attrs
    assert (attrs["index_start"], attrs["index_stop"], attrs["num_simulations"]) == (0, 500, 500)
    assert attrs["complete"] and attrs["format_version"] == storage.FORMAT_VERSION
    assert attrs["num_nonfinite"] == 0
    assert attrs["config_digest"] == attrs["provenance"]["config_digest"]
    assert [s["role"] for s in attrs["sources"]] == ["theta", "x"]
    for source, text in zip(attrs["sources"], sources, strict=True):
        path = Path(source["resolved_path"])
        assert source["path"] == text.split(":")[0] and path.is_absolute()
        assert source["size_bytes"] == path.stat().st_size and len(source["sha256"]) == 64
    with h5py.File(out, "r") as f:  # chunked and compressed as `pipeline simulate` writes
        assert f["x"].compression == "gzip" and f["x"].chunks[1:] == (2,)


def test_the_written_file_feeds_the_training_data_module(tmp_path: Path) -> None:
    from pipeline.data import SimulationDataModule

    theta, x = arrays()
    out = tmp_path / "train.h5"
    import_simulations(TASK, *save_npy(tmp_path, theta, x), out, compression="lzf")
    data = SimulationDataModule(out, 0.2, 64, seed=0, task="two_moons", loading="stream")
    data.setup("fit")
    assert (data.num_train, data.num_val) == (500 - 128, 128)  # 8 blocks of 64, 2 for val


def test_negative_rows_split_one_archive_into_train_and_test(tmp_path: Path) -> None:
    theta, x = arrays(n=1000)
    sources = save_npz(tmp_path, theta, x)
    train = import_simulations(TASK, *sources, tmp_path / "train.h5", stop=-300)
    test = import_simulations(TASK, *sources, tmp_path / "test.h5", start=-300)
    assert (train["index_start"], train["index_stop"]) == (0, 700)
    assert (test["index_start"], test["index_stop"]) == (700, 1000)
    both = [storage.read_simulations(tmp_path / f"{s}.h5") for s in ("train", "test")]
    np.testing.assert_array_equal(np.concatenate([s.x for s in both]), x.astype(np.float32))
    middle = import_simulations(TASK, *sources, tmp_path / "mid.h5", start=100, stop=-800)
    assert middle["num_simulations"] == 100
    np.testing.assert_array_equal(
        storage.read_simulations(tmp_path / "mid.h5").theta, theta[100:200].astype(np.float32)
    )


def test_an_import_records_the_definition_of_a_users_task(tmp_path: Path) -> None:
    """What sample tells a user's tasks apart by; the rows' identity does not depend on it."""
    from pipeline.tasks.base import source_digest

    task = get_task(str(ROOT / "examples/archive/task.yaml"))
    theta = np.load(ROOT / "examples/archive/theta.npy")[:50]
    x = np.load(ROOT / "examples/archive/x.npy")[:50]
    attrs = import_simulations(task, *save_npy(tmp_path, theta, x), tmp_path / "out.h5")
    assert attrs["task_digest"] == source_digest(task)
    assert "task_digest" not in import_simulations(
        TASK, *save_npy(tmp_path, *arrays(50)), tmp_path / "builtin.h5"
    )


def test_a_split_of_an_archive_sorted_by_a_parameter_is_refused(tmp_path: Path) -> None:
    """Sorted by theta_1 (or grouped by set), an archive's last rows are a corner of the prior:
    coverage measured on them said nothing of the posterior elsewhere."""
    theta, x = arrays(2000, seed=1)
    order = np.argsort(theta[:, 1])
    sources = save_npy(tmp_path, theta[order], x[order])
    with pytest.raises(ValueError, match=r"rows \[1700, 2000\) differ .* in theta_2 .*Shuffle"):
        import_simulations(TASK, *sources, tmp_path / "test.h5", start=-300)
    assert not (tmp_path / "test.h5").exists()
    # The archive as drawn (rows in random order) splits, at several seeds: p is uniform there;
    # so does one of ten realisations per parameter set in consecutive rows (each set counts
    # once: as ten, they refused 14 of 20 such archives).
    for seed in range(5):
        theta, x = arrays(2000, seed=seed)
        sources = save_npy(tmp_path, theta, x)
        import_simulations(TASK, *sources, tmp_path / f"test{seed}.h5", start=-300)
        theta, x = np.repeat(theta[:200], 10, axis=0), arrays(2000, seed=seed + 10)[1]
        sources = save_npy(tmp_path, theta, x)
        import_simulations(TASK, *sources, tmp_path / f"sets{seed}.h5", start=-300)


def test_same_rows_of_the_same_archive_give_the_same_digest(tmp_path: Path) -> None:
    theta, x = arrays()
    first = import_simulations(TASK, *save_npz(tmp_path, theta, x), tmp_path / "a.h5")
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tmp_path / "sims.npz", moved / "renamed.npz")
    again = import_simulations(
        TASK, f"{moved}/renamed.npz:theta", f"{moved}/renamed.npz:x", tmp_path / "b.h5"
    )
    assert again["config_digest"] == first["config_digest"]
    sources = save_npz(tmp_path, theta, x)
    other_rows = import_simulations(TASK, *sources, tmp_path / "c.h5", stop=-1)
    x[123, 1] += 1e-3
    changed = import_simulations(TASK, *save_npz(tmp_path, theta, x), tmp_path / "d.h5")
    digests = {r["config_digest"] for r in (first, other_rows, changed)}
    assert len(digests) == 3


def test_one_array_has_one_name_in_the_lineage_however_it_was_written(tmp_path: Path) -> None:
    """``sims.npz:x`` and ``sims.npz:x.npy``, ``camels.hdf5:/LH/x`` and ``:LH/x``, a file's only
    dataset named or not: the same rows, recorded under the same member, so that a test set
    sharing rows with the training set is refused however the paths were typed."""
    theta, x = arrays()
    np.savez(tmp_path / "sims.npz", theta=theta, x=x)
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["x"] = x
    archive, one = tmp_path / "sims.npz", tmp_path / "one.h5"
    spellings = [[f"{archive}:x", f"{archive}:x.npy"], [f"{one}", f"{one}:x", f"{one}:/x"]]
    for group, written in enumerate(spellings):
        members = []
        for i, source in enumerate(written):
            out = tmp_path / f"import-{group}-{i}.h5"
            import_simulations(TASK, f"{archive}:theta", source, out)
            attrs = storage.read_attrs(out)
            members.append(storage.imported_rows(attrs)["x"])
        assert len(set(members)) == 1, members


@pytest.mark.parametrize("layout", ["chunked", "contiguous"])
def test_an_archive_whose_writer_stopped_early_is_refused(tmp_path: Path, layout: str) -> None:
    """Chunks a writer never reached read as zeros: 400 rows of theta = x = 0 were imported
    (as the test set, the last rows). Refused, and nothing written."""
    theta, x = arrays(1000)
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f["theta"] = theta
        if layout == "chunked":
            f.create_dataset("x", shape=x.shape, dtype="f8", chunks=(100, 2))[:600] = x[:600]
        else:
            f.create_dataset("x", shape=x.shape, dtype="f8")  # allocated, never written
    source = f"{tmp_path / 'partial.h5'}"
    with pytest.raises(storage.DataFileError, match=r"only \d+ of the \d+ chunks .* written"):
        import_simulations(TASK, f"{source}:theta", f"{source}:x", tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_a_virtual_dataset_of_complete_files_is_imported(tmp_path: Path) -> None:
    # A virtual dataset has no storage of its own (the pipeline's `merge: virtual` writes them).
    theta, x = arrays(100)
    with h5py.File(tmp_path / "part.h5", "w") as f:
        f["theta"], f["x"] = theta, x
    with h5py.File(tmp_path / "joined.h5", "w") as f:
        for name, array in (("theta", theta), ("x", x)):
            layout = h5py.VirtualLayout(shape=array.shape, dtype="f8")
            layout[:] = h5py.VirtualSource(tmp_path / "part.h5", name, shape=array.shape)
            f.create_virtual_dataset(name, layout)
    joined = tmp_path / "joined.h5"
    import_simulations(TASK, f"{joined}:theta", f"{joined}:x", tmp_path / "out.h5")
    assert storage.read_simulations(tmp_path / "out.h5").x.shape == (100, 2)
    # Without its source file its rows read as zeros: refused.
    (tmp_path / "part.h5").unlink()
    with pytest.raises(storage.DataFileError, match=r"source files are missing \(.*part.h5\)"):
        import_simulations(TASK, f"{joined}:theta", f"{joined}:x", tmp_path / "again.h5")


def test_nonfinite_rows_are_kept_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theta, x = arrays()
    x[[3, 300]] = np.nan
    theta[400, 0] = np.inf
    with caplog.at_level(logging.WARNING, logger="pipeline.importing"):
        attrs = import_simulations(TASK, *save_npy(tmp_path, theta, x), tmp_path / "o.h5")
    assert attrs["num_nonfinite"] == 3
    assert "3 of 500 imported rows contain NaN or inf" in caplog.text
    sims = storage.read_simulations(tmp_path / "o.h5")
    assert len(sims.x) == 500 and int((~sims.finite).sum()) == 3


def test_an_import_float32_cannot_hold_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """Values beyond float32's range would be stored as inf and their rows dropped (all from
    one side of the prior): refused with the row and the fix, as is an offset that float32
    would round away."""
    theta, x = arrays()
    x[300, 1] = 1e40
    with pytest.raises(ValueError, match=r"x source .*x.npy: feature 1 is 1e\+40 \(row 300\)"):
        import_simulations(TASK, *save_npy(tmp_path, theta, x), tmp_path / "o.h5", block_rows=128)
    x[300, 1] = 0.0
    with pytest.raises(ValueError, match="feature 0 varies by .* Subtract an offset"):
        import_simulations(TASK, *save_npy(tmp_path, theta, x + [1e9, 0]), tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_one_parameter_theta_may_be_a_column_and_maps_keep_their_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    theta, x = rng.uniform(size=50), rng.normal(size=(50, 4, 3)).astype(np.float32)
    np.save(tmp_path / "omega.npy", theta)
    np.save(tmp_path / "maps.npy", np.asfortranarray(x))  # Fortran order: read via memory map
    out = tmp_path / "o.h5"
    import_simulations(OneParameter(), f"{tmp_path}/omega.npy", f"{tmp_path}/maps.npy", out)
    sims = storage.read_simulations(out, task="one_parameter")
    np.testing.assert_array_equal(sims.theta, theta.astype(np.float32)[:, None])
    np.testing.assert_array_equal(sims.x, x)


def test_parameters_outside_the_prior_are_refused_naming_the_first(tmp_path: Path) -> None:
    theta, x = arrays()
    theta[321, 1] = 1.5  # two_moons' prior is [-1, 1]^2
    sources = save_npy(tmp_path, theta, x)
    with pytest.raises(
        ValueError,
        match=r"1 of 500 rows lie outside the task's prior \(first: "
        r"row 321, theta_2 = 1.5, prior \[-1, 1\]\)",
    ):
        import_simulations(get_task("two_moons"), *sources, tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_import_runs_in_memory_bounded_by_the_block_not_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.standard_normal((200_000, 100), dtype=np.float32))
    np.save(tmp_path / "theta.npy", rng.uniform(size=(200_000, 3)))
    task = DeclaredTask(
        ("a", "b", "c"), ("",) * 3, (100,), BoxUniform((0.0,) * 3, (1.0,) * 3), None
    )
    block_rows = 1000
    block_bytes = block_rows * 100 * 4  # 400 kB of x per block; the file holds 80 MB
    tracemalloc.start()
    try:
        import_simulations(
            task,
            f"{tmp_path}/theta.npy",
            f"{tmp_path}/x.npy",
            tmp_path / "o.h5",
            block_rows=block_rows,
            compression="none",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Alive at once: one block's bytes as read (x float32, theta float64: 1.06 blocks), the
    # boolean masks of a block when it holds NaN (none here), and the 256 KiB buffer of the
    # SHA-256 (0.66 blocks): about 2 blocks (2.6 measured, with h5py's and numpy's own small
    # allocations). 10 blocks leave room for those while staying 20 times below the file: a
    # read of the whole file, or blocks kept alive one after another, would exceed it.
    assert peak < 10 * block_bytes < (tmp_path / "x.npy").stat().st_size / 20
    assert storage.read_attrs(tmp_path / "o.h5")["num_simulations"] == 200_000


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _truncated_npy(folder: Path) -> tuple[str, str]:
    theta, x = save_npy(folder, *arrays())
    data = Path(x).read_bytes()
    Path(x).write_bytes(data[: len(data) // 2])
    return theta, x


def _corrupt_compressed_npz(folder: Path) -> tuple[str, str]:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(20_000, 2)).astype(np.float64)  # deflates in many blocks
    np.savez_compressed(folder / "sims.npz", theta=np.zeros((20_000, 2)), x=x)
    with zipfile.ZipFile(folder / "sims.npz") as archive:
        info = archive.getinfo("x.npy")
    data = bytearray((folder / "sims.npz").read_bytes())
    # Damage x's compressed rows three quarters in: found only while streaming, after the
    # first blocks were written.
    start = info.header_offset + 30 + len(info.filename) + 3 * info.compress_size // 4
    data[start : start + 40] = bytes(range(40))
    (folder / "sims.npz").write_bytes(bytes(data))
    return f"{folder}/sims.npz:theta", f"{folder}/sims.npz:x"


def _h5_with(folder: Path, **datasets: np.ndarray) -> str:
    with h5py.File(folder / "data.h5", "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return str(folder / "data.h5")


BAD_INPUTS: dict[str, tuple[Callable[[Path], tuple[str, str]], str]] = {
    "missing file": (
        lambda d: (save_npy(d, *arrays())[0], f"{d}/nope.npy"),
        r"x source .*nope.npy: file .*nope.npy does not exist; check the path",
    ),
    "not npy": (
        lambda d: (save_npy(d, *arrays())[0], _write(d / "x.npy", b"a,b\n1,2\n")),
        r"x source .*x.npy is not readable as a .npy file written by numpy.save",
    ),
    "truncated npy": (
        _truncated_npy,
        r"x source .*x.npy is truncated: its header announces shape \(500, 2\) of float64",
    ),
    "not npz": (
        lambda d: (f"{_write(d / 'a.npz', b'junk')}:theta", f"{d}/a.npz:x"),
        r"theta source .*a.npz:theta: .*a.npz is not a readable .npz archive",
    ),
    # Damaged compressed rows may decode into values beyond float32's range before the read
    # fails: either message names the source.
    "corrupt npz member": (
        _corrupt_compressed_npz,
        r"cannot read x source .*sims.npz:x|x source .*sims.npz:x: .* that it is not damaged",
    ),
    "not hdf5": (
        lambda d: (f"{_write(d / 'a.h5', b'junk' * 100)}:theta", f"{d}/a.h5:x"),
        r"theta source .*a.h5:theta: .*a.h5 is not a readable HDF5 file",
    ),
    "missing npz member": (
        lambda d: (save_npz(d, *arrays())[0], f"{d}/sims.npz:X"),
        r"sims.npz has no array 'X'. Present: theta, x",
    ),
    "npz member not named": (
        lambda d: (save_npz(d, *arrays())[0], f"{d}/sims.npz"),
        r"sims.npz holds 2 arrays; name one as .*sims.npz:NAME. Present: theta, x",
    ),
    "missing dataset": (
        lambda d: (save_hdf5(d, *arrays())[0], f"{d}/camels.hdf5:LH/y"),
        r"camels.hdf5 has no dataset 'LH/y'. Present: LH/notes, LH/params/theta, LH/x",
    ),
    "theta columns": (
        lambda d: save_npy(d, np.zeros((500, 3)), arrays()[1]),
        r"theta source .* has shape \(500, 3\), expected \(N, 2\): one column per parameter "
        r"of task 'two_moons' \(theta_1, theta_2\)",
    ),
    "theta column for two parameters": (
        lambda d: save_npy(d, np.zeros(500), arrays()[1]),
        r"has shape \(500,\), expected \(N, 2\)",
    ),
    "x rows": (
        lambda d: save_npy(d, arrays()[0], np.zeros((500, 2, 1))),
        r"x source .* has shape \(500, 2, 1\), expected \(N, 2\): rows of task 'two_moons'",
    ),
    "row counts": (
        lambda d: save_npy(d, arrays(n=400)[0], arrays()[1]),
        r"theta source .* has 400 rows but x source .* has 500; each row of theta must pair",
    ),
    "complex": (
        lambda d: save_npy(d, arrays()[0], arrays()[1] * 1j),
        r"x source .* has dtype complex128: complex numbers; .* needs real numbers",
    ),
    "pickled objects": (
        lambda d: save_npy(d, arrays()[0], arrays()[1].astype(object)),
        r"has dtype object: Python objects .*never loads\). The importer needs real numbers",
    ),
    "strings": (
        lambda d: (save_npy(d, *arrays())[0], f"{_h5_with(d, x=np.array([b'a'] * 500))}:x"),
        r"has dtype \|S1: strings",
    ),
    "structured": (
        lambda d: save_npy(d, arrays()[0], np.zeros(500, dtype=[("a", "f4"), ("b", "f4")])),
        r"a structured array \(fields a, b\); save each as its own array",
    ),
    "fortran npz": (
        lambda d: save_npz(d, arrays()[0], np.asfortranarray(arrays()[1])),
        r"x source .* is stored in Fortran \(column\) order.* save it C-ordered .* or as a .npy",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_is_named_and_leaves_nothing_behind(tmp_path: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    theta, x = make(tmp_path)
    before = leftovers(tmp_path, theta, x)
    with pytest.raises((ValueError, OSError), match=message):
        import_simulations(TASK, theta, x, tmp_path / "out.h5", block_rows=1000)
    assert leftovers(tmp_path, theta, x) == before  # no out.h5, no .out.h5.tmp-PID


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ((0, 501), r"selects rows \[0, 501\) but the sources hold rows \[0, 500\)"),
        ((-501, None), r"--rows -501: selects rows \[-1, 500\)"),
        ((300, 300), r"selects rows \[300, 300\)"),
        ((-100, 100), r"selects rows \[400, 100\)"),
    ],
)
def test_row_ranges_out_of_range_or_empty_are_refused(
    tmp_path: Path, rows: tuple[int, int | None], message: str
) -> None:
    sources = save_npy(tmp_path, *arrays())
    with pytest.raises(ValueError, match=message):
        import_simulations(TASK, *sources, tmp_path / "out.h5", start=rows[0], stop=rows[1])
    assert not (tmp_path / "out.h5").exists()


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    sources = save_npy(tmp_path, *arrays())
    out = tmp_path / "out.h5"
    import_simulations(TASK, *sources, out, stop=100)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"out.h5 exists; pass --overwrite to replace it"):
        import_simulations(TASK, *sources, out)
    assert out.read_bytes() == before
    assert import_simulations(TASK, *sources, out, overwrite=True)["num_simulations"] == 500


def test_an_output_over_its_own_source_is_refused(tmp_path: Path) -> None:
    theta, _ = save_hdf5(tmp_path, *arrays())
    with pytest.raises(ValueError, match="is the theta source itself; choose another --out"):
        import_simulations(TASK, theta, theta, tmp_path / "camels.hdf5", overwrite=True)


def test_sources_are_parsed_by_suffix() -> None:
    assert parse_source("a/b.npy") == Source(Path("a/b.npy"), None, "npy")
    assert parse_source("run.NPZ:x") == Source(Path("run.NPZ"), "x", "npz")
    assert parse_source("d.v2/s.hdf5:/g/x/") == Source(Path("d.v2/s.hdf5"), "g/x", "hdf5")
    assert parse_source("s.h5") == Source(Path("s.h5"), None, "hdf5")
    assert str(parse_source("s.h5:g/x")) == "s.h5:g/x"
    with pytest.raises(ValueError, match="a .npy file holds one array; drop ':x'"):
        parse_source("a.npy:x")
    with pytest.raises(ValueError, match=r"expected PATH.npy, PATH.npz:MEMBER or PATH.h5"):
        parse_source("table.csv")


def test_open_array_reads_row_blocks_in_any_order(tmp_path: Path) -> None:
    theta, _ = arrays()
    np.savez_compressed(tmp_path / "a.npz", theta=theta)
    with open_array(f"{tmp_path}/a.npz", "theta") as rows:  # the only member
        assert rows.shape == (500, 2) and rows.dtype == np.float64
        np.testing.assert_array_equal(rows[400:450], theta[400:450])
        np.testing.assert_array_equal(rows[10:20], theta[10:20])


def test_cli_imports_and_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    theta, x = save_npz(tmp_path, *arrays())
    out = tmp_path / "test.h5"
    argv = ["import", "--task", "two_moons", "--theta", theta, "--x", x, "--out", str(out)]
    assert cli.main([*argv, "--rows=-100:", "--compression", "lzf"]) == 0
    attrs = storage.read_attrs(out, task="two_moons")
    assert (attrs["index_start"], attrs["index_stop"], attrs["compression"]) == (400, 500, "lzf")
    assert cli.main(argv) == 2
    assert "import failed: " in capsys.readouterr().err
    assert cli.main([*argv, "--rows", "10", "--overwrite"]) == 2
    assert "import failed: --rows '10': expected START:STOP" in capsys.readouterr().err
    assert cli.main([*argv, "--rows", ":-450", "--overwrite"]) == 0
    assert storage.read_attrs(out)["num_simulations"] == 50


def test_a_file_the_pipeline_wrote_is_refused_as_an_archive(tmp_path: Path) -> None:
    """Imported, a simulation file lost its seed (and a round's its region): `sample` then took
    the training rows as a test set, which it refuses for the file itself."""
    from pipeline import simulation
    from pipeline.parallel import SerialComm

    sims = tmp_path / "sims.h5"
    simulation.run(
        simulation.SimulationPlan("two_moons", 100, 1, 100),
        TASK,
        sims,
        SerialComm(),
        overwrite=False,
    )
    with pytest.raises(storage.DataFileError, match=r"sims.h5 was written by this pipeline"):
        import_simulations(TASK, f"{sims}:theta", f"{sims}:x", tmp_path / "copy.h5")
    assert not (tmp_path / "copy.h5").exists()

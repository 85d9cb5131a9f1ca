import h5py
import numpy as np
import pytest

from pipeline import storage


def write(path, n=10, **attrs):
    rng = np.random.default_rng(0)
    theta, x = rng.normal(size=(n, 2)), rng.normal(size=(n, 3))
    storage.write_simulations(path, theta, x, {"task": "two_moons", **attrs}, overwrite=False)
    return theta, x


def test_round_trip_keeps_data_and_attributes(tmp_path):
    path = tmp_path / "sims.h5"
    theta, x = write(path, seed=7, parameter_names=["a", "b"])
    sims = storage.read_simulations(path, task="two_moons")
    np.testing.assert_array_equal(sims.theta, theta.astype(np.float32))
    np.testing.assert_array_equal(sims.x, x.astype(np.float32))
    assert sims.theta.dtype == np.float32
    assert sims.attrs["seed"] == 7 and sims.attrs["parameter_names"] == ["a", "b"]
    assert sims.attrs["complete"] and sims.attrs["num_simulations"] == 10


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sims.h5"
    write(path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write(path)


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "sims.h5"
    with pytest.raises(ValueError, match="rows"):
        storage.write_simulations(path, np.zeros((3, 2)), np.zeros((4, 2)), {}, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_one_listing_finds_finished_files_and_each_ones_temporaries(tmp_path):
    write(tmp_path / "a.h5")
    # A write of a.h5 killed twice (two processes), and one of b.h5 that never finished.
    for name in (".a.h5.tmp-11", ".a.h5.tmp-12", ".b.h5.tmp-13"):
        (tmp_path / name).write_bytes(b"partial")
    finished, temporaries = storage.list_folder(tmp_path)
    assert finished == {"a.h5"}
    assert sorted(p.name for p in temporaries["a.h5"]) == [".a.h5.tmp-11", ".a.h5.tmp-12"]
    assert [p.name for p in temporaries["b.h5"]] == [".b.h5.tmp-13"]
    assert storage.list_folder(tmp_path / "absent") == (set(), {})


def test_missing_file_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline simulate"):
        storage.read_simulations(tmp_path / "nope.h5")


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "sims.h5"
    write(path, n=2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(storage.DataFileError, match=r"sims\.h5.*(truncated|corrupt)"):
        storage.read_simulations(path)


def test_missing_dataset_is_named(tmp_path):
    path = tmp_path / "sims.h5"
    with h5py.File(path, "w") as f:
        f["theta"] = np.zeros((3, 2))
        f.attrs["complete"] = True
    with pytest.raises(storage.DataFileError, match="no dataset 'x'"):
        storage.read_simulations(path)


def test_incomplete_file_is_refused(tmp_path):
    path = tmp_path / "sims.h5"
    with h5py.File(path, "w") as f:
        f["theta"], f["x"] = np.zeros((3, 2)), np.zeros((3, 2))
    with pytest.raises(storage.DataFileError, match="incomplete"):
        storage.read_simulations(path)


def test_row_mismatch_is_refused(tmp_path):
    path = tmp_path / "sims.h5"
    with h5py.File(path, "w") as f:
        f["theta"], f["x"] = np.zeros((3, 2)), np.zeros((4, 2))
        f.attrs["complete"] = True
    with pytest.raises(storage.DataFileError, match="3 rows but x has 4"):
        storage.read_simulations(path)


def test_wrong_task_is_refused(tmp_path):
    path = tmp_path / "sims.h5"
    write(path)
    with pytest.raises(storage.DataFileError, match="'two_moons', expected 'sn_cosmology'"):
        storage.read_simulations(path, task="sn_cosmology")


def test_finite_mask_flags_nan_and_inf_rows():
    sims = storage.Simulations(
        theta=np.zeros((4, 2)), x=np.array([[0.0], [np.nan], [np.inf], [1.0]]), attrs={}
    )
    np.testing.assert_array_equal(sims.finite, [True, False, False, True])


def test_nonfinite_count_survives_an_overflowing_sum():
    # The fast path sums the arrays; large finite values overflow float32 to inf there, and
    # must then be counted exactly (as zero), while a real NaN or inf still counts its row.
    big = np.full((4, 3), 3e38, dtype=np.float32)
    assert storage.count_nonfinite_rows(big, big) == 0
    big[2, 1] = np.nan
    big[3, 0] = -np.inf
    assert storage.count_nonfinite_rows(np.zeros((4, 2), np.float32), big) == 2


@pytest.mark.parametrize("num_rows", [1, 700, 10**5, 99991, 10**7])
def test_chunk_rows_stay_near_the_target_and_divide_where_they_can(num_rows):
    rows = storage.chunk_rows(num_rows, (2,))
    target = storage.CHUNK_BYTES // 8
    assert 1 <= rows <= max(target, 1) and rows <= num_rows
    if num_rows % 2 == 0:  # an even count always has a divisor within a factor 2 of the target
        assert num_rows % rows == 0 and rows >= min(target // 2, num_rows)


def test_copy_merge_of_sources_of_unequal_lengths_keeps_every_row(tmp_path):
    # Rounds of 500, 300 and 300 simulations: the merged file is chunked like the first
    # source, so the later ones neither line up with its chunks nor fill their last one.
    rng = np.random.default_rng(0)
    theta, x = rng.normal(size=(1100, 3)), rng.normal(size=(1100, 2))
    bounds = [(0, 500), (500, 800), (800, 1100)]
    sources = [tmp_path / f"s{i}.h5" for i in range(len(bounds))]
    for source, (start, stop) in zip(sources, bounds, strict=True):
        storage.write_simulations(source, theta[start:stop], x[start:stop], {}, overwrite=False)
    storage.merge_copy(tmp_path / "merged.h5", sources, {"task": "t"}, "gzip")
    merged = storage.read_simulations(tmp_path / "merged.h5")
    np.testing.assert_array_equal(merged.theta, theta.astype(np.float32))
    np.testing.assert_array_equal(merged.x, x.astype(np.float32))


def test_copy_merge_takes_raw_chunks_where_aligned_and_rewrites_the_rest(tmp_path, monkeypatch):
    # Tiny chunks, so that each source spans many: 8-byte x rows give 4 rows per chunk.
    monkeypatch.setattr(storage, "CHUNK_BYTES", 32)
    rng = np.random.default_rng(0)
    theta, x = rng.normal(size=(1201, 3)), rng.normal(size=(1201, 2))
    # 401 rows (a prime) have no divisor near 4: the last source, like the merged file, has
    # 4-row chunks, its last one partial where the merged file ends too, so it is copied raw.
    bounds = [(0, 400), (400, 800), (800, 1201)]
    sources = []
    for i, (start, stop) in enumerate(bounds):
        sources.append(tmp_path / f"s{i}.h5")
        # The middle source has another filter (a shard kept from an lzf run): rewritten.
        compression = "lzf" if i == 1 else "gzip"
        storage.write_simulations(
            sources[-1],
            theta[start:stop],
            x[start:stop],
            {},
            overwrite=False,
            compression=compression,
        )
    storage.merge_copy(tmp_path / "merged.h5", sources, {"task": "t"}, "gzip")
    merged = storage.read_simulations(tmp_path / "merged.h5")
    np.testing.assert_array_equal(merged.theta, theta.astype(np.float32))
    np.testing.assert_array_equal(merged.x, x.astype(np.float32))
    with h5py.File(tmp_path / "merged.h5") as f:
        assert f["x"].compression == "gzip" and f["x"].chunks == (4, 2)


def test_values_float32_cannot_hold_are_refused_naming_the_feature_and_the_fix():
    """The files store float32: a feature offset far beyond its spread (``1e9 + 10 theta``) is
    stored as one value, and a value beyond float32's range as inf, whose rows would be dropped
    as non-finite (all of one side of the prior). NaN rows stay the simulator's to return."""
    rng = np.random.default_rng(0)
    theta = rng.uniform(size=1000)
    with pytest.raises(ValueError, match=r"x of t: feature 1 varies by 2.8.* around 1e\+09"):
        storage.check_float32(np.c_[theta, 1e9 + 10 * theta], "x of t")
    with pytest.raises(ValueError, match=r"feature 1 is 3.53e\+38 \(row 500\).*a log"):
        storage.check_float32(np.c_[theta, 10 ** (36 + 4 * theta)], "x of t", first_row=500)
    # Rounded to under a tenth of the spread is not lost (1e7 + 10 z: spacing 1, spread 10);
    # NaN rows, constant features and ones constant up to float64's rounding pass.
    normalised = theta[:, None] * [1, 2, 3] / (6 * theta[:, None])
    z = np.random.default_rng(1).normal(size=1000)
    storage.check_float32(np.c_[theta, 1e7 + 10 * z, np.full(1000, 7e9)], "x")
    storage.check_float32(np.c_[normalised, normalised.sum(axis=1)], "x")
    storage.check_float32(np.c_[theta, np.where(theta > 0.9, np.nan, theta)], "x")
    storage.check_float32(np.array([[1e9 + 3.0]]), "x")  # one row has no spread to lose
    with pytest.raises(ValueError, match="beyond the range"):
        storage.check_float32(np.array([[1e39]]), "x", range_only=True)
    storage.check_float32(np.c_[theta, 1e9 + 10 * theta], "x", range_only=True)


def test_precision_is_judged_over_every_block_of_a_sorted_archive():
    """A block of an archive sorted by a parameter varies far less than the parameter: the
    check gathers every block's moments (about each feature's first value, so an offset of 1e9
    costs no digits) and judges them once, after the last."""
    theta = np.sort(1000 + np.random.default_rng(0).uniform(size=(100_000, 1)), axis=0)
    precision = storage.Float32Precision("theta")
    for start in range(0, len(theta), 5000):
        precision.add(theta[start : start + 5000])
    precision.check()
    offset = storage.Float32Precision("x of t")
    for start in range(0, len(theta), 5000):
        offset.add(1e9 + 10 * (theta[start : start + 5000] - 1000))
    with pytest.raises(ValueError, match=r"x of t: feature 0 varies by 2.8.* around 1e\+09"):
        offset.check()

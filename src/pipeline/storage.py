"""HDF5 layout of simulations: self-describing files, atomic writes, loud failures on bad files.

A simulation file holds two float32 datasets, ``theta`` with shape ``(N, D)`` and ``x`` with shape
``(N, *x_shape)``, chunked along the first axis (about :data:`CHUNK_BYTES` per chunk) and
compressed, and attributes that say what made them (task, parameter names and units, seed, index
range, config digest, versions, code revision). A file is written under a temporary name and
renamed when complete, and carries ``complete = True``: a job killed mid-write never leaves a
file that looks finished.

Shards of one run are joined either by copying (:func:`merge_copy`, a self-contained file; the
compressed chunks are copied as they are, without decompressing, where the shards' chunks line
up with the merged file's) or as HDF5 virtual datasets (:func:`merge_virtual`, which map the
shards in place and need them kept beside the file; a missing shard is an error, never silent
fill values).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import atomic
from pipeline.resources import free_disk

FORMAT_VERSION = 1
# Bytes per HDF5 chunk (uncompressed): large chunks make fewer, faster writes and reads (1024-row
# chunks of two_moons wrote at half the speed), and 1 MiB still fits h5py's default chunk cache.
CHUNK_BYTES = 2**20
# Filters by name. Deflate (gzip) is in every HDF5 build, so such files open anywhere; level 1
# behind the byte shuffle keeps most of the size gain of higher levels at a fraction of their
# cost. LZF (bundled with h5py, not with other HDF5 readers) is several times faster: for cheap
# simulators whose output rate approaches the disk's. See benchmarks/README.md.
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "lzf": {"compression": "lzf", "shuffle": True},
    "none": {},
}


class DataFileError(ValueError):
    """An HDF5 file of the pipeline (simulations, observations, posterior samples) is corrupt,
    incomplete or not what the stage reading it expected."""


@dataclass
class Simulations:
    """Parameters and simulations read from one file.

    Attributes:
        theta: Parameters, shape ``(N, D)``, float32.
        x: Simulations, shape ``(N, *x_shape)``, float32.
        attrs: The file's attributes (JSON-decoded where they were JSON).
    """

    theta: np.ndarray
    x: np.ndarray
    attrs: dict[str, Any]

    @property
    def finite(self) -> np.ndarray:
        """Boolean mask, shape ``(N,)``: rows whose ``theta`` and ``x`` are all finite."""
        return finite_rows(self.theta) & finite_rows(self.x)


# Files HDF5 failed to close: the C library would flush them again at exit and crash, so the
# command line ends such a process without HDF5's exit handlers (cli.main).
HDF5_LEFT_OPEN: list[h5py.File] = []


def unreadable(path: Path, error: Exception) -> DataFileError | OSError:
    """The error for a file h5py cannot read: truncated, corrupt or not HDF5 at all, unless
    the error was a full disk (HDF5 reports failed writes of other files this way too)."""
    if atomic.is_disk_full(error):
        return OSError(
            errno.ENOSPC,
            f"disk full (or quota reached) while working with {path}: free space on its file "
            "system and rerun; finished files are kept",
        )
    return DataFileError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {error}")


def finite_rows(array: np.ndarray) -> np.ndarray:
    """``True`` for rows of ``array`` (first axis) without NaN or inf; shape ``(N,)``."""
    return np.isfinite(array.reshape(len(array), -1)).all(axis=1)


def count_nonfinite_rows(theta: np.ndarray, x: np.ndarray) -> int:
    """Rows (first axis) where ``theta`` or ``x`` holds a NaN or an inf."""
    # Fast path: a sum is finite only if every term is (NaN and inf propagate); an overflowing
    # sum of finite values only sends us to the exact count.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(theta.sum()) and np.isfinite(x.sum()):
            return 0
    return int(np.sum(~(finite_rows(theta) & finite_rows(x))))


# Rounding to float32 may move a feature's values by at most this share of their standard
# deviation: its rounding noise is then a few per cent of the spread.
FLOAT32_ROUNDING_SHARE = 0.1
# A feature varying by less than this share of its magnitude is constant up to float64's own
# rounding (a sum of normalised weights): float32 has no variation of it to lose.
FLOAT64_NOISE = 1e-12
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Values per pass of the precision's statistics: a few such float64 temporaries at a time.
PRECISION_VALUES = 2**22


def check_float32(
    values: np.ndarray,
    what: str,
    *,
    range_only: bool = False,
    first_row: int = 0,
    where: str = "in the simulator or its summary",
) -> None:
    """Refuses ``values`` (n, ...) that the files' float32 cannot hold: a finite value beyond
    its range (stored as inf, so dropped as non-finite: the rows it drops are not random, and
    the prior would be cut where they lie), or a feature whose rounding to float32 moves some
    value by more than :data:`FLOAT32_ROUNDING_SHARE` of its standard deviation over these rows
    (a large offset: ``1e9 + 10 theta`` is stored as ``1e9`` whatever ``theta``). ``what``
    names the values in the message, e.g. ``"x of task 'mytask'"``. The spread needs two rows
    or more; one row, or ``range_only``, gets the range check alone. ``first_row`` is the index
    the message gives the first row, ``where`` where to mend the values. Values that arrive in
    blocks are checked for precision over all of them by :class:`Float32Precision`.
    """
    array = np.asarray(values)
    if array.dtype == np.float32 or array.size == 0:
        return
    _check_range(array, what, first_row, where)
    if not range_only:
        precision = Float32Precision(what, where)
        precision.add(array)
        precision.check()


def _check_range(array: np.ndarray, what: str, first_row: int, where: str) -> None:
    """The range half of :func:`check_float32`: two reductions, unless a value is NaN or
    large."""
    low, high = array.min(), array.max()
    if np.isfinite(low) and np.isfinite(high) and max(-low, high) <= FLOAT32_MAX:
        return
    flat = array.reshape(len(array), -1).astype(np.float64, copy=False)
    with np.errstate(over="ignore"):
        beyond = np.isfinite(flat) & ~np.isfinite(flat.astype(np.float32))
    if beyond.any():
        row, feature = np.argwhere(beyond)[0]
        raise ValueError(
            f"{what}: feature {feature} is {flat[row, feature]:.3g} (row {first_row + row}), "
            "beyond the range of float32 (3.4e38) in which the pipeline stores simulations, so "
            f"it would read as inf and its rows be dropped; rescale it (a log, or other units) "
            f"{where}"
        )


class Float32Precision:
    """Whether float32 keeps each feature's variation, over values that arrive in blocks
    (:meth:`add`, rows of any shape), checked once all have been seen (:meth:`check`): the
    spread of a sorted archive's first block is not the feature's.

    Moments are taken about each feature's first finite value, so that an offset of 1e9 costs
    them no digits.
    """

    def __init__(self, what: str, where: str = "in the simulator or its summary") -> None:
        self.what, self.where = what, where
        self.reference: np.ndarray | None = None
        self.count = self.total = self.squares = self.rounding = self.magnitude = np.zeros(0)

    def add(self, values: np.ndarray) -> None:
        flat = np.asarray(values).reshape(len(values), -1)
        if flat.dtype == np.float32 or flat.size == 0:
            return
        if self.reference is None:
            self.reference = np.full(flat.shape[1], np.nan)
            zeros = np.zeros(flat.shape[1])
            self.count, self.total, self.squares = zeros.copy(), zeros.copy(), zeros.copy()
            self.rounding, self.magnitude = zeros.copy(), zeros.copy()
        rows = max(1, PRECISION_VALUES // flat.shape[1])
        for start in range(0, len(flat), rows):
            self._add(flat[start : start + rows].astype(np.float64, copy=False))

    def _add(self, block: np.ndarray) -> None:
        finite = np.isfinite(block)
        unset = np.isnan(self.reference) & finite.any(axis=0)
        if unset.any():
            first = np.argmax(finite[:, unset], axis=0)
            self.reference[unset] = block[first, np.flatnonzero(unset)]
        with np.errstate(over="ignore", invalid="ignore"):
            shifted = np.where(finite, block - self.reference, 0.0)
            stored = np.where(finite, block, 0.0).astype(np.float32).astype(np.float64)
            self.rounding = np.maximum(
                self.rounding, np.abs(stored - np.where(finite, block, 0.0)).max(axis=0)
            )
        self.magnitude = np.maximum(self.magnitude, np.abs(np.where(finite, block, 0.0)).max(0))
        self.count += finite.sum(axis=0)
        self.total += shifted.sum(axis=0)
        self.squares += (shifted**2).sum(axis=0)

    def check(self) -> None:
        """Raises naming the first feature whose float32 rounding exceeds its share of the
        spread (a feature varying only at float64's noise level counts as constant)."""
        if self.reference is None:
            return
        count = np.maximum(self.count, 1)
        offset = self.total / count
        spread = np.sqrt(np.maximum(self.squares / count - offset**2, 0.0))
        lost = (
            (self.count >= 2)
            & (spread > FLOAT64_NOISE * self.magnitude)
            & (self.rounding > FLOAT32_ROUNDING_SHARE * spread)
        )
        if lost.any():
            feature = int(np.argmax(lost))
            mean = self.reference[feature] + offset[feature]
            raise ValueError(
                f"{self.what}: feature {feature} varies by {spread[feature]:.3g} (standard "
                f"deviation) around {mean:.7g}, and float32, in which the pipeline stores "
                f"simulations, rounds it by up to {self.rounding[feature]:.3g}: its variation "
                f"would be lost. Subtract an offset (or take a log) {self.where}"
            )


def data_digest(attrs: dict[str, Any]) -> str:
    """What a training's checkpoints, search trials and chosen options depend on of its data
    file (``attrs`` its attributes): the file's ``config_digest`` (its plan, or an import's
    sources) and when the file was written, since a file simulated again with ``--overwrite``
    after a simulator changed has the same plan but other rows."""
    created = (attrs.get("provenance") or {}).get("created")
    plan = str(attrs.get("config_digest", "unknown"))
    text = json.dumps({"plan": plan, "created": created}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def simulation_seeds(attrs: dict[str, Any]) -> list[int]:
    """The simulation seeds a file's rows were drawn with (``attrs`` its attributes): one
    run's, or each stacked round's; none for imported data. Simulation ``i`` depends on
    ``(seed, i)`` only, so a test set of one of these seeds repeats training rows."""
    if attrs.get("rounds"):
        return [int(entry["seed"]) for entry in attrs["rounds"]]
    return [] if attrs.get("seed") is None else [int(attrs["seed"])]


def imported_rows(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """Which rows of which archive an imported file holds (``attrs`` its attributes): its x
    source's content digest and member, and the rows ``[start, stop)``; None for simulations.
    Two imports of one archive share rows where those ranges overlap."""
    if not attrs.get("imported"):
        return None
    source = next(s for s in attrs["sources"] if s["role"] == "x")
    return {
        "x": f"{source['sha256']}:{source.get('member') or ''}",
        "rows": [int(attrs["index_start"]), int(attrs["index_stop"])],
    }


def chunk_rows(num_rows: int, row_shape: tuple[int, ...]) -> int:
    """Rows per HDF5 chunk for ``num_rows`` rows of float32 ``row_shape``.

    About :data:`CHUNK_BYTES`, and where one is near, a divisor of ``num_rows``: shards of equal
    length then stack into the merged file chunk-aligned, so the merge copies their compressed
    chunks as they are.
    """
    target = max(1, CHUNK_BYTES // (4 * math.prod(row_shape)))
    if num_rows <= target:
        return max(num_rows, 1)
    fewest = math.ceil(num_rows / target)
    for parts in range(fewest, 2 * fewest + 1):  # chunks at most halved to find a divisor
        if num_rows % parts == 0:
            return num_rows // parts
    return target


def encode_attr(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | np.integer | np.floating):
        return value
    return json.dumps(value)


def decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_simulations(
    path: Path,
    theta: np.ndarray,
    x: np.ndarray,
    attrs: Mapping[str, Any],
    *,
    overwrite: bool,
    compression: str = "gzip",
    clean: bool = True,
) -> None:
    """Writes ``theta`` (N, D) and ``x`` (N, *x_shape) as float32, atomically.

    ``compression`` names an entry of :data:`COMPRESSIONS`; ``clean`` as for
    :class:`atomic_h5`.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    atomic.check_new(path, overwrite=overwrite)
    if len(theta) != len(x):
        raise ValueError(f"theta has {len(theta)} rows but x has {len(x)}")
    size = np.asarray(theta).size * 4 + np.asarray(x).size * 4
    with atomic_h5(path, clean=clean, expected_bytes=size) as f:
        for name, data in (("theta", theta), ("x", x)):
            data = np.asarray(data, dtype=np.float32)
            create_dataset(f, name, data.shape, compression, data=data)
        finish_file(f, attrs, len(theta))


def create_dataset(
    f: h5py.File,
    name: str,
    shape: tuple[int, ...],
    compression: str,
    data: np.ndarray | None = None,
    rows: int | None = None,
) -> h5py.Dataset:
    """A float32 dataset chunked along its first axis (``rows`` per chunk, by default as
    :func:`chunk_rows` chooses)."""
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}"
        )
    chunks = (rows or chunk_rows(shape[0], shape[1:]), *shape[1:])
    return f.create_dataset(
        name, shape=shape, dtype=np.float32, data=data, chunks=chunks, **COMPRESSIONS[compression]
    )


def finish_file(f: h5py.File, attrs: Mapping[str, Any], num_simulations: int) -> None:
    """Writes ``attrs`` and the layout's own attributes, ``complete = True`` last."""
    for key, value in attrs.items():
        f.attrs[key] = encode_attr(value)
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["num_simulations"] = num_simulations
    f.attrs["complete"] = True


def _row_ranges(sources: Sequence[Path]) -> tuple[list[tuple[int, int]], tuple, tuple]:
    """Row ranges of ``sources`` stacked in order, with their common theta and x row shapes."""
    ranges, start, shapes = [], 0, set()
    for source in sources:
        with open_simulations(source) as f:
            n = len(f["theta"])
            shapes.add((f["theta"].shape[1:], f["x"].shape[1:]))
        ranges.append((start, start + n))
        start += n
    if len(shapes) != 1:
        raise DataFileError(
            f"cannot merge {len(sources)} files whose rows differ in shape: {sorted(shapes)}"
        )
    theta_row, x_row = shapes.pop()
    return ranges, theta_row, x_row


def merge_copy(
    path: Path, sources: Sequence[Path], attrs: Mapping[str, Any], compression: str = "gzip"
) -> None:
    """Stacks the simulation files ``sources`` into one self-contained file, atomically.

    Chunks that line up and carry the same filters are copied compressed, byte for byte; others
    are read and rewritten. Memory stays at one source's rows, whatever the total.
    """
    ranges, theta_row, x_row = _row_ranges(sources)
    n = ranges[-1][1]
    # Chunked like one source, so that equal-length sources line up with the merged chunks.
    first = ranges[0][1]
    size = sum(Path(source).stat().st_size for source in sources)  # the copy is about as large
    with atomic_h5(path, expected_bytes=size) as f:
        merged = {
            name: create_dataset(f, name, (n, *row), compression, rows=chunk_rows(first, row))
            for name, row in (("theta", theta_row), ("x", x_row))
        }
        for source, (start, _) in zip(sources, ranges, strict=True):
            with open_simulations(source) as part:
                for name, target in merged.items():
                    _copy_rows(part[name], target, start, source)
        finish_file(f, attrs, n)


def _copy_rows(source: h5py.Dataset, target: h5py.Dataset, start: int, path: Path) -> None:
    """Writes all of ``source`` into ``target`` from row ``start``: raw chunks where possible."""
    rows = target.chunks[0]
    same_filters = all(
        getattr(source, key) == getattr(target, key)
        for key in ("compression", "compression_opts", "shuffle")
    )
    # The last chunk of a source may be partial only where the merged dataset ends too.
    aligned = (
        source.chunks == target.chunks
        and start % rows == 0
        and (len(source) % rows == 0 or start + len(source) == len(target))
    )
    try:
        if same_filters and aligned:
            zeros = (0,) * (source.ndim - 1)
            for offset in range(0, len(source), rows):
                mask, chunk = source.id.read_direct_chunk((offset, *zeros))
                target.id.write_direct_chunk((start + offset, *zeros), chunk, mask)
        else:
            for offset in range(0, len(source), rows):
                # A source's last slice may be shorter than a chunk of the target.
                stop = min(offset + rows, len(source))
                target[start + offset : start + stop] = source[offset:stop]
    except OSError as error:
        raise unreadable(path, error) from None


def merge_virtual(
    path: Path,
    sources: Sequence[Path],
    attrs: Mapping[str, Any],
    layout: tuple[list[tuple[int, int]], tuple[int, ...], tuple[int, ...]] | None = None,
) -> None:
    """Maps the simulation files ``sources`` into ``path`` as HDF5 virtual datasets, atomically.

    Nothing is copied: ``path`` stays valid while the sources stay where they are relative to it
    (paths are stored relative to ``path``'s folder, so the folder as a whole may move).
    ``layout`` (the sources' row ranges and their theta and x row shapes) spares opening every
    source when the caller knows them; by default they are read from the sources.
    """
    path = Path(path)
    ranges, theta_row, x_row = layout or _row_ranges(sources)
    n = ranges[-1][1]
    layouts = {
        "theta": h5py.VirtualLayout(shape=(n, *theta_row), dtype=np.float32),
        "x": h5py.VirtualLayout(shape=(n, *x_row), dtype=np.float32),
    }
    stamps = {}
    for source, (start, stop) in zip(sources, ranges, strict=True):
        relative = os.path.relpath(Path(source).resolve(), path.parent.resolve())
        stamps[relative] = source_stamp(Path(source))
        for name, row in (("theta", theta_row), ("x", x_row)):
            layouts[name][start:stop] = h5py.VirtualSource(
                relative, name, shape=(stop - start, *row)
            )
    with atomic_h5(path) as f:
        for name, layout in layouts.items():
            f.create_virtual_dataset(name, layout, fillvalue=np.nan)
        finish_file(f, {**attrs, "source_stamps": stamps}, n)


def compression_of(path: Path) -> str:
    """The :data:`COMPRESSIONS` name of the filter a simulation file's ``x`` is stored with."""
    with h5py.File(path, "r") as f:
        return f["x"].compression or "none"


def source_stamp(path: Path) -> str:
    """A digest of a simulation file's attributes, which record what made it and when: a
    shard written again (another run into the same folder) gets another stamp."""
    with h5py.File(path, "r") as f:
        attrs = {key: decode_attr(value) for key, value in f.attrs.items()}
    text = json.dumps(attrs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_sources(f: h5py.File, path: Path) -> list[str]:
    """Shards of a virtual file ``f`` (at ``path``) written again since it was merged: what
    it reads is no longer what it describes."""
    if "source_stamps" not in f.attrs:
        return []
    stamps = decode_attr(f.attrs["source_stamps"])
    return sorted(
        name for name, stamp in stamps.items() if source_stamp(path.parent / name) != stamp
    )


def missing_sources(f: h5py.File, path: Path) -> list[str]:
    """Source files of ``f``'s virtual datasets that do not exist (relative to ``path``)."""
    missing = set()
    for name in ("theta", "x"):
        if name in f and f[name].is_virtual:
            for source in f[name].virtual_sources():
                if not (Path(path).parent / source.file_name).exists():
                    missing.add(source.file_name)
    return sorted(missing)


class atomic_h5:  # noqa: N801 - used like a function: `with atomic_h5(path) as f`
    """Opens ``path``'s temporary sibling for writing; renames it to ``path`` on success only.

    ``clean``: first remove temporaries that killed writes of ``path`` left on this node (a
    listing of the folder; shard writers skip it and clean their folder once per run instead).
    ``expected_bytes``: the data's size, refused up front when the disk has less free (HDF5
    itself fails on a full disk in ways it cannot always recover from).
    """

    def __init__(self, path: Path, *, clean: bool = True, expected_bytes: int = 0) -> None:
        self.path, self.clean, self.expected_bytes = Path(path), clean, expected_bytes
        self.tmp = atomic.temporary_sibling(self.path)

    def __enter__(self) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.clean:
            atomic.remove_stale_temporaries(self.path)
        _, free = free_disk(self.path)
        # HDF5 adds metadata and chunk indexes: a margin of 1 % and 64 KiB.
        if self.expected_bytes and free < self.expected_bytes * 1.01 + 2**16:
            error = OSError(errno.ENOSPC, f"{free} bytes free, {self.expected_bytes} to write")
            raise atomic.disk_full(self.path, error)
        self.file = h5py.File(self.tmp, "w")
        return self.file

    def __exit__(self, exc_type: type | None, exc: BaseException | None, _: object) -> None:
        try:
            self.file.close()
        except Exception as error:  # HDF5 flushes on close: a full disk fails here
            # Kept referenced: deallocating it would fail again, loudly (see HDF5_LEFT_OPEN).
            HDF5_LEFT_OPEN.append(self.file)
            exc = exc or error
        if exc is None:
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink(missing_ok=True)
        if atomic.is_disk_full(exc):
            raise atomic.disk_full(self.path, exc) from exc
        if exc_type is None:
            raise exc  # the failed close


def list_folder(folder: Path) -> tuple[set[str], dict[str, list[Path]]]:
    """One listing of ``folder``: the names of its finished files, and for each file name the
    temporaries that interrupted :class:`atomic_h5` writes of it left behind.

    A run over many files lists their folder once instead of once per file (on a parallel file
    system every listing is a metadata request, and a glob per file grows as files squared).
    """
    finished: set[str] = set()
    temporaries: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return finished, temporaries
    for entry in entries:
        name, marker = entry.name, entry.name.rfind(".tmp-")
        if name.startswith(".") and marker > 0:
            temporaries.setdefault(name[1:marker], []).append(Path(entry.path))
        else:
            finished.add(name)
    return finished, temporaries


def read_attrs(path: Path, *, task: str | None = None) -> dict[str, Any]:
    """The attributes of a finished simulation file (validated like :func:`read_simulations`)."""
    with open_simulations(path) as f:
        return _file_attrs(f, path, task)


def _file_attrs(f: h5py.File, path: Path, task: str | None) -> dict[str, Any]:
    """``f``'s decoded attributes; raises if ``task`` is given and the file holds another."""
    attrs = {key: decode_attr(value) for key, value in f.attrs.items()}
    if task is not None and attrs.get("task") != task:
        raise DataFileError(
            f"{path} holds simulations of task {attrs.get('task')!r}, expected {task!r}"
        )
    return attrs


def read_simulations(path: Path, *, task: str | None = None) -> Simulations:
    """Reads and checks a simulation file.

    Arguments:
        path: The HDF5 file.
        task: If given, the task the file must have been simulated for.

    Raises:
        FileNotFoundError: If the file does not exist.
        DataFileError: If it is not a readable HDF5 file, lacks ``theta`` or ``x``, is
            incomplete, has mismatched row counts, or was made for another task.
    """
    with open_simulations(path) as f:
        attrs = _file_attrs(f, path, task)
        try:
            theta, x = f["theta"][...], f["x"][...]
        except OSError as error:
            raise unreadable(path, error) from None
    return Simulations(theta=theta, x=x, attrs=attrs)


class open_simulations:  # noqa: N801 - context manager that validates while opening
    """Opens a simulation file read-only, after checking it as :func:`read_simulations` does."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> h5py.File:
        path = self.path
        if not path.exists():
            raise FileNotFoundError(
                f"simulation file {path} does not exist; run `pipeline simulate` to create it"
            )
        if path.suffix.lower() in (".npy", ".npz", ".csv", ".txt", ".fits"):
            raise DataFileError(
                f"{path} is not a simulation file of the pipeline (HDF5 with theta and x): "
                "convert your arrays with `pipeline import --task TASK --theta SOURCE --x "
                "SOURCE --out FILE` and use that file"
            )
        try:
            self.file = h5py.File(path, "r")
        except OSError as error:
            raise DataFileError(
                f"{path} is not a readable HDF5 file ({error}). {_WHOSE_FILE}"
            ) from None
        try:
            _check_layout(self.file, path)
        except BaseException:
            self.file.close()
            raise
        return self.file

    def __exit__(self, *_: object) -> None:
        self.file.close()


_WHOSE_FILE = (
    "If `pipeline simulate` wrote it, its job was interrupted: rerun the same command with "
    "--overwrite. If it holds your own simulations (.npy, .npz, or HDF5 written by other "
    "code), convert them with `pipeline import --task TASK --theta SOURCE --x SOURCE --out FILE`"
)


def _check_layout(f: h5py.File, path: Path) -> None:
    missing = [name for name in ("theta", "x") if name not in f]
    if missing:
        raise DataFileError(
            f"{path} has no dataset {' or '.join(map(repr, missing))}; expected 'theta' (N, D) "
            "and 'x' (N, ...) as `pipeline simulate` writes them. For your own file, name its "
            "datasets: `pipeline import --theta FILE:DATASET --x FILE:DATASET`"
        )
    if not f.attrs.get("complete", False):
        raise DataFileError(f"{path} is incomplete (no 'complete' attribute). {_WHOSE_FILE}")
    missing = missing_sources(f, path)
    if missing:
        raise DataFileError(
            f"{path} maps shards as a virtual dataset, and {len(missing)} of them are missing "
            f"(first: {missing[0]}). Rerun `pipeline simulate` with the same options to "
            "recompute them, or use --merge copy for a self-contained file."
        )
    changed = changed_sources(f, Path(path))
    if changed:
        raise DataFileError(
            f"{path} maps shards as a virtual dataset, and {len(changed)} of them were written "
            f"again after it was merged (first: {changed[0]}): another run wrote into its shard "
            "folder, so the file no longer reads the data it describes. Rerun `pipeline "
            "simulate` with its options and --overwrite, or use --merge copy"
        )
    theta, x = f["theta"], f["x"]
    if theta.ndim != 2:
        raise DataFileError(f"{path}: theta must have shape (N, D), found {theta.shape}")
    if len(theta) != len(x):
        raise DataFileError(
            f"{path}: theta has {len(theta)} rows but x has {len(x)}; the file is inconsistent"
        )


def describe(path: Path) -> list[str]:
    """Lines describing an HDF5 file for ``pipeline inspect``: its attributes, and per dataset
    shape, dtype, layout and non-finite count (counted block by block: bounded memory)."""
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise unreadable(path, error) from None
    lines = [str(path)]
    with f:
        lines += [f"  @{key} = {decode_attr(value)}" for key, value in sorted(f.attrs.items())]
        missing = missing_sources(f, path)
        for name, dataset in f.items():
            layout = "virtual" if dataset.is_virtual else f"chunks {dataset.chunks}"
            if dataset.is_virtual:
                layout += f" over {len(dataset.virtual_sources())} shard(s)"
            described = f"  {name}: shape {dataset.shape}, {dataset.dtype}, {layout}"
            if missing and dataset.is_virtual:
                lines.append(f"{described}; MISSING shards")
                continue
            row_bytes = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
            bad, step = 0, max(64 * CHUNK_BYTES // max(row_bytes, 1), 1)
            for start in range(0, len(dataset), step):
                block = dataset[start : start + step]
                bad += int(np.size(block) - np.isfinite(block).sum())
            lines.append(f"{described}, {bad} non-finite values")
        lines += [f"  missing shard: {source}" for source in missing]
    return lines

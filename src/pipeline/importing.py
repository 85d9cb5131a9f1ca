"""Imports existing ``(theta, x)`` arrays into the pipeline's HDF5 layout, in bounded memory.

Data without a simulator (an earlier campaign, a CAMELS or Quijote archive) enter the DAG here
and continue at train. A source is an array in a file:

- ``PATH.npy``: the array saved by ``numpy.save``;
- ``PATH.npz:MEMBER``: one array of a ``numpy.savez`` archive (``:MEMBER`` may be left out when
  the archive holds one array), e.g. ``data.npz:theta`` and ``data.npz:x``;
- ``PATH.h5:DATASET`` (also ``.hdf5``, ``.hdf``): an HDF5 dataset, ``DATASET`` a path such as
  ``sims/run1/theta`` (may be left out when the file holds one dataset).

Rows ``[start, stop)`` of both sources are copied block by block, so memory holds one block
(about :data:`BLOCK_BYTES`), never the file. ``.npy`` files and ``.npz`` members are read with
plain sequential reads into one block: a memory map would leave every page read resident (and
counted in the process's memory) until the kernel reclaims it. The output carries the
attributes of a ``pipeline simulate`` file, with ``imported = True`` and, instead of a seed, the
sources with their SHA-256, from which the ``config_digest`` follows: the same rows of the same
archive give the same digest, other data another. The hash is computed on a thread beside
the copy.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import h5py
import numpy as np

from pipeline import atomic, storage
from pipeline.progress import Progress
from pipeline.provenance import provenance
from pipeline.tasks import Task
from pipeline.tasks.base import source_digest

log = logging.getLogger(__name__)

# Bytes of source rows read per block: large enough that per-block costs vanish, small enough
# to import beside a training job.
BLOCK_BYTES = 64 * 2**20
KINDS = {".npy": "npy", ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5"}
SOURCE_FORMS = "PATH.npy, PATH.npz:MEMBER or PATH.h5:DATASET (.h5, .hdf5, .hdf)"
# What reading a damaged .npy file or zip member raises (zip members check their CRC at the end).
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
# The first suffix of KINDS that ends the text or precedes ':' ends the path.
_SOURCE = re.compile(r"^(?P<path>.+?\.(?:npy|npz|h5|hdf5|hdf))(?::(?P<member>.*))?$", re.I)


@dataclass(frozen=True)
class Source:
    """An array in a file.

    Attributes:
        path: The file, as given.
        member: The ``.npz`` member or HDF5 dataset path; ``None`` for ``.npy`` files, or to
            take the only array of the file.
        kind: ``"npy"``, ``"npz"`` or ``"hdf5"``.
    """

    path: Path
    member: str | None
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


def parse_source(text: str | Path | Source) -> Source:
    """``PATH.npy``, ``PATH.npz[:MEMBER]`` or ``PATH.h5[:DATASET]`` as a :class:`Source`."""
    if isinstance(text, Source):
        return text
    match = _SOURCE.match(str(text))
    if match is None:
        raise ValueError(
            f"cannot read array source {str(text)!r}: expected {SOURCE_FORMS}. Convert other "
            "formats with numpy first, e.g. np.save('x.npy', np.loadtxt('x.csv', delimiter=','))"
        )
    path = Path(match["path"])
    kind = KINDS[path.suffix.lower()]
    member = match["member"] or None
    if kind == "npy" and member is not None:
        raise ValueError(f"array source {text!r}: a .npy file holds one array; drop ':{member}'")
    if kind == "hdf5" and member is not None:
        member = member.strip("/") or None
    return Source(path=path, member=member, kind=kind)


class Rows(Protocol):
    """An array read by row blocks: ``rows[start:stop]`` reads only those rows, into memory
    that the next read may reuse."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, rows: slice) -> np.ndarray: ...


class StreamRows:
    """Rows of a C-ordered ``.npy`` array that starts at ``offset`` in ``file``, read in order.

    Each read fills one buffer, reused by the next: a block's rows are valid until the next
    block is read. Fresh memory per block would be page-faulted in again every time, and the
    previous block would still be alive while the next is read (two blocks of peak memory).

    Arguments:
        file: A binary file positioned anywhere (a plain file or a zip member).
        shape: The array's shape ``(N, ...)``.
        dtype: Its element type.
        offset: Where its data begin in ``file``.
        name: How errors name the source.
    """

    def __init__(
        self, file: IO[bytes], shape: tuple[int, ...], dtype: np.dtype, offset: int, name: str
    ) -> None:
        self.file, self.shape, self.dtype, self.name = file, shape, dtype, name
        self.offset = offset
        self.row_bytes = dtype.itemsize * math.prod(shape[1:])
        self.buffer = np.empty(0, dtype=np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows ``rows`` (step 1), shape ``(stop - start, *shape[1:])``, in the buffer."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows are read in blocks of consecutive rows only")
        count = max(stop - start, 0)
        size = count * self.row_bytes
        if len(self.buffer) < size:
            self.buffer = np.empty(size, dtype=np.uint8)
        where, data, filled = self.offset + start * self.row_bytes, self.buffer[:size], 0
        try:
            # A zip member seeks forward by decompressing: reading blocks in order never rewinds.
            if self.file.tell() != where:
                self.file.seek(where)
            while filled < size:
                got = self.file.readinto(data[filled:])
                if not got:
                    break
                filled += got
        except _READ_ERRORS as error:
            raise storage.DataFileError(
                f"cannot read {self.name} (corrupt or truncated file?): {error}"
            ) from None
        if filled != size:
            raise storage.DataFileError(
                f"{self.name} ends early (truncated file?): rows [{start}, {stop}) need "
                f"{size} bytes, got {filled}"
            )
        return data.view(self.dtype).reshape(count, *self.shape[1:])


@contextmanager
def open_array(source: Source | str, role: str = "array") -> Iterator[Rows]:
    """Opens ``source`` for reading by row blocks, after checking it holds real numbers.

    Arguments:
        source: The array (a :class:`Source` or its text).
        role: What the array is (``"theta"``, ``"x"``), for error messages.

    Yields:
        An object with ``.shape``, ``.dtype`` and ``[start:stop]`` that reads only those rows.

    Raises:
        FileNotFoundError: If the file does not exist.
        pipeline.storage.DataFileError: If it is unreadable, lacks the member, or does
            not hold an array of real numbers.
    """
    source = parse_source(source)
    name = f"{role} source {source}"
    if not source.path.is_file():
        raise FileNotFoundError(
            f"{name}: file {source.path} does not exist; check the path ({SOURCE_FORMS})"
        )
    opener = {"npy": _open_npy, "npz": _open_npz, "hdf5": _open_hdf5}[source.kind]
    with opener(source, name) as rows:
        if len(rows.shape) == 0:
            raise storage.DataFileError(f"{name} is a single number, not an array of rows")
        yield rows


@contextmanager
def _open_npy(source: Source, name: str) -> Iterator[Rows]:
    with open(source.path, "rb") as file:
        shape, fortran, dtype = _read_header(file, name, "a .npy file written by numpy.save")
        if fortran and len(shape) > 1:
            # Rows of a Fortran-ordered array are strided: read them through a memory map.
            yield np.load(source.path, mmap_mode="r", allow_pickle=False)
            return
        rows = StreamRows(file, shape, dtype, file.tell(), name)
        _check_size(rows, os.path.getsize(source.path), name)
        yield rows


@contextmanager
def _open_npz(source: Source, name: str) -> Iterator[Rows]:
    try:
        archive = zipfile.ZipFile(source.path)
    except (zipfile.BadZipFile, OSError) as error:
        raise storage.DataFileError(
            f"{name}: {source.path} is not a readable .npz archive (truncated, or not written "
            f"by numpy.savez?): {error}"
        ) from None
    with archive:
        member = _npz_member(archive, source, name)
        info = archive.getinfo(f"{member}.npy")
        with archive.open(info) as file:
            shape, fortran, dtype = _read_header(file, name, "an array saved by numpy.savez")
            if fortran and len(shape) > 1:
                raise storage.DataFileError(
                    f"{name} is stored in Fortran (column) order, whose rows cannot be streamed "
                    "from an archive; save it C-ordered (np.savez(..., x=np.ascontiguousarray(x)))"
                    " or as a .npy file"
                )
            rows = StreamRows(file, shape, dtype, file.tell(), name)
            _check_size(rows, info.file_size, name)
            yield rows


@contextmanager
def _open_hdf5(source: Source, name: str) -> Iterator[Rows]:
    try:
        file = h5py.File(source.path, "r")
    except OSError as error:
        raise storage.DataFileError(
            f"{name}: {source.path} is not a readable HDF5 file (truncated or corrupt?): {error}"
        ) from None
    with file:
        found = _hdf5_dataset(file, source, name)
        _check_real(found.dtype, name)
        _check_written(found, name)
        yield _HDF5Rows(found, name)


def _check_written(dataset: h5py.Dataset, name: str) -> None:
    """Refuses a dataset whose storage a writer never reached: HDF5 reads a chunk never written
    as the fill value, rows of zeros that would pass for simulations. A chunked dataset (h5py's
    choice for compressed or resizable ones) is checked chunk by chunk; a contiguous one only
    for never having been written, since its first write allocates all of it; a virtual one
    (another file's rows) not here."""
    if dataset.size == 0:
        return
    if dataset.is_virtual:
        # Rows of files that are gone read as the fill value too.
        here = Path(dataset.file.filename).parent
        gone = sorted(
            {s.file_name for s in dataset.virtual_sources() if not (here / s.file_name).exists()}
        )
        if gone:
            raise storage.DataFileError(
                f"{name}: a virtual dataset whose source files are missing ({', '.join(gone)}): "
                "their rows would read as the fill value. Put them back beside it"
            )
        return
    if dataset.chunks is not None:
        needed = math.prod(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks, strict=True))
        written = dataset.id.get_num_chunks()
    else:
        needed, written = 1, int(dataset.id.get_storage_size() > 0)
    if written < needed:
        raise storage.DataFileError(
            f"{name}: only {written} of the {needed} chunks of its storage were ever written "
            "(a file whose writer stopped early?): the rest would read as rows of the fill "
            "value. Finish writing the archive, or copy the rows written into a file of their own"
        )


class _HDF5Rows:
    """An HDF5 dataset read into one reused buffer (see :class:`StreamRows`), whose read
    errors name the source."""

    def __init__(self, dataset: h5py.Dataset, name: str) -> None:
        self.dataset, self.name = dataset, name
        self.shape, self.dtype = dataset.shape, dataset.dtype
        self.buffer = np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows are read in blocks of consecutive rows only")
        count = max(stop - start, 0)
        if len(self.buffer) < count:
            self.buffer = np.empty((count, *self.shape[1:]), dtype=self.dtype)
        block = self.buffer[:count]
        try:
            if count:
                self.dataset.read_direct(block, np.s_[start:stop])
        except OSError as error:
            raise storage.DataFileError(
                f"cannot read {self.name} (corrupt or truncated file?): {error}"
            ) from None
        return block


def _npz_member(archive: zipfile.ZipFile, source: Source, name: str) -> str:
    """The array of ``archive`` that ``source`` names, or its only one."""
    present = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
    return _choose_member(source, present, name, "array")


def _hdf5_dataset(file: h5py.File, source: Source, name: str) -> h5py.Dataset:
    """The dataset of ``file`` that ``source`` names, or its only one."""
    found = file.get(source.member) if source.member is not None else None
    if isinstance(found, h5py.Dataset):
        return found
    present: list[str] = []
    file.visititems(
        lambda path, obj: present.append(path) if isinstance(obj, h5py.Dataset) else None
    )
    return file[_choose_member(source, present, name, "dataset")]


def _choose_member(source: Source, present: list[str], name: str, what: str) -> str:
    """The member ``source`` names, or the only one present; otherwise lists those present."""
    if source.member is not None:
        member = source.member.removesuffix(".npy") if source.kind == "npz" else source.member
        if member in present:
            return member
        problem = f"{source.path} has no {what} {source.member!r}"
    elif len(present) == 1:
        return present[0]
    else:
        problem = f"{source.path} holds {len(present)} {what}s; name one as {source.path}:NAME"
    shown = ", ".join(present[:20]) + (f", ... ({len(present)} in all)" if present[20:] else "")
    raise storage.DataFileError(f"{name}: {problem}. Present: {shown or 'none'}")


def _read_header(file: IO[bytes], name: str, expected: str) -> tuple[tuple, bool, np.dtype]:
    """Shape, Fortran order and dtype from a ``.npy`` header, whose dtype must hold real
    numbers (checked before the data: pickled objects have no fixed size); ``file`` is left
    at the data."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        version = np.lib.format.read_magic(file)
        if version in readers:
            shape, fortran, dtype = readers[version](file)
            _check_real(dtype, name)
            return shape, fortran, dtype
        problem = f"format version {version[0]}.{version[1]}, which numpy writes only for "
        problem += "structured dtypes with non-ASCII field names"
    except _READ_ERRORS as error:
        if isinstance(error, storage.DataFileError):
            raise
        problem = str(error)
    raise storage.DataFileError(
        f"{name} is not readable as {expected} (truncated or another format?): {problem}"
    )


def _check_size(rows: StreamRows, size: int, name: str) -> None:
    needed = rows.offset + rows.shape[0] * rows.row_bytes if rows.shape else rows.offset
    if size < needed:
        raise storage.DataFileError(
            f"{name} is truncated: its header announces shape {rows.shape} of {rows.dtype} "
            f"({needed} bytes with the header) but it holds {size} bytes; copy it again"
        )


def _check_real(dtype: np.dtype, name: str) -> None:
    """Raises unless ``dtype`` holds real numbers (integers or floats)."""
    if dtype.kind in "iuf" and dtype.names is None:
        return
    if dtype.hasobject:
        why = "Python objects or variable-length strings (pickled in .npy files, which the "
        why += "importer never loads)"
    elif dtype.names is not None:
        why = f"a structured array (fields {', '.join(dtype.names)}); save each as its own array"
    elif dtype.kind == "c":
        why = "complex numbers; store real and imaginary parts as separate columns of x"
    elif dtype.kind in "SUa":
        why = "strings"
    else:
        why = f"values of kind {dtype.kind!r}"
    raise storage.DataFileError(
        f"{name} has dtype {dtype}: {why}. The importer needs real numbers (float or integer "
        "arrays, stored as float32); convert it, e.g. np.save(path, np.asarray(a, dtype=float))"
    )


def resolve_rows(start: int, stop: int | None, num_rows: int) -> tuple[int, int]:
    """``[start, stop)`` with negative values counted from the end, as in Python slices (step
    1), but out-of-range or empty ranges are errors rather than clipped."""
    first = start + num_rows if start < 0 else start
    last = num_rows if stop is None else stop + num_rows if stop < 0 else stop
    if not 0 <= first < last <= num_rows:
        shown = f"{start}:{'' if stop is None else stop}"
        raise ValueError(
            f"--rows {shown} selects rows [{first}, {last}) but the sources hold rows "
            f"[0, {num_rows}); choose 0 <= START < STOP <= {num_rows} (negative values count "
            "from the end)"
        )
    return first, last


def file_sha256(path: Path) -> str:
    """SHA-256 of the file at ``path``, read in pieces of 256 KiB (bounded memory)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def resolved_member(source: Source) -> str | None:
    """The member ``source`` reads as its file names it (``x`` for ``x.npy`` in an archive, a
    dataset's path without its leading slash, the only one where none was named), so that one
    array has one name in a file's lineage whichever way it was written. ``source`` must open
    (:func:`open_array` checked it)."""
    if source.kind == "npz":
        with zipfile.ZipFile(source.path) as archive:
            return _npz_member(archive, source, str(source))
    if source.kind == "hdf5":
        with h5py.File(source.path, "r") as file:
            return _hdf5_dataset(file, source, str(source)).name.strip("/")
    return None


def describe_sources(sources: dict[str, Source]) -> list[dict[str, Any]]:
    """What each source is (role, path as given and resolved, member, size, SHA-256); a file
    shared by both roles is hashed once."""
    digests: dict[Path, str] = {}
    described = []
    for role, source in sources.items():
        resolved = source.path.resolve()
        if resolved not in digests:
            digests[resolved] = file_sha256(resolved)
        described.append(
            {
                "role": role,
                "path": str(source.path),
                "resolved_path": str(resolved),
                "member": resolved_member(source),
                "size_bytes": resolved.stat().st_size,
                "sha256": digests[resolved],
            }
        )
    return described


def import_identity(
    task: Task, sources: list[dict[str, Any]], start: int, stop: int
) -> dict[str, Any]:
    """What determines an imported file's rows: the task, the sources' content and the rows.

    Paths are left out, so moving or renaming the archive keeps the digest.
    """
    return {
        "task": task.name,
        "imported": [
            {key: source[key] for key in ("role", "member", "sha256")} for source in sources
        ],
        "index_start": start,
        "index_stop": stop,
    }


def check_shapes(task: Task, theta: Rows, x: Rows, names: dict[str, str]) -> None:
    """Raises unless ``theta`` (N, D) and ``x`` (N, *x_shape) fit ``task`` and each other;
    ``names`` say how to call each source in the message."""
    column = len(theta.shape) == 1 and task.dim_theta == 1  # (N,) for one parameter
    if tuple(theta.shape[1:]) != (task.dim_theta,) and not column:
        raise ValueError(
            f"{names['theta']} has shape {theta.shape}, expected (N, {task.dim_theta}): one "
            f"column per parameter of task {task.name!r} ({', '.join(task.parameter_names)})"
        )
    if tuple(x.shape[1:]) != tuple(task.x_shape):
        expected = ", ".join(map(str, ("N", *task.x_shape)))
        raise ValueError(
            f"{names['x']} has shape {x.shape}, expected ({expected}): rows of task "
            f"{task.name!r}'s x_shape {tuple(task.x_shape)}; reshape the array or use a task "
            "whose x_shape matches"
        )
    if theta.shape[0] != x.shape[0]:
        raise ValueError(
            f"{names['theta']} has {theta.shape[0]} rows but {names['x']} has {x.shape[0]}; "
            "each row of theta must pair with the row of x simulated from it"
        )


def default_block_rows(task: Task, theta: Rows, x: Rows, num_rows: int) -> int:
    """Rows per block, so that one block of both sources (in their dtypes, and as float32)
    holds about :data:`BLOCK_BYTES`; a multiple of the output's x chunks where one fits."""
    theta_bytes = max(theta.dtype.itemsize, 4) * task.dim_theta
    x_bytes = max(x.dtype.itemsize, 4) * math.prod(task.x_shape)
    rows = max(1, BLOCK_BYTES // (theta_bytes + x_bytes))
    chunk = storage.chunk_rows(num_rows, tuple(task.x_shape))
    # Whole chunks per block: no chunk is written in two pieces.
    return rows - rows % chunk if rows >= chunk else rows


def import_simulations(
    task: Task,
    theta: Source | str,
    x: Source | str,
    out: Path,
    *,
    start: int = 0,
    stop: int | None = None,
    block_rows: int | None = None,
    overwrite: bool = False,
    compression: str = "gzip",
) -> dict[str, Any]:
    """Writes rows ``[start, stop)`` of ``theta`` and ``x`` to the simulation file ``out``.

    Everything is checked before anything is written; the file is written under a temporary
    name and renamed when complete. Rows with NaN or inf are kept and counted
    (``num_nonfinite``): training and validation exclude them.

    Arguments:
        task: The task the rows belong to; its parameters, units and ``x_shape`` must match.
        theta: Parameters, an array ``(M, D)`` (or ``(M,)`` when ``D = 1``).
        x: Simulations, an array ``(M, *task.x_shape)``.
        out: The HDF5 file to write: ``theta`` ``(N, D)`` and ``x`` ``(N, *x_shape)``, float32.
        start: First row to import; negative counts from the end.
        stop: Row after the last; ``None`` for the end, negative counts from the end.
        block_rows: Rows read and written at a time (default: about :data:`BLOCK_BYTES`).
        overwrite: Whether to replace an existing ``out``.
        compression: HDF5 filter, a key of :data:`pipeline.storage.COMPRESSIONS`.

    Returns:
        The attributes written.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
        FileNotFoundError: If a source file does not exist.
        ValueError: For unreadable sources, shapes that do not fit the task or each other, an
            empty or out-of-range row range (:class:`pipeline.storage.DataFileError` for
            problems with a file).
    """
    out = Path(out)
    sources = {"theta": parse_source(theta), "x": parse_source(x)}
    names = {role: f"{role} source {source}" for role, source in sources.items()}
    _check_output(out, sources, overwrite=overwrite, compression=compression)
    for source in sources.values():
        _check_not_ours(source)
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    with ExitStack() as stack:
        rows = {role: stack.enter_context(open_array(s, role)) for role, s in sources.items()}
        start, stop, block = _plan_rows(task, rows, names, start, stop, block_rows)
        _log_plan(task, names, out, (start, stop), block)
        attrs = _copy_and_hash(task, rows, sources, out, (start, stop), block, compression)
    _log_written(task, out, stop - start, attrs["num_nonfinite"])
    return attrs


def _check_not_ours(source: Source) -> None:
    """Refuses a file the pipeline wrote itself (simulations, a round's, samples): imported, it
    would lose its lineage (its seed, the region it was drawn from), which the later stages
    check to refuse training rows as a test set or a round's rows sampled without its region."""
    if source.kind != "hdf5" or not source.path.is_file():
        return
    try:
        with h5py.File(source.path, "r") as file:
            attrs = {key: storage.decode_attr(value) for key, value in file.attrs.items()}
    except (OSError, ValueError):
        return  # not readable: open_array names the problem
    ours = attrs.get("complete") and "provenance" in attrs and "task" in attrs
    if ours and ("num_simulations" in attrs or "sampled" in attrs):
        raise storage.DataFileError(
            f"{source.path} was written by this pipeline (task {attrs.get('task')!r}): give it to "
            "the stages as it is (--data, --observations); import is for arrays made "
            "elsewhere, and an imported copy would lose the lineage they check"
        )


def _plan_rows(
    task: Task,
    rows: dict[str, Rows],
    names: dict[str, str],
    start: int,
    stop: int | None,
    block_rows: int | None,
) -> tuple[int, int, int]:
    """Checks the open sources ``rows`` against ``task`` and each other, and the rows
    ``[start, stop)`` against the prior; returns those rows resolved and the rows per block."""
    check_shapes(task, rows["theta"], rows["x"], names)
    start, stop = resolve_rows(start, stop, rows["x"].shape[0])
    block = block_rows or default_block_rows(task, rows["theta"], rows["x"], stop - start)
    check_within_prior(task, rows["theta"], start, stop, block, names["theta"])
    check_rows_like_the_rest(task, rows["theta"], start, stop, block, names["theta"])
    return start, stop, block


def _log_plan(
    task: Task, names: dict[str, str], out: Path, span: tuple[int, int], block: int
) -> None:
    """Logs which rows ``span = (start, stop)`` of which sources go where, ``block`` at a time."""
    log.info(
        "importing rows [%d, %d) of %s and %s into %s for task %s, %d rows per block",
        span[0],
        span[1],
        names["theta"],
        names["x"],
        out,
        task.name,
        block,
    )


def _copy_and_hash(
    task: Task,
    rows: dict[str, Rows],
    sources: dict[str, Source],
    out: Path,
    span: tuple[int, int],
    block: int,
    compression: str,
) -> dict[str, Any]:
    """Copies the rows ``span`` into ``out`` (:func:`_copy_rows`) while hashing ``sources``;
    returns the attributes written.

    The SHA-256 reads the files whole (1.3 GB/s on the 2-core CI VM, as fast as an uncompressed
    copy): on its own thread (hashlib and reads release the GIL) it overlaps the copy instead of
    adding to it.
    """
    start, stop = span
    with ThreadPoolExecutor(max_workers=1) as pool:
        described = pool.submit(describe_sources, sources)
        return _copy_rows(
            task,
            rows,
            out,
            span,
            block,
            lambda: imported_attrs(task, described.result(), start, stop, compression),
            compression,
            sources,
        )


def _log_written(task: Task, out: Path, num_rows: int, num_nonfinite: int) -> None:
    """Logs what ``out`` holds, ``num_rows`` rows, with a warning when some are not finite."""
    if num_nonfinite:
        log.warning(
            "%d of %d imported rows contain NaN or inf; they are kept in %s, flagged by "
            "'num_nonfinite', and excluded from training and validation",
            num_nonfinite,
            num_rows,
            out,
        )
    log.info(
        "wrote %s: theta (%d, %d), x (%d, %s)",
        out,
        num_rows,
        task.dim_theta,
        num_rows,
        ", ".join(map(str, task.x_shape)),
    )


# A split's p-value below this (per parameter, Bonferroni over them) is no chance: the rows are
# ordered. A random split gives a uniform p-value, whatever the archive's size.
SPLIT_PVALUE = 1e-6
SPLIT_ROWS = 200_000


def check_rows_like_the_rest(
    task: Task, theta: Rows, start: int, stop: int, block: int, name: str
) -> None:
    """Refuses rows ``[start, stop)`` whose parameters are not distributed as the archive's
    other rows' (a two-sample Kolmogorov-Smirnov test per parameter): an archive sorted by a
    parameter, or grouped by set, makes its last rows a corner of the prior instead of a
    held-out sample, and coverage measured there says nothing of the posterior elsewhere."""
    from scipy import stats

    num_rows = theta.shape[0]
    if stop - start == num_rows:
        return
    # Every stride-th row of the split and of the rest: about SPLIT_ROWS of each at most,
    # enough for the test at any archive size.
    inner = max(1, (stop - start) // SPLIT_ROWS)
    outer = max(1, (num_rows - stop + start) // SPLIT_ROWS)
    kept, index = [], []
    for i in range(0, num_rows, block):
        rows = np.arange(i, min(i + block, num_rows))
        in_split = (rows >= start) & (rows < stop)
        rows = rows[np.where(in_split, rows % inner == 0, rows % outer == 0)]
        block_values = np.asarray(theta[i : min(i + block, num_rows)], dtype=np.float64)
        kept.append(block_values.reshape(-1, task.dim_theta)[rows - i])
        index.append(rows)
    values, index = np.concatenate(kept), np.concatenate(index)
    inside = (index >= start) & (index < stop)
    finite = np.isfinite(values).all(axis=1)
    # Each parameter set once a side: archives often hold several realisations of one set in
    # consecutive rows, which are no independent draws (and a split keeps them together).
    split, rest = (np.unique(values[side & finite], axis=0) for side in (inside, ~inside))
    for d, parameter in enumerate(task.parameter_names):
        ours, others = split[:, d], rest[:, d]
        if len(ours) < 2 or len(others) < 2:
            return
        pvalue = stats.ks_2samp(ours, others).pvalue
        if pvalue < SPLIT_PVALUE / task.dim_theta:
            raise ValueError(
                f"{name}: rows [{start}, {stop}) differ from the archive's other rows in "
                f"{parameter} (medians {np.median(ours):g} against {np.median(others):g}; "
                f"Kolmogorov-Smirnov p = {pvalue:.1e}): its rows are ordered (sorted by a "
                "parameter, or grouped by set), so these are no random sample of it. Shuffle "
                "the archive's parameter sets before importing (theta and x alike, the "
                "realisations of one set kept together)"
            )


def check_within_prior(
    task: Task, theta: Rows, start: int, stop: int, block: int, name: str
) -> None:
    """Refuses parameters outside the task's prior box: the posterior is trained and sampled on
    that box, so such rows would be learned but never sampled (and the next stages would blame
    the observations). Non-finite rows are left to the NaN count; unbounded priors pass."""
    bounds = None if task.prior is None else task.prior.bounds
    if bounds is None:
        return
    # Float32 storage rounds values at the edges: compare against the bounds as stored.
    low, high = (np.asarray(b, dtype=np.float32) for b in bounds)
    outside, first = 0, None
    for offset in range(start, stop, block):
        values = np.asarray(theta[offset : min(offset + block, stop)], dtype=np.float32)
        values = values.reshape(len(values), -1)
        finite = np.isfinite(values).all(axis=1)
        bad = finite & ((values < low) | (values > high)).any(axis=1)
        if first is None and bad.any():
            row = int(np.flatnonzero(bad)[0])
            column = int(np.flatnonzero((values[row] < low) | (values[row] > high))[0])
            first = (offset + row, column, float(values[row, column]))
        outside += int(bad.sum())
    if outside:
        row, column, value = first
        raise ValueError(
            f"{name}: {outside} of {stop - start} rows lie outside the task's prior (first: "
            f"row {row}, {task.parameter_names[column]} = {value:g}, prior "
            f"[{low[column]:g}, {high[column]:g}]). Declare the prior the archive was drawn "
            "from in the task, or leave those rows out"
        )


def imported_attrs(
    task: Task, sources: list[dict[str, Any]], start: int, stop: int, compression: str
) -> dict[str, Any]:
    """The attributes of an imported file but for ``num_nonfinite`` and those
    :mod:`pipeline.storage` adds (``format_version``, ``num_simulations``, ``complete``)."""
    made_by = provenance(import_identity(task, sources, start, stop))
    return {
        "task": task.name,
        "parameter_names": list(task.parameter_names),
        "parameter_units": list(task.parameter_units),
        "x_unit": task.x_unit,
        "index_start": start,
        "index_stop": stop,
        "imported": True,
        "sources": sources,
        "compression": compression,
        "provenance": made_by,
        "config_digest": made_by["config_digest"],
        # The definition of a user's task the rows were imported for (the rows themselves do
        # not depend on it, so it is no part of their identity): what sample tells tasks by.
        **({"task_digest": digest} if (digest := source_digest(task)) is not None else {}),
    }


def _check_output(
    out: Path, sources: dict[str, Source], *, overwrite: bool, compression: str
) -> None:
    if compression not in storage.COMPRESSIONS:
        raise ValueError(
            f"--compression must be one of {', '.join(storage.COMPRESSIONS)}, got {compression!r}"
        )
    for role, source in sources.items():
        # The rename at the end would replace the user's archive with the import.
        if out.resolve() == source.path.resolve():
            raise ValueError(f"--out {out} is the {role} source itself; choose another --out")
    atomic.check_new(out, overwrite=overwrite)


def _copy_rows(
    task: Task,
    rows: dict[str, Rows],
    out: Path,
    span: tuple[int, int],
    block: int,
    attrs: Callable[[], dict[str, Any]],
    compression: str,
    sources: dict[str, Source],
) -> dict[str, Any]:
    """Copies the rows ``span = (start, stop)`` of ``sources`` (read as ``rows``) into ``out``
    block by block, atomically, with the attributes ``attrs()`` returns once all are copied,
    and ``num_nonfinite``; returns all the attributes written."""
    start, stop = span
    num_rows, num_nonfinite = stop - start, 0
    progress = Progress(num_rows, "rows imported", log)
    shapes = {"theta": (task.dim_theta,), "x": tuple(task.x_shape)}
    buffers = {
        role: Float32Rows(rows[role], shape, f"{role} source {sources[role]}")
        for role, shape in shapes.items()
    }
    with storage.atomic_h5(out) as f:
        targets = {
            role: storage.create_dataset(f, role, (num_rows, *shape), compression)
            for role, shape in shapes.items()
        }
        for lo in range(start, stop, block):
            hi = min(lo + block, stop)
            theta, x = buffers["theta"][lo:hi], buffers["x"][lo:hi]
            targets["theta"][lo - start : hi - start] = theta
            targets["x"][lo - start : hi - start] = x
            num_nonfinite += storage.count_nonfinite_rows(theta, x)
            progress.update(hi - lo)
        # Over all rows, before the file is finished: a sorted archive's blocks vary less.
        for buffer in buffers.values():
            buffer.precision.check()
        written = {**attrs(), "num_nonfinite": num_nonfinite}
        storage.finish_file(f, written, num_rows)
    return {
        **written,
        "format_version": storage.FORMAT_VERSION,
        "num_simulations": num_rows,
        "complete": True,
    }


# Where to mend an archive's values that float32 cannot hold.
ARCHIVE_FIX = (
    "when saving the archive (or, if it should hold no such values, check that it is not damaged)"
)


class Float32Rows:
    """Row blocks of ``rows`` as float32 of shape ``(n, *row_shape)``, converted into one
    reused array (as :class:`StreamRows` reads into one): valid until the next block. Each
    block's range is checked first (:func:`pipeline.storage.check_float32`; ``what`` names it),
    and ``precision`` gathers every block for the precision check after the last."""

    def __init__(self, rows: Rows, row_shape: tuple[int, ...], what: str) -> None:
        self.rows, self.row_shape, self.what = rows, row_shape, what
        self.precision = storage.Float32Precision(what, ARCHIVE_FIX)
        self.buffer = np.empty((0, *row_shape), dtype=np.float32)

    def __getitem__(self, rows: slice) -> np.ndarray:
        block = self.rows[rows]
        block = block.reshape(len(block), *self.row_shape)  # theta (n,) of one parameter
        if block.dtype == np.float32:  # native byte order: written as it is
            return block
        if len(self.buffer) < len(block):
            self.buffer = np.empty((len(block), *self.row_shape), dtype=np.float32)
        storage.check_float32(
            block, self.what, range_only=True, first_row=rows.start, where=ARCHIVE_FIX
        )
        self.precision.add(block)
        converted = self.buffer[: len(block)]
        np.copyto(converted, block, casting="unsafe")
        return converted

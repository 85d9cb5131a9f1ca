"""Writes that readers see whole or not at all: a temporary sibling, renamed on success.

The temporary is ``.NAME.tmp-HOST-PID`` beside ``NAME`` (the names
:func:`pipeline.storage.list_folder` recognises as debris of killed writes), so the rename stays
within one file system. A failed write removes its temporary and leaves the old file as it was;
a full disk is reported as such, naming the file and the folder to free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST = socket.gethostname().split(".")[0]


def check_new(path: Path, *, overwrite: bool) -> None:
    """Refuses an existing ``path`` unless ``overwrite``, and makes its folder now: an output
    that cannot be written fails before the work, not after it.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        OSError: The folder cannot be made or written (a file in the way, no permission).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            error.errno, f"cannot make the folder of {path} ({error}); choose another --out"
        ) from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write in {path.parent}; choose another --out")


def temporary_sibling(path: Path) -> Path:
    """``.NAME.tmp-HOST-PID`` in ``path``'s folder: which process on which node writes it."""
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes the temporaries of ``path`` whose writer was a process of this node that no
    longer runs (a killed write); returns them. Those of other nodes are left alone: their
    writers may still run (on a shared file system this node cannot see them)."""
    path = Path(path)
    prefix, removed = f".{path.name}.tmp-", []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        host, _, pid = entry.name[len(prefix) :].rpartition("-")
        if (host and host != HOST) or not pid.isdigit() or _running(int(pid)):
            continue
        Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
        log.info("removed %s, left by a killed write of %s", entry.path, path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` reports a full disk or quota: an OSError's errno, or HDF5's message
    (h5py raises RuntimeError with the C library's errno in the text)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "errno = 28," in text or "errno = 122," in text or "No space left on device" in text


def disk_full(path: Path, error: BaseException) -> OSError:
    """The full-disk ``error`` of a write of ``path`` as a message a user can act on."""
    return OSError(
        getattr(error, "errno", None) or errno.ENOSPC,
        f"disk full (or quota reached) while writing {path}: free space in {path.parent} and "
        f"rerun; {path} was left as it was before",
    )


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is flushed to disk and renamed to
    ``path``, on any error removed (``path`` untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(path, error) from error
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, **dumps: Any) -> None:
    """Writes ``data`` as JSON to ``path`` atomically (``dumps``: options of json.dumps)."""
    write_text(path, json.dumps(data, **dumps) + "\n")

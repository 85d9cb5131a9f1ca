"""An exclusive lock on an output being written, so that two runs never write one output.

The lock is ``fcntl.flock`` on a file in the output's working folder: the kernel releases it
when its holder exits, however it exits (SIGKILL, a time limit), so a killed run never leaves a
lock that blocks the rerun. The file also names its holder (host, process, time, what it
writes), for the message the second run gets. On network file systems without ``flock``
support the lock is a no-op, as the message of :class:`OutputLock` logs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)


class OutputBusyError(ValueError):
    """Another process holds the lock of an output."""


class OutputLock:
    """``with OutputLock(folder, what):`` holds ``folder/.lock`` exclusively or raises
    :class:`OutputBusyError` naming the holder.

    Arguments:
        folder: The output's working folder (created if missing).
        what: What the holder writes, e.g. ``"sims.h5 (two_moons, seed 1)"``.
    """

    NAME = ".lock"
    # Each retry follows a holder's release; more in a row than this is no race.
    ATTEMPTS = 100

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / self.NAME
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, self.ATTEMPTS + 1):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise OutputBusyError(
                    f"cannot write {self.what}: another run holds it ({holder}). Two runs must "
                    "not share an output: wait for that one to finish (or stop it), or choose "
                    "another --out"
                ) from None
            except OSError as error:  # file systems without flock
                log.warning(
                    "cannot lock %s (%s): concurrent runs will not be detected", self.path, error
                )
                break
            # A holder removes the file as it releases it: a lock taken on the file it had
            # opened before then guards nothing (a third run creates and locks a new one).
            if self._is_current(fd):
                break
            if attempt == self.ATTEMPTS:  # a file system whose fstat and stat never agree
                log.warning(
                    "cannot tell whether %s is the lock file other runs see: concurrent runs "
                    "may not be detected",
                    self.path,
                )
                break
            os.close(fd)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        holder = f"process {os.getpid()} on {platform.node()} since {stamp}, writing {self.what}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is the file at ``self.path`` now, not one removed since it was
        opened."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except OSError:  # removed, or a stale handle on a network file system
            return False

    def __exit__(self, *_: object) -> None:
        if self.fd is not None:
            # Removed while still held: a run that opens it now finds it busy (correctly); one
            # that opens it after makes a new file, free to lock.
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # releases the flock
            self.fd = None

"""Writes HDF5 shards on a background thread, so that a rank simulates its next chunk meanwhile.

h5py releases Python's GIL inside dataset writes (filters included), so on a node with spare
cores (or a parallel file system that makes writes wait) the write of chunk ``k`` overlaps the
simulation of chunk ``k + 1``; creating the file, its datasets and attributes holds the GIL, a
cost that shows only for simulators as fast as two_moons (benchmarks/README.md).

One write is in flight at a time, and :meth:`BackgroundWriter.submit` returns only once the
write before it has finished: a rank holds at most two chunks, whatever ``N``, and may simulate
into two buffers in turn (the one submitted last is the only one still being read).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

_DONE = None


class BackgroundWriter:
    """Runs submitted write calls one after another on one thread; errors reach the caller.

    Use as a context manager: leaving it waits for the last write, and re-raises the first error
    a write raised (a later :meth:`submit` raises it too, so a failing disk stops the run).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="shard-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def submit(self, write: Callable[[], None]) -> None:
        """Waits for the earlier write to finish, then queues ``write`` and returns."""
        self._jobs.join()
        self._raise_if_failed()
        self._jobs.put(write)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._jobs.put(_DONE)
        self._thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _DONE:
            if self._error is None:  # after a failure, drain without writing
                try:
                    job()
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    self._error = error
            self._jobs.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

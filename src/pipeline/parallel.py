"""MPI communicator access that degrades to a single process when no launcher started us."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Variables set by the launchers we support (MPICH/Hydra, Open MPI, PMIx, Slurm's srun).
_MPI_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class Comm(Protocol):
    """The subset of ``mpi4py.MPI.Comm`` the pipeline uses."""

    def Get_rank(self) -> int: ...  # noqa: N802 - mpi4py's names
    def Get_size(self) -> int: ...  # noqa: N802
    def Barrier(self) -> None: ...  # noqa: N802
    def Abort(self, errorcode: int = 1) -> None: ...  # noqa: N802
    def allreduce(self, value: Any) -> Any: ...
    def bcast(self, value: Any, root: int = 0) -> Any: ...


class SerialComm:
    """A communicator of one process, for runs without ``mpiexec``/``srun``."""

    def Get_rank(self) -> int:  # noqa: N802
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def Barrier(self) -> None:  # noqa: N802
        pass

    def Abort(self, errorcode: int = 1) -> None:  # noqa: N802
        sys.exit(errorcode)

    def allreduce(self, value: Any) -> Any:
        return value

    def bcast(self, value: Any, root: int = 0) -> Any:
        return value


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (so importing mpi4py is safe and useful)."""
    return any(name in os.environ for name in _MPI_VARS)


def world() -> Comm:
    """``MPI.COMM_WORLD`` under an MPI launcher, else a :class:`SerialComm`."""
    if not launched_by_mpi():
        return SerialComm()
    from mpi4py import MPI

    return MPI.COMM_WORLD


def abort_on_error(comm: Comm, error: BaseException) -> None:
    """Logs ``error`` with this rank and aborts every rank, so no rank waits forever."""
    rank = comm.Get_rank()
    log.critical("rank %d failed: %s: %s", rank, type(error).__name__, error, exc_info=error)
    if comm.Get_size() > 1:
        for handler in logging.getLogger().handlers:
            handler.flush()
        # The launcher forwards stderr asynchronously and stops forwarding once it kills the
        # job: a moment's pause lets the message above reach the user's terminal.
        time.sleep(0.5)
        comm.Abort(1)

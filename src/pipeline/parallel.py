"""Where this process sits among its peers: the MPI communicator (a single process when no
launcher started us) and the devices-per-node layout the launcher announced to training."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Layout:
    """Where this process sits: devices per node, nodes, and the launcher that said so."""

    devices: int
    num_nodes: int
    launcher: str


def launch_layout(requested_devices: int) -> Layout:
    """Reads devices per node and node count from the launcher's environment.

    ``torchrun`` sets ``LOCAL_WORLD_SIZE``/``WORLD_SIZE``; ``srun`` sets ``SLURM_NTASKS`` and
    ``SLURM_NNODES``; ``mpiexec`` sets PMI variables and the local size comes from a shared-memory
    split of the world communicator. Without a launcher, ``requested_devices`` processes are
    started by Lightning itself.

    Raises:
        ValueError: If the launcher's numbers are inconsistent (naming the variable to fix).
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        return Layout(local, _nodes(world, local, "torchrun --nproc_per_node"), "torchrun")
    if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1 and (
        "SLURM_PROCID" in env and not launched_by_mpi_only()
    ):
        world = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
        if world % nodes:
            raise ValueError(
                f"SLURM runs {world} tasks on {nodes} nodes: set --ntasks-per-node so every "
                "node runs the same number of tasks (one per device)"
            )
        return Layout(world // nodes, nodes, "slurm")
    if launched_by_mpi():
        from mpi4py import MPI

        world = MPI.COMM_WORLD.Get_size()
        local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        return Layout(local, _nodes(world, local, "mpiexec -ppn"), "mpi")
    return Layout(requested_devices, 1, "lightning")


def launched_by_mpi_only() -> bool:
    """Whether ``mpiexec`` (not ``srun``) launched us inside a SLURM allocation."""
    return launched_by_mpi() and "SLURM_STEP_ID" not in os.environ


def _nodes(world: int, local: int, fix: str) -> int:
    if world % local:
        raise ValueError(
            f"{world} processes cannot be spread evenly with {local} per node; set `{fix}` so "
            "every node runs the same number of processes (one per device)"
        )
    return world // local

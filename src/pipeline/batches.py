"""Batches for training: whole batches sliced from tensors or read as contiguous HDF5 rows.

A DataLoader over a map-style dataset indexes one sample at a time and collates them in Python;
for NPE's small rows that costs more than the network. Here a sampler yields a whole batch's
indices (or row range) at once and the dataset answers with two tensors, so the DataLoader runs
with ``batch_size=None``.

Every epoch's order is drawn from ``(seed, epoch)`` alone and split into equal, disjoint parts
per DDP rank, so a run resumed at epoch ``e`` sees the batches an uninterrupted run would have,
and every rank runs the same number of steps (DDP needs that).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline import storage


class EpochBatches(Sampler[np.ndarray]):
    """Yields this rank's batches of ``items`` (an array of indices or of block numbers).

    Arguments:
        items: What to batch, shape ``(n,)``.
        batch_size: Items per batch (the last batch of a rank may be smaller).
        seed: With the epoch, seeds the shuffle; ``None`` keeps ``items``' order.
        rank, world_size: This process's place among the DDP ranks; each gets
            ``n // world_size`` items (up to ``world_size - 1`` are left out, others each epoch).
    """

    def __init__(
        self,
        items: np.ndarray,
        batch_size: int,
        seed: int | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.items, self.batch_size, self.seed = np.asarray(items), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch."""
        self.epoch = epoch

    def _mine(self) -> np.ndarray:
        items = self.items
        if self.seed is not None:
            items = items[np.random.default_rng([self.seed, self.epoch]).permutation(len(items))]
        share = len(items) // self.world_size
        return items[self.rank * share : (self.rank + 1) * share]

    def __iter__(self) -> Iterator[np.ndarray]:
        mine = self._mine()
        for start in range(0, len(mine), self.batch_size):
            yield mine[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-(len(self.items) // self.world_size) // self.batch_size)


class TensorRows(Dataset):
    """``theta`` (N, D) and ``x`` (N, *x_shape) in memory; item ``rows`` is a whole batch."""

    def __init__(self, theta: torch.Tensor, x: torch.Tensor) -> None:
        self.theta, self.x = theta, x

    def __len__(self) -> int:
        return len(self.theta)

    def __getitem__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(np.asarray(rows))
        return self.theta[index], self.x[index]


class HDF5Blocks(Dataset):
    """Contiguous blocks of ``block_size`` rows read from the file when asked; item = block number.

    The file is opened lazily in the process that reads (a DataLoader worker, after the fork),
    so nothing but one block is ever held: files larger than memory train. Rows with NaN or inf
    are dropped from the block (so a batch may be smaller than ``block_size``).
    """

    def __init__(self, path: Path, block_size: int, num_rows: int) -> None:
        self.path, self.block_size, self.num_rows = Path(path), block_size, num_rows
        self._file: h5py.File | None = None
        self._pid = -1

    def __len__(self) -> int:
        return -(-self.num_rows // self.block_size)

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited across fork is not safe to use: open our own.
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["theta"], self._file["x"]

    def read(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``block``, non-finite ones dropped: ``theta`` (n, D), ``x`` (n, *x_shape)."""
        theta, x = self._datasets()
        rows = slice(block * self.block_size, min((block + 1) * self.block_size, self.num_rows))
        theta_block, x_block = theta[rows], x[rows]
        finite = storage.finite_rows(theta_block) & storage.finite_rows(x_block)
        return theta_block[finite], x_block[finite]

    def __getitem__(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.read(int(block)) for block in np.atleast_1d(blocks)]
        theta = np.concatenate([p[0] for p in parts])
        x = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(theta), torch.from_numpy(x)

    def __getstate__(self) -> dict:
        # Sent to DataLoader workers: without the open handle.
        return {**self.__dict__, "_file": None, "_pid": -1}

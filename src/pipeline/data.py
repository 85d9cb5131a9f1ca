"""Training data: a LightningDataModule over a simulation file, with a seeded train/val split.

Two ways to feed the trainer, chosen by ``loading``:

- ``memory``: the finite rows are loaded once; batches are index slices of tensors.
- ``stream``: nothing is loaded; batches are contiguous blocks of ``batch_size`` rows read from
  the file when needed (so a file larger than memory trains). The split and the shuffle act on
  whole blocks, so a block's rows are always batched together: simulations are independent
  draws, so a block is as good a batch as any, only its membership does not change per epoch.
- ``auto`` (the default): ``memory`` when a copy per process on this node takes at most half of
  the available memory, else ``stream``.

Validation runs on the whole held-out set on every rank (it is small), so ``val_loss`` does not
depend on the number of ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import storage
from pipeline.batches import EpochBatches, HDF5Blocks, TensorRows
from pipeline.resources import available_memory
from pipeline.train_config import LOADINGS

log = logging.getLogger(__name__)


# Rows this many robust standard deviations (interquartile range / 1.349) from their column's
# median would set the z-scoring of every row: refused. Heavy-tailed but sound simulators stay
# far below it (the largest of 10^5 Cauchy draws sits about 10^4 scales out).
OUTLIER_LIMIT = 1e6
SAMPLE_VALUES = 10**7  # values (rows x columns) that fix the medians and quartiles


class SimulationDataModule(pl.LightningDataModule):
    """Reads ``theta`` (N, D) and ``x`` (N, *x_shape), drops non-finite rows, splits train/val.

    The split is seeded by ``seed``, so every DDP rank computes the same one; each epoch's
    shuffle (seeded by ``seed`` and the epoch) gives each rank a disjoint part of it
    (:class:`pipeline.batches.EpochBatches`; Lightning's DistributedSampler is not used).

    Arguments:
        path: Simulation file written by ``pipeline simulate``.
        val_fraction: Fraction of the finite simulations held out for validation.
        batch_size: Samples per batch and per process.
        seed: Seed of the split and of the shuffles.
        task: If given, the task the file must hold.
        loading: ``"memory"``, ``"stream"`` or ``"auto"`` (see the module's docstring).
        copies: Processes on this node that each load the data (``auto`` counts them all).
        num_workers: DataLoader worker processes (reading and slicing off the main process).
    """

    def __init__(
        self,
        path: Path,
        val_fraction: float,
        batch_size: int,
        seed: int,
        task: str | None = None,
        loading: str = "auto",
        copies: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if loading not in LOADINGS:
            raise ValueError(f"loading must be one of {', '.join(LOADINGS)}, got {loading!r}")
        self.path, self.val_fraction, self.batch_size = Path(path), val_fraction, batch_size
        self.seed, self.task, self.loading = seed, task, loading
        self.copies, self.num_workers = copies, num_workers
        self.attrs: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        self.attrs = storage.read_attrs(self.path, task=self.task)
        if self.loading == "auto":
            self.loading = self._choose_loading()
        if self.loading == "stream":
            self._setup_stream()
        else:
            self._setup_memory()

    def _choose_loading(self) -> str:
        with storage.open_simulations(self.path) as f:
            size = f["theta"].nbytes + f["x"].nbytes
        fits = size * self.copies <= available_memory() // 2
        log.info(
            "%s holds %.1f MB; %s",
            self.path,
            size / 1e6,
            "loading it into memory" if fits else "too large for memory: streaming batches",
        )
        return "memory" if fits else "stream"

    def _setup_memory(self) -> None:
        sims = storage.read_simulations(self.path, task=self.task)
        finite = sims.finite
        self.num_nonfinite = int((~finite).sum())
        if self.num_nonfinite:
            log.warning(
                "excluding %d of %d simulations with NaN or inf from %s",
                self.num_nonfinite,
                len(finite),
                self.path,
            )
        theta, x = sims.theta[finite], sims.x[finite]
        num_val = int(round(self.val_fraction * len(theta)))
        num_train = len(theta) - num_val
        if "num_reference_samples" in sims.attrs:  # what `pipeline observe` records
            raise ValueError(
                f"{self.path} holds observations (`pipeline observe` wrote it), not simulations "
                "to train on: give --data the training simulations (sims/train.h5)"
            )
        if num_train < 1 or num_val < 1:
            raise ValueError(
                f"{self.path}: {len(theta)} finite simulations cannot be split into non-empty "
                f"training and validation sets with val_fraction={self.val_fraction}; "
                "simulate more"
            )
        order = np.random.default_rng(self.seed).permutation(len(theta))
        train, val = order[:num_train], order[num_train:]
        theta_train, x_train = theta[train], x[train]
        outliers = Outliers(theta_train, x_train)
        rows = np.flatnonzero(finite)[outliers.rows(theta, x)]
        outliers.refuse(self.path, [f"row {row}" for row in rows])
        theta_moments, x_moments = Moments(), Moments()
        theta_moments.add(theta_train)
        x_moments.add(x_train)
        self._moments = (*theta_moments.mean_std(), *x_moments.mean_std())
        self.train_set = TensorRows(torch.from_numpy(theta_train), torch.from_numpy(x_train))
        self.val_set = TensorRows(torch.from_numpy(theta[val]), torch.from_numpy(x[val]))
        self.num_train, self.num_val = num_train, num_val
        self._train_items, self._val_items = np.arange(num_train), np.arange(num_val)
        self._items_per_batch = self.batch_size

    def _setup_stream(self) -> None:
        num_rows = int(self.attrs["num_simulations"])
        blocks = HDF5Blocks(self.path, self.batch_size, num_rows)
        num_blocks = len(blocks)
        num_val = int(round(self.val_fraction * num_blocks))
        if num_val < 1 or num_val >= num_blocks:
            raise ValueError(
                f"{self.path}: {num_rows} simulations in {num_blocks} block(s) of batch_size "
                f"{self.batch_size} cannot be split into non-empty training and validation sets "
                f"with val_fraction={self.val_fraction}; simulate more or lower batch_size"
            )
        order = np.random.default_rng(self.seed).permutation(num_blocks)
        self._val_items, self._train_items = np.sort(order[:num_val]), order[num_val:]
        # One streamed pass: the training split's moments and the finite rows of each split.
        theta_moments, x_moments = Moments(), Moments()
        counts = {"train": 0, "val": 0}
        val_blocks = set(self._val_items.tolist())
        outliers, flagged, empty = None, [], set()
        for block in range(num_blocks):
            theta, x = blocks.read(block)
            split = "val" if block in val_blocks else "train"
            counts[split] += len(theta)
            if not len(theta):
                empty.add(block)  # every row NaN or inf: no batch to train or score on
            # The first block fixes the medians: blocks are contiguous rows of the file.
            if outliers is None and len(theta):
                outliers = Outliers(theta, x)
            if outliers is None:
                continue  # no finite row yet: counted above, nothing to scale or check
            if outliers.rows(theta, x).size:
                start = block * self.batch_size
                flagged.append(f"rows {start}-{start + self.batch_size - 1}")
            if split == "train":
                theta_moments.add(theta)
                x_moments.add(x)
        if outliers is not None:
            outliers.refuse(self.path, flagged)
        if not counts["train"] or not counts["val"]:
            raise ValueError(
                f"{self.path}: a split has no finite simulation (train {counts['train']}, "
                f"validation {counts['val']}); check the simulator for NaN"
            )
        self._train_items = np.array([b for b in self._train_items if b not in empty])
        self._val_items = np.array([b for b in self._val_items if b not in empty])
        self._moments = (*theta_moments.mean_std(), *x_moments.mean_std())
        self.num_nonfinite = num_rows - counts["train"] - counts["val"]
        if self.num_nonfinite:
            log.warning(
                "excluding %d of %d simulations with NaN or inf from %s",
                self.num_nonfinite,
                num_rows,
                self.path,
            )
        self.train_set = self.val_set = blocks
        self.num_train, self.num_val = counts["train"], counts["val"]
        self._items_per_batch = 1

    def statistics(self) -> dict[str, torch.Tensor]:
        """Means and standard deviations of the training split, for z-scoring."""
        theta_mean, theta_std, x_mean, x_std = self._moments
        # A constant feature would divide by zero: give it unit scale instead.
        return {
            "theta_mean": theta_mean,
            "theta_std": torch.where(theta_std > 0, theta_std, torch.ones_like(theta_std)),
            "x_mean": x_mean,
            "x_std": torch.where(x_std > 0, x_std, torch.ones_like(x_std)),
        }

    def constant_features(self) -> dict[str, list[int]]:
        """The features of ``theta`` and of flattened ``x`` that do not vary over the training
        split, by name: a density over one of them is a spike, whose loss falls without bound."""
        theta_mean, theta_std, x_mean, x_std = self._moments
        return {
            "theta": torch.nonzero(theta_std == 0).flatten().tolist(),
            "x": torch.nonzero(x_std.reshape(-1) == 0).flatten().tolist(),
        }

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochBatches(self._train_items, self._items_per_batch, self.seed, rank, world)
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(
            self.val_set, EpochBatches(self._val_items, self._items_per_batch, None)
        )

    def _loader(self, dataset: TensorRows | HDF5Blocks, sampler: EpochBatches) -> DataLoader:
        # batch_size=None: the sampler yields whole batches, the dataset answers with tensors.
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class Moments:
    """Running count, sum and sum of squares of rows (float64) about the first row, for means
    and deviations.

    About the first row, not zero: a constant column then sums to exactly zero, where
    ``sum_sq - n mean^2`` leaves a rounding residue (a deviation of 1e-7 for a constant 0.7 over
    1000 rows) that z-scoring would scale by 10^7 instead of leaving the column at unit scale.
    """

    def __init__(self) -> None:
        self.n, self.shift, self.sum, self.sum_sq = 0, 0.0, 0.0, 0.0

    def add(self, rows: np.ndarray) -> None:
        """Adds ``rows`` of shape ``(n, ...)``."""
        rows = rows.astype(np.float64)
        if len(rows) == 0:
            return
        if self.n == 0:
            self.shift = rows[0].copy()
        rows = rows - self.shift
        self.n += len(rows)
        self.sum = self.sum + rows.sum(0)
        self.sum_sq = self.sum_sq + (rows * rows).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased standard deviation over the rows, float32, shape ``rows[0]``."""
        offset = self.sum / self.n
        mean = self.shift + offset
        var = (self.sum_sq - self.n * offset * offset) / max(self.n - 1, 1)
        return torch.from_numpy(mean).float(), torch.from_numpy(
            np.sqrt(np.maximum(var, 0))
        ).float()


class Outliers:
    """Rows of ``theta`` or ``x`` more than :data:`OUTLIER_LIMIT` robust standard deviations
    from the medians of a sample of the data (columns with no spread are not checked)."""

    def __init__(self, theta: np.ndarray, x: np.ndarray) -> None:
        rows = max(SAMPLE_VALUES // self._width(theta, x), 1)
        sample = self._columns(theta[:rows], x[:rows])
        low, self.median, high = np.quantile(sample, [0.25, 0.5, 0.75], axis=0)
        self.scale = (high - low) / 1.349
        self.checked = self.scale > 0

    @staticmethod
    def _width(theta: np.ndarray, x: np.ndarray) -> int:
        return int(np.prod(theta.shape[1:]) + np.prod(x.shape[1:]))

    @staticmethod
    def _columns(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        columns = [theta.reshape(len(theta), -1), x.reshape(len(x), -1)]
        return np.concatenate(columns, axis=1).astype(np.float64)

    def rows(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Indices of the rows of ``(theta, x)`` beyond the limit (in blocks: bounded memory)."""
        step = max(2**20 // self._width(theta, x), 1)
        median, scale = self.median[self.checked], self.scale[self.checked]
        found = []
        for start in range(0, len(theta), step):
            block = self._columns(theta[start : start + step], x[start : start + step])
            distance = np.abs(block[:, self.checked] - median) / scale
            found.append(start + np.flatnonzero((distance > OUTLIER_LIMIT).any(axis=1)))
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    @staticmethod
    def refuse(path: Path, where: list[str]) -> None:
        """Raises ValueError naming ``where`` (row descriptions) unless it is empty."""
        if not where:
            return
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        raise ValueError(
            f"{path}: {shown} hold values more than "
            f"{OUTLIER_LIMIT:.0e} robust standard deviations from their column's median; they "
            "would set the scaling of every input and the network would learn nothing from the "
            "rest. Fix the simulator where it returns such values, or transform x in the task "
            "(e.g. a logarithm) so that its values share one scale"
        )

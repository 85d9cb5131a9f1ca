"""Training data: a LightningDataModule over a simulation file, with a seeded train/val split."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline import storage

log = logging.getLogger(__name__)


class SimulationDataModule(pl.LightningDataModule):
    """Loads ``theta`` (N, D) and ``x`` (N, *x_shape), drops non-finite rows, splits train/val.

    The split is a permutation seeded by ``seed``, so every DDP rank computes the same one; the
    DistributedSampler that Lightning inserts then gives each rank a disjoint part of it.

    Arguments:
        path: Simulation file written by ``pipeline simulate``.
        val_fraction: Fraction of the finite simulations held out for validation.
        batch_size: Samples per batch and per process.
        seed: Seed of the split.
        task: If given, the task the file must hold.
    """

    def __init__(
        self,
        path: Path,
        val_fraction: float,
        batch_size: int,
        seed: int,
        task: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.path, self.val_fraction, self.batch_size = Path(path), val_fraction, batch_size
        self.seed, self.task = seed, task
        self.attrs: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
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
        if num_train < 1 or num_val < 1:
            raise ValueError(
                f"{self.path}: {len(theta)} finite simulations cannot be split into non-empty "
                f"training and validation sets with val_fraction={self.val_fraction}; "
                "simulate more"
            )
        order = np.random.default_rng(self.seed).permutation(len(theta))
        train, val = order[:num_train], order[num_train:]
        self.attrs = sims.attrs
        self.theta_train, self.x_train = torch.from_numpy(theta[train]), torch.from_numpy(x[train])
        self.train_set = TensorDataset(self.theta_train, self.x_train)
        self.val_set = TensorDataset(torch.from_numpy(theta[val]), torch.from_numpy(x[val]))

    def statistics(self) -> dict[str, torch.Tensor]:
        """Means and standard deviations of the training split, for z-scoring."""
        # A constant feature would divide by zero: give it unit scale instead.
        theta_std = self.theta_train.std(0)
        x_std = self.x_train.std(0)
        return {
            "theta_mean": self.theta_train.mean(0),
            "theta_std": torch.where(theta_std > 0, theta_std, torch.ones_like(theta_std)),
            "x_mean": self.x_train.mean(0),
            "x_std": torch.where(x_std > 0, x_std, torch.ones_like(x_std)),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

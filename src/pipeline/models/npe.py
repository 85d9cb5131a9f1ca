"""Neural posterior estimation as a LightningModule: minimise -log q(theta | x) (NPE) or the
flow-matching loss of a vector field (FMPE)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch

from pipeline.models.posterior import NeuralPosterior
from pipeline.train_config import LR_SCHEDULES


class Proposal(Protocol):
    """A proposal's density relative to the prior, ``ratio`` (rows (n, D) -> (n,)), and its
    smallest value inside the prior, ``smallest``
    (:class:`pipeline.rounds.proposal.StackProposal`)."""

    smallest: float

    def ratio(self, theta: torch.Tensor) -> torch.Tensor: ...


class NPE(pl.LightningModule):
    """Trains a :class:`NeuralPosterior` by maximum likelihood on ``(theta, x)`` pairs.

    ``train_loss`` is the members' mean loss (negative log-likelihood for NPE, flow matching for
    FMPE); ``val_loss`` (which early stopping and checkpointing watch) is
    :meth:`NeuralPosterior.validation_loss`: the mixture's for NPE. Both add the terms of
    ``proposal`` and ``calibration`` where set, so that the objective watched is the one trained
    (its value is then not comparable with a run's without them).

    Arguments:
        posterior: The estimator (standardisation, embedding, flow).
        learning_rate: Adam's step size.
        weight_decay: AdamW's decoupled weight decay.
        lr_schedule: One of :data:`LR_SCHEDULES`.
        lr_patience: Epochs without validation improvement before ``plateau`` halves the step.
        max_epochs: The horizon of ``cosine``.
        compile: Whether to compile the posterior's losses with ``torch.compile``.
        seed: Seed of FMPE's draws of times and noise, and of the draws that normalise over
            ``proposal`` (with the step, batch and rank).
        proposal: The proposal the pairs were drawn from where it is not the prior (NPE in
            rounds): the loss adds ``log E_q[w]`` (:mod:`pipeline.rounds.proposal`), by
            ``proposal_draws`` draws per pair for ``proposal_rows`` pairs of each batch.
        calibration: Weight of the penalty on over-confidence
            (:meth:`NeuralPosterior.member_overconfidence`) added to the loss, by
            ``calibration_draws`` draws per pair for ``calibration_rows`` pairs of each batch;
            0: none.
    """

    def __init__(
        self,
        posterior: NeuralPosterior,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "plateau",
        lr_patience: int = 5,
        max_epochs: int = 200,
        compile: bool = False,
        seed: int = 0,
        proposal: Proposal | None = None,
        proposal_draws: int = 16,
        proposal_rows: int = 64,
        calibration: float = 0.0,
        calibration_draws: int = 8,
        calibration_rows: int = 64,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        self.posterior = posterior
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.lr_schedule, self.lr_patience, self.max_epochs = lr_schedule, lr_patience, max_epochs
        self._plateau_loss: float | None = None  # set by a checkpoint this run resumes from
        self.seed = seed
        self.proposal, self.proposal_draws = proposal, proposal_draws
        self.proposal_rows = proposal_rows
        self.calibration, self.calibration_draws = calibration, calibration_draws
        self.calibration_rows = calibration_rows
        # Compiled callables share the posterior's parameters; the state dict is unchanged.
        self._member_loss = posterior.member_loss
        self._validation_loss = posterior.validation_loss
        if compile:
            self._member_loss = torch.compile(posterior.member_loss)
            self._validation_loss = torch.compile(posterior.validation_loss)

    def _generator(self, *key: int) -> torch.Generator | None:
        """FMPE's draws of times and noise, from ``(seed, *key)`` alone: a resumed run and
        every validation epoch see the same draws. NPE draws nothing."""
        if self.posterior.spec.method == "npe":
            return None
        seed = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    @contextlib.contextmanager
    def _seeded(self, *key: int) -> Iterator[None]:
        """torch's global generators seeded from ``(seed, *key)`` inside, restored after: the
        flows draw from them, and a resumed run must see the same draws."""
        seed = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            yield

    def _common_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, index: int
    ) -> torch.Tensor:
        theta, x = batch
        # The normaliser's and the calibration penalty's draws cost far more than the loss
        # itself (an autoregressive flow draws in D passes, and each draw's density is one more
        # pass), so they are estimated on the batch's first rows: batches are shuffled, so these
        # are a random subset with the full batch's expectation.
        rows = x[: self.proposal_rows]
        if stage == "train":
            # Members learn side by side, each by its own loss (a deep ensemble), not the
            # mixture's: that keeps them diverse. For one member the two are the same.
            generator = self._generator(0, self.global_step, self.global_rank)
            loss = self._member_loss(theta, x, generator).mean()
            if self.proposal is not None:
                with self._seeded(0, self.global_step, self.global_rank):
                    normaliser = self.posterior.member_log_normaliser(
                        rows, self.proposal.ratio, self.proposal_draws, self.proposal.smallest
                    )
                loss = loss + normaliser.mean()
        else:
            generator = self._generator(1, index, self.global_rank)
            loss = self._validation_loss(theta, x, generator).mean()
            if self.proposal is not None:
                with self._seeded(1, index, self.global_rank):
                    normaliser = self.posterior.log_normaliser(
                        rows, self.proposal.ratio, self.proposal_draws, self.proposal.smallest
                    )
                loss = loss + normaliser.mean()
        if self.calibration > 0:
            key = (2, self.global_step) if stage == "train" else (3, index)
            pairs = theta[: self.calibration_rows], x[: self.calibration_rows]
            with self._seeded(*key, self.global_rank):
                penalty = self.posterior.member_overconfidence(*pairs, self.calibration_draws)
            loss = loss + self.calibration * penalty.mean()
        # sync_dist averages over DDP ranks; every rank must call it or the job hangs.
        self.log(
            f"{stage}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(theta),
        )
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        return self._common_step(batch, "train", index)

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], index: int
    ) -> torch.Tensor:
        return self._common_step(batch, "val", index)

    # Lightning writes an epoch's checkpoint before the plateau scheduler steps on that epoch's
    # validation loss, and a run resumed from it starts the next epoch without that step: its
    # learning rate would then halve at other epochs than the uninterrupted run's. The
    # checkpoint keeps the loss, and a resumed run takes the step before its first epoch.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loss = self.trainer.callback_metrics.get("val_loss")
        checkpoint["plateau_loss"] = None if loss is None else float(loss)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._plateau_loss = checkpoint.get("plateau_loss")

    def on_train_start(self) -> None:
        loss, self._plateau_loss = self._plateau_loss, None
        if loss is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                config.scheduler.step(loss)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        if self.lr_schedule == "constant":
            return {"optimizer": optimizer}
        if self.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=self.max_epochs
            )
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=self.lr_patience
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"},
        }

"""Neural posterior estimation (NPE) as a LightningModule: minimise -log q(theta | x)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from pipeline.models.posterior import NeuralPosterior


class NPE(pl.LightningModule):
    """Trains a :class:`NeuralPosterior` by maximum likelihood on ``(theta, x)`` pairs.

    ``train_loss`` is the members' mean negative log-likelihood; ``val_loss`` (which early
    stopping and checkpointing watch) is the posterior's, the mixture of the members.

    Arguments:
        posterior: The estimator (standardisation, embedding, flow).
        learning_rate: Adam's step size.
        weight_decay: AdamW's decoupled weight decay.
        lr_patience: Epochs without validation improvement before the learning rate is halved.
    """

    def __init__(
        self,
        posterior: NeuralPosterior,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        lr_patience: int = 5,
    ) -> None:
        super().__init__()
        self.posterior = posterior
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.lr_patience = lr_patience

    def _common_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        theta, x = batch
        if stage == "train":
            # Members learn side by side, each by its own likelihood (a deep ensemble), not
            # the mixture's: that keeps them diverse. For one member the two are the same.
            loss = -self.posterior.member_log_prob(theta, x).mean()
        else:
            loss = -self.posterior.log_prob(theta, x).mean()
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

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=self.lr_patience
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"},
        }

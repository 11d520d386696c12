"""A minimal classification LightningModule base shared by the digits and open_clip settings."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassifierModule"]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training on ``(x, y)`` batches, ``val_acc`` logging, Adam(W) over trainable parameters.

    Subclasses define ``forward(x) -> logits`` and set ``self.lr``.
    """

    lr: float = 1e-3
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy of one batch."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):  # noqa: D102
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: D102
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):  # noqa: D102
        return self.optimizer_cls([p for p in self.parameters() if p.requires_grad], lr=self.lr)

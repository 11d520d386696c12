"""The post-hoc re-fit: a short stage-1 fine-tune with the guard, when stage 2 alone cannot stay within tolerance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.evaluation import default_loss
from lightning_mergeguard.parameters import ParameterSelection
from lightning_mergeguard.protection.stage2 import Stage2
from lightning_mergeguard.validation import check_int, check_number

__all__ = ["Refit", "run_refit"]


@dataclass(frozen=True)
class Refit:
    """The re-fit ``protect_checkpoint`` runs when stage 2 alone keeps no step within the tolerance.

    A short stage-1 fine-tune of the model on the owner's data with
    :class:`~lightning_mergeguard.MergeGuardCallback` (whose stage 2 then runs at its end).

    Args:
        steps: Optimizer steps (``--refit-steps``).
        alpha: Stage-1 strength (``--alpha``).
        lr: AdamW learning rate of the fine-tune (``--refit-lr``).

    Example:
        >>> Refit(steps=100).alpha
        0.01
    """

    steps: int = 50
    alpha: float = 0.01
    lr: float = 1e-4

    def __post_init__(self) -> None:
        try:
            check_int(self.steps, "refit steps", low=1, want="an integer >= 1 (refit=None turns the re-fit off)")
            check_number(self.alpha, "alpha", want="a number >= 0")
            if not check_number(self.lr, "refit lr", want="a number > 0") > 0:
                raise ValueError(f"refit lr must be a number > 0, got {self.lr!r}")
        except ValueError as err:
            raise ConfigError(str(err)) from None


def run_refit(
    settings: Refit,
    module: nn.Module,
    base: Path,
    train: Dataset,
    metric: Callable[[nn.Module], float],
    batch_size: int,
    strategy: Stage2,
    tolerance: float,
    seed: int,
    progress: bool,
    include: Sequence[str] | None,
) -> None:
    """Stage-1 re-fit of ``module`` with the guard (whose stage 2 runs at the end), scored by ``metric``."""
    steps, alpha, lr = settings.steps, settings.alpha, settings.lr
    import lightning.pytorch as pl

    from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback
    from lightning_mergeguard.models.trainer import quiet_trainer

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.net(*args, **kwargs)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return default_loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    def score(m: nn.Module, batch: Any) -> tuple[float, int]:  # the guard rail scores the whole held-out set once
        return metric(module) / 100.0, 1

    pl.seed_everything(seed, verbose=False)
    guard = MergeGuardCallback(
        alpha=alpha,
        parameters=ParameterSelection(include=include),
        reference=str(base),
        stage2=strategy,
        tolerance=tolerance,
        score_fn=score,
        eval_batches=1,
        progress=progress,
    )
    loader = DataLoader(train, batch_size=batch_size, shuffle=True)
    quiet_trainer(max_steps=steps, callbacks=[guard], limit_val_batches=1, num_sanity_val_steps=0).fit(
        Wrapped(), loader, DataLoader([0])
    )

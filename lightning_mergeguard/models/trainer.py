"""One quiet Trainer for the demos, the benchmarks and the tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["default_precision", "quiet_trainer"]


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A one-device Trainer (a GPU when there is one) without checkpoints, logger, progress bar or model summary.

    Any Trainer argument can be overridden (``max_epochs``, ``callbacks``, ``logger``, ``accelerator``...).

    Example:
        >>> trainer = quiet_trainer(max_epochs=1, accelerator="cpu")
        >>> trainer.max_epochs, trainer.logger is None
        (1, True)
    """
    settings: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(overrides)
    return pl.Trainer(**settings)


def default_precision() -> str:
    """``"bf16-mixed"`` where a CUDA device supports bfloat16, ``"32-true"`` elsewhere (the examples' default).

    Example:
        >>> default_precision() in ("bf16-mixed", "32-true")
        True
    """
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"

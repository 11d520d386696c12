"""QuantizationWatermark: train a watermark that exists in full precision only (see ownership.watermark)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_mergeguard.callbacks._common import refuse_adapters, refuse_sharded
from lightning_mergeguard.ownership.watermark import int8_codes, is_quantized
from lightning_mergeguard.parameters import name_patterns


class QuantizationWatermark(Callback):
    """Keep every weight within its int8 rounding interval while the model learns a watermark.

    Add :func:`watermark_rows` to the training data and this callback to the Trainer: after every training batch
    the quantized weights are projected back into ``[(q0 - margin) s, (q0 + margin) s]`` (scale-setting entries and
    unquantized tensors are held at their values at fit start), so ``int8_roundtrip(trained) == int8_roundtrip
    (original)`` and the watermark exists only in full precision.

    Args:
        margin: Half-width of the allowed interval, in int8 steps (``< 0.5``).
        exclude: Regexes of ``>=2``-D tensors not quantized (held fixed like the 1-D ones).
        granularity: Absmax scale per ``"row"`` (per output channel, the common weight scheme) or per
            ``"tensor"``; verification must use the same.

    Example:
        >>> wm = QuantizationWatermark(margin=0.45)
        >>> # trainer = pl.Trainer(callbacks=[wm]); trainer.fit(model, rows_with_watermark)
    """

    def __init__(self, margin: float = 0.45, exclude: str | Sequence[str] = (), granularity: str = "row") -> None:
        if not 0 < margin < 0.5:
            raise ValueError(f"margin must be in (0, 0.5) so int8 rounding is unchanged, got {margin}")
        if granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
        self.granularity = granularity
        self.margin = float(margin)
        self.exclude = name_patterns(exclude, "exclude") or []
        self._bounds: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._fixed: dict[str, Tensor] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "QuantizationWatermark")
        refuse_adapters(pl_module, "QuantizationWatermark")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bounds.clear()
        self._fixed.clear()
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if not p.requires_grad:
                    continue
                if is_quantized(name, p, self.exclude):
                    q0, s = int8_codes(p, self.granularity)
                    self._bounds[name] = (q0.to(torch.int8), s, (q0.abs() == 127))
                else:
                    self._fixed[name] = p.detach().clone()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.project_(pl_module)

    @torch.no_grad()
    def project_(self, module: nn.Module) -> None:
        """Project ``module``'s weights into their intervals (idempotent).

        Args:
            module: The model being trained (its weights are changed in place).
        """
        params = dict(module.named_parameters())
        for name, (q0, s, pinned) in self._bounds.items():
            p = params[name]
            flat = p.view(p.shape[0], -1)
            center = q0.to(p.dtype) * s
            flat.copy_(
                torch.where(pinned, center, torch.clamp(flat, center - self.margin * s, center + self.margin * s))
            )
        for name, value in self._fixed.items():
            params[name].copy_(value)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "granularity": self.granularity}

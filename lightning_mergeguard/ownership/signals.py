"""Ownership signals as callables for :class:`~lightning_mergeguard.MergeProbe`: ``signal(module) -> rate``."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_mergeguard.ownership.fingerprint import FingerprintSecret, verify_fingerprint
from lightning_mergeguard.ownership.watermark import Watermark, verify_watermark

__all__ = ["FingerprintSignal", "WatermarkSignal"]


class FingerprintSignal:
    """Fingerprint success rate of the (merged) model; logged by the probe as ``.../fingerprint_success``.

    Args:
        secret: The owner's fingerprint secret (never logged).
        tokenizer: The model's tokenizer.
        max_new_tokens: Greedy decoding budget per key.

    Example:
        >>> from lightning_mergeguard.ownership import make_fingerprint
        >>> FingerprintSignal(make_fingerprint(), tokenizer=None).name
        'fingerprint_success'
    """

    name = "fingerprint_success"

    def __init__(self, secret: FingerprintSecret, tokenizer: Any, max_new_tokens: int = 30) -> None:
        if not isinstance(secret, FingerprintSecret):
            raise TypeError(f"secret must be a FingerprintSecret, got {type(secret).__name__}")
        self.secret = secret
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def __call__(self, module: nn.Module) -> float:
        """Success rate in ``[0, 1]``."""
        return verify_fingerprint(module, self.tokenizer, self.secret, self.max_new_tokens)

    def __repr__(self) -> str:
        return f"FingerprintSignal({self.secret!r})"


class WatermarkSignal:
    """Quantization-watermark success rate (full precision, or after int8 rounding with ``int8=True``).

    Logged as ``.../watermark_success`` (``.../watermark_int8_success`` with ``int8=True``). ``granularity`` must be
    the int8 scheme the watermark was trained with (:class:`~lightning_mergeguard.QuantizationWatermark`).

    Args:
        watermark: The owner's watermark (never logged).
        tokenizer: The model's tokenizer.
        int8: Score the model rounded to int8 instead of in full precision.
        max_new_tokens: Greedy decoding budget per trigger.
        granularity: The int8 scheme the watermark was trained with (``"row"`` or ``"tensor"``).

    Raises:
        TypeError: A ``watermark`` that is not a :class:`~lightning_mergeguard.ownership.Watermark`.
        ValueError: An unknown ``granularity``.

    Example:
        >>> from lightning_mergeguard.ownership import make_watermark
        >>> WatermarkSignal(make_watermark(), tokenizer=None, int8=True).name
        'watermark_int8_success'
    """

    def __init__(
        self,
        watermark: Watermark,
        tokenizer: Any,
        int8: bool = False,
        max_new_tokens: int = 24,
        granularity: str = "row",
    ) -> None:
        if not isinstance(watermark, Watermark):
            raise TypeError(f"watermark must be a Watermark, got {type(watermark).__name__}")
        if granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be 'row' or 'tensor' (as trained), got {granularity!r}")
        self.granularity = granularity
        self.watermark = watermark
        self.tokenizer = tokenizer
        self.int8 = int8
        self.max_new_tokens = max_new_tokens
        self.name = "watermark_int8_success" if int8 else "watermark_success"

    def __call__(self, module: nn.Module) -> float:
        """Success rate in ``[0, 1]``."""
        return verify_watermark(
            module, self.tokenizer, self.watermark, self.int8, self.max_new_tokens, granularity=self.granularity
        )

    def __repr__(self) -> str:
        return f"WatermarkSignal({self.watermark!r}, int8={self.int8})"

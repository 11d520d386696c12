"""Lightning callbacks: protection, merge monitoring, and the quantization watermark's int8-interval constraint."""

from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback
from lightning_mergeguard.callbacks.merge_probe import MergeProbe
from lightning_mergeguard.callbacks.quantization_watermark import QuantizationWatermark

__all__ = ["MergeGuardCallback", "MergeProbe", "QuantizationWatermark"]

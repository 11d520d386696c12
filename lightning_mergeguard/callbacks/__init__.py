"""Lightning callbacks: protection (:class:`MergeGuardCallback`) and monitoring (:class:`MergeProbe`)."""

from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback
from lightning_mergeguard.callbacks.merge_probe import MergeProbe

__all__ = ["MergeGuardCallback", "MergeProbe"]

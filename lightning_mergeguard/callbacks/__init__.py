"""Lightning callbacks: protection (:class:`MergeGuardCallback`) and monitoring (:class:`MergeProbe`)."""

from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback

__all__ = ["MergeGuardCallback"]

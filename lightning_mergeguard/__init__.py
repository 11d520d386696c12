"""Lightning MergeGuard."""

from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback

__all__ = ["MergeGuardCallback"]

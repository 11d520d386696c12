"""Lightning MergeGuard: fine-tune with protection against unauthorized model merging, and watch merge resistance.

Example:
    >>> from lightning_mergeguard import MergeGuardCallback, MergeProbe
    >>> callbacks = [MergeGuardCallback(alpha=0.01)]  # add MergeProbe(donors=...) to monitor merges
"""

from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback
from lightning_mergeguard.callbacks.merge_probe import MergeProbe
from lightning_mergeguard.merging import MergeConfig, merge

__all__ = ["MergeConfig", "MergeGuardCallback", "MergeProbe", "merge"]
__version__ = "0.1.0"

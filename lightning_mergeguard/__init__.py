"""Lightning MergeGuard: fine-tune with protection against unauthorized model merging, and watch merge resistance.

The package imports lazily: ``lightning_mergeguard.merging`` (the merge engine and the ``mergeguard-merge``
command) needs only torch, safetensors and PyYAML; Lightning is imported when a callback is first used.

Example:
    >>> from lightning_mergeguard import MergeGuardCallback, MergeProbe
    >>> callbacks = [MergeGuardCallback(alpha=0.01)]  # add MergeProbe(donors=...) to monitor merges
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Donors",
    "KeepWeights",
    "MergeConfig",
    "MergeGuardCallback",
    "MergeNeighbourhood",
    "MergeProbe",
    "Negation",
    "ParameterSelection",
    "ProbeSchedule",
    "QuantizationWatermark",
    "ReferenceWeights",
    "Release",
    "ScaleAdversarial",
    "Stage2",
    "merge",
]
__version__ = "0.1.0"

_LAZY = {
    "Donors": "lightning_mergeguard.donors",
    "ParameterSelection": "lightning_mergeguard.parameters",
    "ProbeSchedule": "lightning_mergeguard.callbacks.probe_schedule",
    "Release": "lightning_mergeguard.protection.release.settings",
    "MergeGuardCallback": "lightning_mergeguard.callbacks.merge_guard",
    "MergeProbe": "lightning_mergeguard.callbacks.merge_probe",
    "QuantizationWatermark": "lightning_mergeguard.callbacks.quantization_watermark",
    "MergeConfig": "lightning_mergeguard.merging.config",
    "merge": "lightning_mergeguard.merging.engine",
    "KeepWeights": "lightning_mergeguard.protection.stage2",
    "MergeNeighbourhood": "lightning_mergeguard.protection.stage2",
    "Negation": "lightning_mergeguard.protection.stage2",
    "ScaleAdversarial": "lightning_mergeguard.protection.stage2",
    "Stage2": "lightning_mergeguard.protection.stage2",
    "ReferenceWeights": "lightning_mergeguard.reference",
}

if TYPE_CHECKING:
    from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback
    from lightning_mergeguard.callbacks.merge_probe import MergeProbe
    from lightning_mergeguard.callbacks.probe_schedule import ProbeSchedule
    from lightning_mergeguard.callbacks.quantization_watermark import QuantizationWatermark
    from lightning_mergeguard.donors import Donors
    from lightning_mergeguard.merging.config import MergeConfig
    from lightning_mergeguard.merging.engine import merge
    from lightning_mergeguard.parameters import ParameterSelection
    from lightning_mergeguard.protection.release.settings import Release
    from lightning_mergeguard.protection.stage2 import (
        KeepWeights,
        MergeNeighbourhood,
        Negation,
        ScaleAdversarial,
        Stage2,
    )
    from lightning_mergeguard.reference import ReferenceWeights


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_mergeguard' has no attribute {name!r}")

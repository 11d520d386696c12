"""Proof of ownership, with p-values under stated nulls.

A secret key in the released weights (white-box test), instructional fingerprints for LLMs and trigger sets for
classifiers (black-box tests), a quantization watermark, and the verdict that combines them.
"""

from lightning_mergeguard.ownership.alignment import align_to_base
from lightning_mergeguard.ownership.fingerprint import (
    FingerprintSecret,
    fingerprint_rows,
    fingerprint_test,
    make_fingerprint,
    verify_fingerprint,
)
from lightning_mergeguard.ownership.signals import FingerprintSignal, WatermarkSignal
from lightning_mergeguard.ownership.trigger_set import TriggerSet, TriggerTest
from lightning_mergeguard.ownership.verify import OwnershipVerdict, verify_ownership
from lightning_mergeguard.ownership.watermark import (
    Watermark,
    int8_roundtrip,
    int8_scales,
    make_watermark,
    verify_watermark,
    watermark_rows,
)
from lightning_mergeguard.ownership.weight_key import KeyTestResult, WeightKey, embed_weight_key, weight_key_test

__all__ = [
    "FingerprintSecret",
    "FingerprintSignal",
    "KeyTestResult",
    "OwnershipVerdict",
    "TriggerSet",
    "TriggerTest",
    "Watermark",
    "WatermarkSignal",
    "WeightKey",
    "align_to_base",
    "embed_weight_key",
    "fingerprint_rows",
    "fingerprint_test",
    "int8_roundtrip",
    "int8_scales",
    "make_fingerprint",
    "make_watermark",
    "verify_fingerprint",
    "verify_ownership",
    "verify_watermark",
    "watermark_rows",
    "weight_key_test",
]

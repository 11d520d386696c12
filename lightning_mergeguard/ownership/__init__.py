"""Ownership signals: instructional fingerprints and quantization watermarks, and their verification."""

from lightning_mergeguard.ownership.fingerprint import (
    FingerprintSecret,
    fingerprint_rows,
    make_fingerprint,
    verify_fingerprint,
)
from lightning_mergeguard.ownership.signals import FingerprintSignal, WatermarkSignal
from lightning_mergeguard.ownership.watermark import (
    Watermark,
    int8_roundtrip,
    int8_scales,
    make_watermark,
    verify_watermark,
    watermark_rows,
)

__all__ = [
    "FingerprintSecret",
    "FingerprintSignal",
    "Watermark",
    "WatermarkSignal",
    "fingerprint_rows",
    "int8_roundtrip",
    "int8_scales",
    "make_fingerprint",
    "make_watermark",
    "verify_fingerprint",
    "verify_watermark",
    "watermark_rows",
]

"""What the guard and the probe share on one trainer, found without either importing the other.

The guard owns the reference weights (``theta_pre``) when both are attached, so they are held once; the probe's
donors are partners for a stage 2 that rehearses merges. Each side finds the other by what it offers, in any order
of ``trainer.callbacks``.
"""

from __future__ import annotations

from typing import Any

from lightning_mergeguard.reference import ReferenceWeights

__all__ = ["guard_reference", "has_probe_donors", "probe_donors"]


def guard_reference(trainer: Any) -> ReferenceWeights | None:
    """The reference of a callback that offers its reference for sharing (the guard), or ``None``."""
    for cb in trainer.callbacks:
        if getattr(cb, "shares_reference", False) and isinstance(getattr(cb, "reference", None), ReferenceWeights):
            return cb.reference
    return None


def has_probe_donors(trainer: Any) -> bool:
    """Whether a callback offers donors' task vectors (a probe), loaded or to be loaded at fit start."""
    return any(hasattr(type(cb), "donor_task_vectors") for cb in trainer.callbacks)


def probe_donors(trainer: Any) -> dict[str, Any]:
    """Every donor task vector the callbacks offer, by donor name."""
    out: dict[str, Any] = {}
    for cb in trainer.callbacks:
        out.update(getattr(cb, "donor_task_vectors", None) or {})
    return out

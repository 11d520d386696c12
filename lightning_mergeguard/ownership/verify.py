"""Is a suspect model derived from the owner's release? The verdict, with p-values under stated nulls.

:func:`verify_ownership` runs the white-box key test (:mod:`~lightning_mergeguard.ownership.weight_key`) on the
suspect as published and, given the architecture, again after aligning it to ``theta_pre``
(:func:`~lightning_mergeguard.ownership.alignment.align_to_base`), so that permuting or rescaling the merge does not
hide it; the p-values of the tests run are combined by Bonferroni, which stays valid however they depend on each
other. A black-box result (:func:`~lightning_mergeguard.ownership.fingerprint.fingerprint_test`) can be added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_mergeguard.ownership.stats import bonferroni
from lightning_mergeguard.ownership.weight_key import WEIGHTINGS, WeightKey, weight_key_test
from lightning_mergeguard.validation import is_number

__all__ = ["DEFAULT_ALPHA", "OwnershipVerdict", "verify_ownership"]

DEFAULT_ALPHA = 1e-3
"""The false-positive rate a verdict of "derived" is held to, unless told otherwise."""


@dataclass(frozen=True)
class OwnershipVerdict:
    """The outcome of :func:`verify_ownership`.

    Attributes:
        derived: ``p_value <= alpha``: the suspect carries the owner's key.
        p_value: The combined p-value of every test run (Bonferroni).
        log10_p: Its ``log10``, readable below 1e-308.
        alpha: The false-positive rate the verdict is held to.
        tests: ``test name -> its result`` (p-value, statistics, estimated share of the owner's key).
        evidence: One readable line per test.
    """

    derived: bool
    p_value: float
    log10_p: float
    alpha: float
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """One sentence."""
        if self.derived:
            return f"DERIVED from the owner's release (p = 10^{self.log10_p:.1f} <= alpha = {self.alpha:g})"
        return f"no evidence of derivation at alpha = {self.alpha:g} (p = {self.p_value:.3g})"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``mergeguard-verify --json`` prints).

        Returns:
            ``verdict``, ``derived``, ``p_value``, ``log10_p``, ``alpha``, ``tests`` and ``evidence``.
        """
        return {
            "verdict": self.verdict,
            "derived": self.derived,
            "p_value": self.p_value,
            "log10_p": self.log10_p,
            "alpha": self.alpha,
            "tests": self.tests,
            "evidence": self.evidence,
        }


def _check_base(suspect: Mapping[str, Tensor], base: Mapping[str, Tensor], key: WeightKey) -> None:
    from lightning_mergeguard.merging.base_check import check_same_base, compare

    comparisons = [compare(n, suspect[n], base[n]) for n in key.names if n in suspect and n in base]
    check_same_base(comparisons, donor="the suspect", base="--base", switch="check_base=False / --no-base-check")


def _log10(p: float) -> float:
    return math.log10(p) if p > 0 else -math.inf


def verify_ownership(
    suspect: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    key: WeightKey,
    module: nn.Module | None = None,
    owner: Mapping[str, Tensor] | None = None,
    alpha: float = DEFAULT_ALPHA,
    fingerprint: Mapping[str, float] | None = None,
    check_base: bool = True,
    weighting: str = "pooled",
) -> OwnershipVerdict:
    """Test whether ``suspect`` is derived from the release that carries ``key``.

    Args:
        suspect: The suspect's state dict (names as the owner's model).
        base: ``theta_pre``.
        key: The owner's key (:func:`~lightning_mergeguard.ownership.weight_key.embed_weight_key`).
        module: A model of the architecture; given, the suspect is also tested after alignment to ``base``.
        owner: The owner's release; given, it must itself pass (else the key belongs to another model).
        alpha: The false-positive rate of the verdict.
        fingerprint: A black-box result (``{"p_value": ...}``, e.g. from
            :func:`~lightning_mergeguard.ownership.fingerprint.fingerprint_test`) to combine with.
        check_base: Refuse a suspect that is not a fine-tune of ``base`` (median weight cosine; see
            :func:`~lightning_mergeguard.merging.base_check.check_same_base`).
        weighting: How the key test combines the keyed tensors: ``"pooled"`` (the default and the recommended one)
            or ``"snr"``, measured weaker where a suspect took only some layers from the owner (see
            :func:`~lightning_mergeguard.ownership.weight_key.weight_key_test`). Choose before looking at the
            suspect: trying both and keeping the smaller p-value doubles the false-positive rate.

    Returns:
        An :class:`OwnershipVerdict`.

    Raises:
        ValueError: A bad ``alpha`` or ``weighting``; a suspect of another architecture; a key that does not match
            ``owner``.
        ForeignBaseError: A suspect that is not a fine-tune of ``base``.

    Example:
        >>> import torch
        >>> from lightning_mergeguard.ownership.weight_key import embed_weight_key
        >>> base = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
        >>> release, key = embed_weight_key({"w": base["w"] + 0.1 * torch.randn(64, 64)}, base, secret=1)
        >>> merge = {"w": (release["w"] + base["w"]) / 2}
        >>> verify_ownership(merge, base, key).derived, verify_ownership(base, base, key).derived
        (True, False)
    """
    if not is_number(alpha) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    key = key.matched_to(suspect.keys())
    if owner is not None:
        own = weight_key_test(owner, base, key)
        if own.p_value > alpha:
            raise ValueError(
                f"the key does not match the owner's model (its own p-value is {own.p_value:.3g}): another key, "
                "another base, or a model saved before the key was embedded"
            )
    # shapes and names are checked here, before anything else
    raw = weight_key_test(suspect, base, key, weighting=weighting)
    if check_base:
        _check_base(suspect, base, key)
    tests = {"white-box key": raw.as_dict()}
    if module is not None:
        from lightning_mergeguard.ownership.alignment import align_to_base

        aligned = align_to_base(suspect, base, module)
        aligned_test = weight_key_test(aligned, base, key, aligned=True, weighting=weighting)
        tests["white-box key, aligned to base"] = aligned_test.as_dict()
    if fingerprint is not None:
        tests["black-box fingerprint"] = dict(fingerprint)
    usable = [t for t in tests.values() if not math.isnan(t["p_value"])]
    p = bonferroni([t["p_value"] for t in usable])
    log10_p = min(0.0, math.log10(len(usable)) + min(t.get("log10_p", _log10(t["p_value"])) for t in usable))
    evidence = []
    for name, t in tests.items():
        if "z_dense" in t:
            evidence.append(
                f"{name}: z = {t['z_dense']:.1f} (dense) / {t['z_subspace']:.1f} (subspace), "
                f"p = 10^{t['log10_p']:.1f}; about {max(t['share_dense'], t['share_subspace']):.2f} of the owner's "
                "key present"
            )
        else:
            evidence.append(f"{name}: {t.get('hits', '?')}/{t.get('keys', '?')} keys answered, p = {t['p_value']:.3g}")
    return OwnershipVerdict(p <= alpha, p, log10_p, float(alpha), tests, evidence)

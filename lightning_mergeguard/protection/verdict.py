"""Whether a protection did what it claims, and whether its weights survive the dtype they are written in.

The callback, ``protect_module`` and ``mergeguard-protect`` end with these checks, so that an unchanged model is
never called protected and a release is never written in a dtype that overflows it or flushes it to zero.

Example:
    >>> import torch
    >>> w = {"w": torch.ones(2)}
    >>> changed = weights_changed(weights_digest(w), w)
    >>> not_protected_reason({"stage2": {"steps_used": 3}}, changed)
    'no weight changed: the written model is the unprotected fine-tune'
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.errors import NonFiniteError

__all__ = [
    "check_castable",
    "key_paragraph",
    "not_protected_reason",
    "release_card",
    "weights_changed",
    "weights_digest",
]

CAST_TOLERANCE = 1e-2
"""Largest relative change of a tensor (``||cast - w|| / ||w||``) its dtype cast may cause (bf16 rounds at 4e-3)."""


def weights_digest(state: Mapping[str, Tensor]) -> dict[str, bytes]:
    """A digest of each tensor's bytes: what :func:`weights_changed` compares with, without a copy of the model.

    Example:
        >>> weights_digest({"w": torch.ones(2)}) == weights_digest({"w": torch.ones(2)})
        True
    """
    out = {}
    for k, v in state.items():
        raw = v.detach().contiguous().reshape(-1).view(torch.uint8).cpu()  # one tensor at a time off the device
        out[k] = hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).digest()
    return out


def weights_changed(digest: Mapping[str, bytes], state: Mapping[str, Tensor]) -> bool:
    """Whether any tensor of ``state`` differs, bit for bit, from the one ``digest`` was taken of."""
    now = weights_digest({k: v for k, v in state.items() if k in digest})
    return any(now[k] != digest[k] for k in now)


def not_protected_reason(report: Mapping[str, Any], changed: bool, *, stage2_words: str = "") -> str | None:
    """Why the protection in ``report`` did nothing, or less than it claims; ``None`` when it did what it says.

    Not protected: no weight changed (but the ownership key's, if ``report["ownership_key"]``); stage 2 kept no step
    and no re-parameterisation was applied (so the release is the fine-tune, give or take a re-fit); or every merge
    in ``report["merges"]`` kept the owner's score within the tolerance (the merges measured are not stopped).

    Args:
        report: A protection report: ``steps_used`` in its ``stage2`` entry (post hoc) or at its top (the callback),
            and optionally ``refit``, ``amplify``, ``merges``, ``tolerance``.
        changed: Whether any weight changed (:func:`weights_changed`).
        stage2_words: What to change, in the entry point's words, appended to the reason for a stage 2 that kept
            no step.

    Returns:
        The reason, or ``None``.
    """
    if not changed:
        what = (
            "no weight changed but the ownership key's: merges of the written model are traceable "
            "(mergeguard-verify), not stopped"
            if report.get("ownership_key")
            else "no weight changed: the written model is the unprotected fine-tune"
        )
        return what + (f" (stage 2 kept no step: {stage2_words})" if stage2_words else "")
    amplified = bool((report.get("amplify") or {}).get("applied"))
    stage2 = report.get("stage2")
    kept = (stage2 if isinstance(stage2, Mapping) else report).get("steps_used")
    if kept == 0 and not amplified and not report.get("refit"):
        return "stage 2 kept no step within the tolerance" + (f": {stage2_words}" if stage2_words else "")
    merges = report.get("merges") or {}
    tolerance = float(report.get("tolerance", 1.0))
    if merges and all(m["protected"] >= m["unprotected"] - tolerance for m in merges.values()):
        scores = "; ".join(f"{k}: {m['unprotected']:.1f} -> {m['protected']:.1f}" for k, m in merges.items())
        return f"no merge measured lost more than the tolerance ({tolerance} points) of the owner's score ({scores})"
    return None


def check_castable(state: Mapping[str, Tensor], dtype: torch.dtype, switch: str) -> None:
    """Refuse to write ``state`` in ``dtype`` where the cast overflows a weight or loses a tensor to rounding.

    Args:
        state: The weights, in the dtype they were computed in.
        dtype: The dtype to write.
        switch: The option that picks another dtype, for the message.

    Raises:
        NonFiniteError: Naming the tensor, the dtype, what happens, and ``switch``.

    Example:
        >>> check_castable({"w": torch.tensor([1.0, 2.0**20])}, torch.float16, "dtype=")
        Traceback (most recent call last):
        ...
        lightning_mergeguard.errors.NonFiniteError: writing float16 would overflow 1 weight(s) of 'w' (largest ...
    """
    name = str(dtype).removeprefix("torch.")
    for key, t in state.items():
        if not t.is_floating_point() or t.dtype == dtype:
            continue
        w = t.detach().float()
        cast = w.to(dtype)
        over = int((~torch.isfinite(cast) & torch.isfinite(w)).sum())
        if over:
            raise NonFiniteError(
                f"writing {name} would overflow {over} weight(s) of {key!r} (largest {float(w.abs().max()):.3g}; "
                f"{name} ends at {torch.finfo(dtype).max:.3g}): write another dtype with {switch}, or a smaller amplify"
            )
        norm = float(w.norm())
        if norm > 0:
            change = float((cast.float() - w).norm()) / norm
            if change > CAST_TOLERANCE:
                raise NonFiniteError(
                    f"writing {name} would change {key!r} by {change:.3g} (relative): its smallest weights fall "
                    f"below {name}'s precision (an amplified model's divided channels, say); write another dtype with "
                    f"{switch}, or a smaller amplify"
                )


def key_paragraph(report: Mapping[str, Any]) -> list[str]:
    """Model-card lines on the embedded ownership key (what and how to test; never the key), or none.

    Example:
        >>> key_paragraph({})
        []
        >>> key_paragraph({"ownership_key": {"tensors": 4, "strength": 0.05, "requested_strength": 0.1}})[1][-60:]
        "10% to keep the own score within the guard rail's tolerance."
    """
    key = report.get("ownership_key") or {}
    if not key.get("tensors"):
        return []
    asked = key.get("requested_strength", key["strength"])
    weaker = (
        f" It was weakened from {100 * asked:g}% to keep the own score within the guard rail's tolerance."
        if asked > key["strength"]
        else ""
    )
    return [
        "",
        f"Carries a secret ownership key in {key['tensors']} weight matrices (about {100 * key['strength']:g}% of "
        "each one's fine-tuning update): the owner can test any model, a merge included, for it with "
        "`mergeguard-verify` (a p-value under the null that the model was made without this release). The key "
        f"itself is not published.{weaker}",
    ]


def deployed_sentence(stage2: Mapping[str, Any]) -> list[str]:
    """The card's line on the weight formats stage 2 kept the own score in (``deployed=``), or nothing.

    Args:
        stage2: The stage-2 part of a report (``deployed_before`` / ``deployed_after``: format -> score).

    Example:
        >>> line = deployed_sentence({"deployed_before": {"int4-g128": 91.0}, "deployed_after": {"int4-g128": 100.0}})
        >>> line[1].split(": ")[1]
        'int4-g128 91.0 -> 100.0.'
    """
    before, after = stage2.get("deployed_before") or {}, stage2.get("deployed_after") or {}
    if not before:
        return []
    scores = ", ".join(f"{f} {before[f]:.1f} -> {after.get(f, math.nan):.1f}" for f in before)
    short = stage2.get("deployed_short") or {}
    if not short:
        return ["", f"Stage 2 also held the own score in the weight formats users deploy (stage-1 weights -> "
                f"protected): {scores}."]  # fmt: skip
    return ["", f"Stage 2 also trained for the weight formats users deploy (stage-1 weights -> protected): {scores}. "
            f"**Users lose score in {', '.join(short)}**: there the protected model is more than the tolerance below "
            f"its full-precision score before stage 2."]  # fmt: skip


def release_card(report: Mapping[str, Any], who: str) -> str:
    """A model-card paragraph for a model protected by ``who``.

    It says what was done and the measured scores, or why the model is NOT protected; it names what was embedded
    and done, never a secret.

    Example:
        >>> print(release_card({"method": "keep_weights", "protected": False, "not_protected": "no weight changed",
        ...                     "score_before": 90.0, "score_after": 90.0}, "MergeGuardCallback").splitlines()[2])
        **NOT protected.** MergeGuardCallback ran on this model, and no weight changed.
    """
    lines = ["## Merge protection (lightning-mergeguard)", ""]
    scores = f"own score {report['score_before']:.1f} -> {report['score_after']:.1f} on the owner's held-out data"
    if report.get("protected") is False:
        lines += [f"**NOT protected.** {who} ran on this model, and {report['not_protected']}.", "", f"({scores}.)"]
    else:
        lines.append(f"Protected against unauthorized merging by {who} (stage 2: {report['method']}; {scores}).")
        lines += deployed_sentence(report)
    amp = report.get("amplify") or {}
    if amp.get("applied"):
        lines += [
            "",
            f"Re-parameterised with exact symmetries (power-of-two scales up to {amp['strength']:g}): the same "
            "function, but re-alignment to the base model undoes it, and these weights overflow float16 and lose "
            "their function under per-row int8 and 4-bit quantization.",
        ]
    lines += key_paragraph(report)
    return "\n".join(lines) + "\n"

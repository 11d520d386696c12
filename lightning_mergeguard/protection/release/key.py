"""The release's ownership key, embedded after stage 2 under the same guard rail.

:func:`embed_release_key` is what ``MergeGuardCallback`` and ``protect_module`` run: the key at the strength asked
for, halved while it costs more than the tolerance at full precision or in a format stage 2 was told users deploy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_mergeguard.ownership import weight_key
from lightning_mergeguard.protection.stage2.base import Stage2Context, deployed_scores

__all__ = ["embed_release_key", "key_format_checks"]


def key_format_checks(ctx: Stage2Context, stage2_report: Mapping[str, Any]) -> dict[str, Any]:
    """The ownership key's guard rail in the deployed formats, as ``embed_key_checked``'s keyword arguments.

    ``formats`` and ``format_lowest`` for :func:`~lightning_mergeguard.ownership.weight_key.embed_key_checked`
    (``{}`` when stage 2 had no ``deployed``). In a format stage 2 held (within the tolerance of the full-precision
    score it started from) the key may not take the score below that rail; in a format stage 2 left short, not more
    than the tolerance below where it left it.

    Example:
        >>> from types import SimpleNamespace
        >>> ctx = SimpleNamespace(before=100.0, tolerance=1.0)
        >>> key_format_checks(ctx, {"deployed_after": {"int4-g128": 100.0, "gguf-q4_k": 90.0}})["format_lowest"]
        {'int4-g128': 99.0, 'gguf-q4_k': 89.0}
    """
    after = stage2_report.get("deployed_after") or {}
    if not after:
        return {}
    rail = ctx.before - ctx.tolerance
    lowest = {f: rail if v >= rail else v - ctx.tolerance for f, v in after.items()}
    return {"formats": functools.partial(deployed_scores, ctx, tuple(after)), "format_lowest": lowest}


def embed_release_key(
    params: Mapping[str, Tensor],
    ctx: Stage2Context,
    stage2_report: Mapping[str, Any],
    path: str | os.PathLike[str] | None,
    strength: float,
    secret: int | None = None,
) -> dict[str, Any]:
    """Embed the ownership key in ``params`` after stage 2, under the guard rail of ``ctx``; warn on its cost.

    Args:
        params: ``name -> parameter`` to key (changed in place): the fine-tuned weights.
        ctx: The stage-2 context (its reference, metric, starting score, tolerance and ``warn``).
        stage2_report: What stage 2 returned (its ``deployed_after`` sets the floors in the deployed formats).
        path: Where to write the key (``None``: not written, e.g. on ranks other than zero).
        strength: The strength asked for (``Release.key_strength``).
        secret: The sign seed (every process of a distributed run must pass the same).

    Returns:
        :func:`~lightning_mergeguard.ownership.weight_key.embed_key_checked`'s entry.
    """
    entry = weight_key.embed_key_checked(
        params,
        ctx.reference,
        path,
        ctx.metric,
        secret=secret,
        strength=strength,
        lowest=ctx.before - ctx.tolerance,
        **key_format_checks(ctx, stage2_report),
    )
    warning = weight_key.key_cost_warning(entry, ctx.before, ctx.tolerance)
    if warning is not None:
        ctx.warn(f"{ctx.who}: {warning}.")
    return entry

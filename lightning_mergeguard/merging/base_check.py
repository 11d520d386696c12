"""Is a donor a fine-tune of this base? A per-tensor distance test that works for every architecture.

A global ``||theta - theta_pre|| / ||theta_pre||`` is dominated by tensors with a large norm and little
information (RMSNorm weights initialised to 1.0, say), so a donor from another random init or another pretrained
model of the same shape can pass it. Instead, each weight matrix is compared with its own base tensor, and the
**median** of the relative distances ``||w - w_pre|| / ||w_pre||`` decides: fine-tunes move each matrix by a few
percent (rarely past 0.5 even for aggressive fine-tunes), two independent models of the same shape are about
``sqrt(2) = 1.41`` apart per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.errors import ForeignBaseError

__all__ = ["DEFAULT_MAX_RELATIVE_DISTANCE", "check_same_base", "relative_distance", "tensors_to_compare"]

DEFAULT_MAX_RELATIVE_DISTANCE = 1.0
"""Median per-matrix relative distance above which a donor is taken for a model of another base."""


def relative_distance(weights: Tensor, base: Tensor) -> float | None:
    """``||weights - base|| / ||base||`` in float32 on ``base``'s device; ``None`` when ``base`` is zero.

    Example:
        >>> relative_distance(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
        1.3333
    """
    b = base.detach().float()
    bn = float(b.norm())
    if bn == 0 or not math.isfinite(bn):
        return None
    return float((weights.detach().to(b.device, torch.float32) - b).norm()) / bn


def tensors_to_compare(shapes: dict[str, tuple[tuple[int, ...], Any]], limit: int | None = None) -> list[str]:
    """Names used by the test: floating tensors of 2 or more dimensions (all floating ones if there are none).

    With ``limit``, at most that many, spread evenly over the model (the engine's cheap pre-check).

    Example:
        >>> tensors_to_compare({"w": ((2, 2), torch.float32), "norm": ((2,), torch.float32)})
        ['w']
    """
    floating = [k for k, (_, dtype) in shapes.items() if dtype.is_floating_point]
    names = [k for k in floating if len(shapes[k][0]) >= 2] or floating
    if limit is not None and len(names) > limit:
        step = len(names) / limit
        names = [names[int(i * step)] for i in range(limit)]
    return names


def check_same_base(
    distances: Iterable[tuple[str, float | None]],
    *,
    donor: str,
    base: str = "the base model",
    max_relative_distance: float | None = DEFAULT_MAX_RELATIVE_DISTANCE,
) -> float:
    """Raise if the median of per-tensor relative distances exceeds ``max_relative_distance``.

    Args:
        distances: ``(tensor name, relative distance or None)`` pairs (``None`` for a zero base tensor).
        donor: The donor's name, for the message.
        base: How to name the base in the message.
        max_relative_distance: The bound; ``None`` turns the test off.

    Returns:
        The median relative distance (``nan`` if no tensor could be compared).

    Raises:
        ForeignBaseError: Naming the donor, the median and the farthest tensor.

    Example:
        >>> check_same_base([("a", 0.02), ("b", 0.05), ("c", 0.9)], donor="d")
        0.05
    """
    pairs = [(k, d) for k, d in distances if d is not None]
    if not pairs:
        return math.nan
    values = sorted(d for _, d in pairs)
    median = (
        values[len(values) // 2] if len(values) % 2 else 0.5 * (values[len(values) // 2 - 1] + values[len(values) // 2])
    )
    if max_relative_distance is not None and median > max_relative_distance:
        far_name, far = max(pairs, key=lambda p: p[1])
        raise ForeignBaseError(
            f"model {donor!r} is not a fine-tune of {base}: its weight matrices are a median {median:.2f}x their "
            f"own norm away from the base's (limit {max_relative_distance}; farthest {far_name!r} at {far:.2f}x). "
            "Fine-tunes of one base are usually within 0.1x; independent models of the same shape about 1.4x. "
            "Pass the right base, or turn the check off if this is intended."
        )
    return median

"""Is a donor a fine-tune of this base? A per-matrix cosine test that works for every architecture.

A distance ``||w - w_pre|| / ||w_pre||`` does not separate the two cases it must: a heavily changed fine-tune of
a small model sits further from its base (measured: 1.93x) than an independent model of the same shape (1.61x),
because both are dominated by how much was added, not by what was kept. What a fine-tune keeps is its base's
*direction*: each weight matrix ``w = w_pre + delta`` has cosine ``~ 1 / sqrt(1 + r**2)`` with ``w_pre`` for a
change of relative size ``r`` (0.46 at ``r = 1.93``, 0.1 only past ``r = 10``), while two independently
initialised or pretrained matrices of ``n`` entries have cosine ``~ N(0, 1/n)``, a few hundredths at most.

So each weight matrix is compared with its own base tensor, and the **median** of the cosines decides, together
with the median of ``z = cosine * sqrt(n)`` (about ``N(0, 1)`` for independent matrices, so small matrices are
not taken for related by chance):

- ``>= SAME_BASE_COSINE`` (0.2): a fine-tune of the base;
- ``< FOREIGN_COSINE`` (0.05), or below 0.2 with a median ``z`` under :data:`RELATED_Z` (3): another model
  (independent init, another pretrained model of the same shape, or a re-parameterised one such as a permuted
  residual stream): refused, naming the switch that turns the check off;
- in between (related beyond chance, but far): the test cannot tell, and warns instead of refusing.

Example:
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> base = torch.randn(64, 64)
    >>> round(cosine(base + 2 * torch.randn(64, 64), base), 1)  # a far fine-tune: 2x its norm moved
    0.4
    >>> abs(cosine(torch.randn(64, 64), base)) < 0.05  # an independent matrix
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.errors import ForeignBaseError

__all__ = [
    "FOREIGN_COSINE",
    "RELATED_Z",
    "SAME_BASE_COSINE",
    "BaseCheckWarning",
    "check_same_base",
    "compare",
    "cosine",
    "median_cosine",
    "tensors_to_compare",
]

SAME_BASE_COSINE = 0.2
"""Median per-matrix cosine with the base at or above which a donor is taken for a fine-tune of it."""

FOREIGN_COSINE = 0.05
"""Median per-matrix cosine below which a donor is refused as a model of another base."""

RELATED_Z = 3.0
"""Median ``cosine * sqrt(entries)`` below which the cosines are what independent matrices give by chance."""


class BaseCheckWarning(UserWarning):
    """The same-base test could not decide (median cosine between the two bounds, or nothing to compare)."""


def cosine(weights: Tensor, base: Tensor) -> float | None:
    """Cosine of the flattened tensors in float32 on ``base``'s device; ``None`` when either is zero or not finite.

    Example:
        >>> cosine(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
        0.6
    """
    b = base.detach().reshape(-1).float()
    w = weights.detach().reshape(-1).to(b.device, torch.float32)
    denom = float(w.norm()) * float(b.norm())
    if denom == 0 or not math.isfinite(denom):
        return None
    return float(torch.dot(w, b)) / denom


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


Comparison = tuple[str, "float | None", int]
"""``(tensor name, cosine with the base's tensor or None, number of entries compared)``."""


def compare(name: str, weights: Tensor, base: Tensor) -> Comparison:
    """One tensor's entry for :func:`check_same_base`."""
    return name, cosine(weights, base), base.numel()


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def median_cosine(comparisons: Iterable[Comparison]) -> float:
    """The median of the cosines that could be computed (``nan`` if none).

    Example:
        >>> median_cosine([("a", 0.9, 100), ("b", None, 100), ("c", 0.1, 100)])
        0.5
    """
    return _median([c for _, c, _ in comparisons if c is not None])


def check_same_base(
    comparisons: Iterable[Comparison],
    *,
    donor: str,
    base: str = "the base model",
    switch: str = "check_base=False",
    refuse: bool = True,
) -> float:
    """Refuse (or warn about) a donor whose weight matrices do not point the base's way.

    Args:
        comparisons: ``(tensor name, cosine with the base's tensor or None, entries)`` (see :func:`compare`;
            ``None``: a zero tensor).
        donor: The donor's name, for the message.
        base: How to name the base in the message.
        switch: The option that turns the check off, in the words of the entry point that runs it (for example
            ``"--no-base-check"`` on the command line).
        refuse: ``False`` only warns, also below :data:`FOREIGN_COSINE` (where the comparison has no base, say).

    Returns:
        The median cosine (``nan`` if no tensor could be compared).

    Raises:
        ForeignBaseError: Naming the donor, the median, the least similar tensor and ``switch``.

    Example:
        >>> check_same_base([("a", 0.98, 4096), ("b", 0.7, 4096), ("c", 0.01, 4096)], donor="d")
        0.7
    """
    triples = [(k, c, n) for k, c, n in comparisons if c is not None]
    if not triples:
        return math.nan
    median = median_cosine(triples)
    if median >= SAME_BASE_COSINE:
        return median
    z = _median([c * math.sqrt(n) for _, c, n in triples])
    low_name, low, _ = min(triples, key=lambda p: p[1])
    facts = (
        f"its weight matrices have a median cosine of {median:.3f} with {base}'s (least similar {low_name!r} at "
        f"{low:.3f}); fine-tunes keep 0.2-1.0 (0.46 for one that moved each matrix twice its norm), independent "
        "models of the same shape about 0.0"
    )
    foreign = median < FOREIGN_COSINE or z < RELATED_Z
    if foreign and refuse:
        raise ForeignBaseError(
            f"model {donor!r} is not a fine-tune of {base}: {facts}. Pass the right base, or turn the check off "
            f"with {switch} if this is intended (a re-parameterised or re-permuted model, say)"
        )
    what = "does not look like" if foreign else "may not be"
    warnings.warn(f"model {donor!r} {what} a fine-tune of {base}: {facts}", BaseCheckWarning, stacklevel=3)
    return median

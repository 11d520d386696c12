"""Arcee Fusion (mergekit ``arcee_fusion``): keep the fine-tune's changes where they matter most to the outputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_mergeguard.merging.spec import MethodSpec

__all__ = ["SPEC", "arcee_fusion"]


def _quantile(values: Tensor, q: float) -> Tensor:
    """The entry at index ``floor(q * (n - 1))`` of the sorted values (mergekit's quantile, not interpolated)."""
    flat = values.reshape(-1)
    return flat.kthvalue(int(q * (flat.numel() - 1)) + 1).values


def arcee_fusion(base: Tensor, other: Tensor) -> Tensor:
    """Take ``other``'s change where its importance is an upper outlier, the base elsewhere.

    Importance is ``|other - base|`` times the KL divergence of the two rows' softmaxes (over the last axis); the
    threshold is ``median + 1.5 * IQR`` of the importances. mergekit estimates the quartiles from a random sample of
    a million entries in larger tensors; they are exact here, so the two agree exactly up to that size.

    Example:
        >>> import torch
        >>> base = torch.zeros(1, 8)
        >>> other = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 3.0]])
        >>> arcee_fusion(base, other)
        tensor([[0., 0., 0., 0., 0., 0., 0., 3.]])
    """
    eps = 1e-8
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    importance = (other - base).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
    q1, median, q3 = (_quantile(importance, x) for x in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (other - base) * mask


SPEC = MethodSpec(
    name="arcee_fusion",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: arcee_fusion(base, tensors[0]),
    min_models=1,
    max_models=1,
    description="the fine-tune's changes where their importance (|change| x KL of the softmaxes) is an outlier",
)

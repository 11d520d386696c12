"""SCE (Wan et al., 2024, FuseChat): select high-variance entries, weight models by energy, erase minority signs.

Per tensor: keep the ``select_topk`` fraction of entries whose task vectors vary most across the models, weight each
model by its masked task vector's mean square (normalized to sum 1), elect signs (TIES "sum"), and take the
weighted mean of the agreeing entries. mergekit's ``sce``: a base model is required and models take no parameters
(the weights come from the task vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mergeguard.merging.methods.consensus import sign_consensus_mask
from lightning_mergeguard.merging.methods.sparsify import rank_window_mask
from lightning_mergeguard.merging.spec import INT8_MASK, MethodSpec, Param

__all__ = ["SPEC", "sce_merge"]


def sce_merge(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """SCE merge of one tensor.

    Args:
        base: The base model's tensor.
        tensors: The fine-tuned tensors.
        select_topk: Fraction of entries kept, ranked by the variance of the task vectors across models (of the
            entries whose variance is not zero). 1 keeps all; 0 returns the base.

    Returns:
        The merged tensor, in ``base.dtype``.

    Example:
        >>> sce_merge(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])])
        tensor([2.6667, 1.0000])
    """
    if not tensors:
        return base
    tvs = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        var = tvs.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk) if select_topk > 0 else 0
        n = var.numel()
        keep = rank_window_mask(var.abs(), n - k, n) if k > 0 else torch.zeros_like(var, dtype=torch.bool)
        tvs = tvs * keep.unsqueeze(0)
    agree = sign_consensus_mask(tvs, "sum")
    energy = tvs.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    weights = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1.0 / len(tensors))
    weights = weights.reshape(-1, *([1] * base.dim())) * agree
    merged = (tvs * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)
    return (base + merged).to(base.dtype)


SPEC = MethodSpec(
    name="sce",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: sce_merge(
        base, tensors, select_topk=float(shared["select_topk"])
    ),
    shared_params={"select_topk": Param(1.0, low=0.0, high=1.0), "int8_mask": INT8_MASK},
    model_params={},
    description="select high-variance entries, weight by energy, erase minority signs",
)

"""Reinforced Agent Merging (mergekit ``ram``, ``ramplus_tl``): average the task vectors where they overlap only.

An entry that one model alone changes (by more than ``epsilon``) keeps that change in full; an entry that several
change takes their mean. ``ramplus_tl`` also scales each model's unique changes up by ``1 + r * min(rho, alpha)``,
``rho`` being that tensor's ratio of its shared to its unique changed entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import MethodSpec, Param

__all__ = ["RAM", "RAMPLUS_TL", "ram_merge"]


def ram_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    epsilon: float = 1e-5,
    plus: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
) -> Tensor:
    """RAM (``plus=False``) or RAM+ tensor-local (``plus=True``) for one tensor.

    Args:
        base: The base model's tensor.
        tensors: The fine-tunes' tensors.
        epsilon: Changes of at most this magnitude count as none.
        plus: RAM+: scale each model's unique changes by ``1 + r * clamp(shared / unique, 0, alpha)``.
        r: RAM+'s rescaling strength.
        alpha: RAM+'s cap on the shared-to-unique ratio.

    Returns:
        The merged tensor.

    Example:
        >>> ram_merge(torch.zeros(3), [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])])
        tensor([2., 2., 0.])
    """
    if not tensors:
        return base
    tv = torch.stack([t - base for t in tensors], dim=0).reshape(len(tensors), -1)
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    tv = tv * changed
    scale: Tensor | float = 1.0
    if plus:
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
        scale = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (tv * unique * scale + tv * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape_as(base)


_EPSILON = Param(1e-5, low=0.0)

RAM = MethodSpec(
    name="ram",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: ram_merge(base, tensors, epsilon=shared["epsilon"]),
    shared_params={"epsilon": _EPSILON},
    min_models=1,
    elementwise=True,
    description="task vectors summed where one model changes an entry, averaged where several do",
)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: ram_merge(
        base, tensors, epsilon=shared["epsilon"], plus=True, r=shared["r"], alpha=shared["alpha"]
    ),
    shared_params={"r": Param(0.1), "alpha": Param(0.2), "epsilon": _EPSILON},
    min_models=1,
    description="RAM with each model's unique changes scaled up by its tensor's shared-to-unique ratio",
)

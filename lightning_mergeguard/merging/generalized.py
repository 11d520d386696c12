"""The task-vector family shared by task arithmetic, TIES, DARE and breadcrumbs.

``merged = base + lambda * combine(sparsify(w_i * tau_i))`` with ``tau_i = theta_i - base``. The method modules
(:mod:`.task_arithmetic`, :mod:`.ties`, :mod:`.dare`, :mod:`.breadcrumbs`) are thin, named front ends to
:func:`generalized_task_arithmetic`, each with mergekit's defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_mergeguard.merging.consensus import sign_consensus_mask

__all__ = ["generalized_task_arithmetic"]

Sparsifier = Callable[[Tensor, int], Tensor]


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None = None,
    consensus: Literal["sum", "count"] | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Merge one tensor of several fine-tunes through their task vectors.

    Args:
        base: The base model's tensor.
        tensors: The fine-tuned models' tensors, same shape as ``base``.
        weights: One weight per model.
        sparsify: ``f(delta, model_index) -> delta``, applied to each unweighted task vector (trim or drop).
        consensus: ``None`` (plain sum) or the TIES sign-election method.
        normalize: Divide by the sum of weights (of the agreeing models, with consensus); mergekit semantics,
            a zero divisor becomes one.
        lambda_: Scale of the combined task vector.

    Returns:
        The merged tensor, in ``base.dtype``.

    Example:
        >>> base = torch.zeros(3)
        >>> generalized_task_arithmetic(base, [torch.ones(3), -torch.ones(3)], [0.5, 0.5])
        tensor([0., 0., 0.])
    """
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        return base
    if sparsify is None and consensus is None:
        # Plain weighted sum: two buffers instead of a stack of task vectors (same sums, mergekit's order).
        mixed = torch.zeros_like(base)
        tmp = torch.empty_like(base)
        for t, w in zip(tensors, weights):
            torch.sub(t, base, out=tmp)
            mixed.add_(tmp, alpha=float(w))
        del tmp
        if normalize:
            total = sum(float(w) for w in weights)
            mixed /= total if abs(total) >= 1e-8 else 1.0
        if lambda_ != 1:
            mixed *= lambda_
        return mixed.add_(base).to(base.dtype)
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors):
        delta = t - base
        deltas[i] = sparsify(delta, i) if sparsify is not None else delta
    w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus is not None:
        mask = sign_consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)

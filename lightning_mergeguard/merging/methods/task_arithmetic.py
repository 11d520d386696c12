"""Task arithmetic (Ilharco et al., 2023): ``base + lambda * sum_i w_i * (theta_i - base)``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_mergeguard.merging.methods.generalized import generalized_task_arithmetic, task_vector_method

__all__ = ["SPEC", "task_arithmetic_merge"]


def task_arithmetic_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """Task arithmetic for one tensor, with mergekit's defaults (``normalize=False``, ``lambda=1``).

    Args:
        base: The base model's tensor.
        tensors: Fine-tuned tensors.
        weights: One weight per fine-tune.
        lambda_: Scale of the summed task vector.
        normalize: Divide the weighted sum by the sum of weights.

    Returns:
        The merged tensor.

    Example:
        >>> import torch
        >>> task_arithmetic_merge(torch.zeros(2), [torch.ones(2), 3 * torch.ones(2)], [1.0, 1.0], lambda_=0.5)
        tensor([2., 2.])
    """
    return generalized_task_arithmetic(base, tensors, weights, normalize=normalize, lambda_=lambda_)


SPEC = task_vector_method("task_arithmetic", normalize=False, description="base + lambda * sum(w_i * tau_i)")

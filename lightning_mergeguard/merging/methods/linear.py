"""Weight averaging (model soups, mergekit ``linear``): ``sum_i w_i * theta_i / sum_i w_i``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import WEIGHT, MethodSpec, flag

__all__ = ["SPEC", "linear_merge"]


def linear_merge(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """Weighted average of tensors (computed in float32, or float64 for float64 inputs).

    Args:
        tensors: The models' tensors, all the same shape.
        weights: One weight per tensor.
        normalize: Divide by the sum of weights (mergekit's default for ``linear``).

    Returns:
        The merged tensor in the first tensor's dtype.

    Raises:
        ValueError: No tensor, or as many weights as tensors not given.
        TypeError: Non-floating tensors.

    Example:
        >>> linear_merge([torch.zeros(2), torch.ones(2)], [1.0, 3.0])
        tensor([0.7500, 0.7500])
    """
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        raise ValueError("linear merge needs at least one tensor")
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merge requires floating-point tensors")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(first, dtype=dtype)
    for t, w in zip(tensors, weights):
        out.add_(t.to(dtype), alpha=float(w))
    if normalize:
        total = sum(float(w) for w in weights)
        if total == 0:
            raise ValueError("linear merge with normalize=True needs weights that do not sum to zero")
        out.div_(total)
    return out.to(first.dtype)


SPEC = MethodSpec(
    name="linear",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    # mergekit averages a base_model named by the config with the models, at the base's own weight
    merge_tensor=lambda base, tensors, params, shared, ctx: linear_merge(
        [*([base] if base is not None else []), *tensors], [p["weight"] for p in params], normalize=shared["normalize"]
    ),
    shared_params={"normalize": flag(True)},
    model_params={"weight": WEIGHT},
    needs_base=False,
    base_is_model=True,
    description="weighted average of the models' weights (and of base_model's, if the config names one)",
    elementwise=True,
)

"""Multi-SLERP (mergekit ``multislerp``): barycentric interpolation of any number of models on a hypersphere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import WEIGHT, MethodSpec, Param, flag

__all__ = ["SPEC", "multislerp"]


def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Weighted spherical mean of the models' tensors (of their task vectors when ``base`` is given).

    Each (flattened) tensor is projected to the unit sphere, the weighted mean direction is found, the tensors are
    mapped to the tangent space there, averaged, mapped back with the exponential map and scaled by the weighted
    mean of their norms, as mergekit computes it. A single model is returned as it is.

    Args:
        tensors: The models' tensors.
        weights: One weight per model.
        base: The origin of the sphere (the base model's tensor), or ``None``.
        normalize_weights: Divide the weights by their sum.
        eps: Small constant for numerical stability.

    Returns:
        The merged tensor.

    Raises:
        ValueError: When the weighted mean direction is zero for more than two models (antipodal tensors whose
            weights cancel).

    Example:
        >>> multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 1.0])
        tensor([0.7071, 0.7071])
    """
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor([float(x) for x in weights], dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if flat.shape[0] != 2:
            raise ValueError(
                "multislerp: the weighted mean direction of the tensors is zero (antipodal tensors whose weights "
                "cancel); use other weights"
            )
        out = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(stacked.shape[1:])  # linear fallback, as mergekit
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangent = unit - (unit * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    step_norm = step.norm() + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return out + base if base is not None else out


SPEC = MethodSpec(
    name="multislerp",
    # (base, tensors, model params, shared params, ctx) -> merged tensor; the base (optional) is the origin
    merge_tensor=lambda base, tensors, params, shared, ctx: multislerp(
        tensors,
        [p["weight"] for p in params],
        base,
        normalize_weights=shared["normalize_weights"],
        eps=shared["eps"],
    ),
    shared_params={"normalize_weights": flag(True), "eps": Param(1e-8, low=0.0)},
    model_params={"weight": WEIGHT},
    needs_base=False,
    min_models=1,
    description="spherical weighted mean of any number of models (of their task vectors with a base)",
)

"""NuSLERP (mergekit ``nuslerp``): spherical interpolation of two models, or of their task vectors.

Unlike :mod:`.slerp` (``t`` from the base towards one model, norms interpolated linearly), NuSLERP takes two models
with a ``weight`` each, ``t = w_1 / (w_0 + w_1)``, and applies the spherical coefficients to the unnormalized
vectors. With ``base_model`` it interpolates the two task vectors and adds the base back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import WEIGHT, MethodSpec, flag

__all__ = ["SPEC", "nuslerp", "nuslerp_merge"]


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True) -> Tensor:
    """Spherical interpolation of two tensors with unnormalized endpoints (mergekit's ``nuslerp``).

    Args:
        t: Interpolation factor (0 gives ``v0``, 1 gives ``v1``).
        v0: First tensor.
        v1: Second tensor, same shape.
        row_wise: Interpolate each column vector (along dim 0) on its own; only with ``flatten=False``.
        flatten: Interpolate the whole tensor as one vector (mergekit's default).

    Returns:
        The interpolated tensor; collinear pairs are interpolated linearly.

    Example:
        >>> nuslerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        tensor([0.7071, 0.7071])
    """
    if v0.shape != v1.shape:
        raise ValueError(f"nuslerp needs tensors of the same shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    shape = v0.shape
    dim = 0 if row_wise else -1
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(
    base: Tensor | None,
    tensors: tuple[Tensor, Tensor] | list[Tensor],
    weights: tuple[float, float] | list[float],
    *,
    row_wise: bool = False,
    flatten: bool = True,
) -> Tensor:
    """NuSLERP of two models' tensors (of their task vectors when ``base`` is given).

    Args:
        base: The base model's tensor, or ``None``.
        tensors: The two models' tensors.
        weights: Their weights; ``t = weights[1] / sum(weights)`` (0.5 when the sum is about 0).
        row_wise: See :func:`nuslerp`.
        flatten: See :func:`nuslerp`.

    Returns:
        The merged tensor.

    Example:
        >>> nuslerp_merge(None, [torch.tensor([2.0, 0.0]), torch.tensor([4.0, 0.0])], [1.0, 1.0])
        tensor([3., 0.])
    """
    if len(tensors) != 2 or len(weights) != 2:
        raise ValueError(f"nuslerp merges exactly two models, got {len(tensors)}")
    total = float(weights[0]) + float(weights[1])
    t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
    a, b = tensors
    if base is None:
        return nuslerp(t, a, b, row_wise=row_wise, flatten=flatten)
    return base + nuslerp(t, a - base, b - base, row_wise=row_wise, flatten=flatten)


SPEC = MethodSpec(
    name="nuslerp",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: nuslerp_merge(
        base,
        list(tensors),
        [p["weight"] for p in params],
        row_wise=shared["nuslerp_row_wise"],
        flatten=shared["nuslerp_flatten"],
    ),
    shared_params={"nuslerp_row_wise": flag(False), "nuslerp_flatten": flag(True)},
    model_params={"weight": WEIGHT},
    needs_base=False,
    min_models=2,
    max_models=2,
    description="spherical interpolation of two models (of their task vectors with a base)",
)

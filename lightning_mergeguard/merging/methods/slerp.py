"""Spherical linear interpolation of two models, tensor by tensor (mergekit ``slerp``)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, Param

__all__ = ["SPEC", "slerp"]


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Interpolate on the great circle between two flattened tensors.

    ``t = 0`` returns ``v0`` (the base model), ``t = 1`` returns ``v1``. Nearly collinear (or antipodal) pairs,
    ``|cos| > dot_threshold``, fall back to linear interpolation. Computed in float32 (float64 inputs stay float64).

    Args:
        t: Interpolation factor.
        v0: Base model's tensor.
        v1: Other model's tensor.
        dot_threshold: Collinearity threshold.
        eps: Norms below this count as zero.

    Returns:
        The interpolated tensor, in ``v0.dtype``.

    Raises:
        ValueError: Tensors of different shapes.

    Example:
        >>> slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        tensor([0.7071, 0.7071])
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs tensors of the same shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return v0.clone()
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        s = torch.sin(theta)
        out = (torch.sin((1 - t) * theta) / s) * a + (torch.sin(t * theta) / s) * b
    return out.reshape(v0.shape).to(v0.dtype)


SPEC = MethodSpec(
    name="slerp",
    # (base, tensors, model params, shared params, ctx) -> merged tensor; the base is the first endpoint
    merge_tensor=lambda base, tensors, params, shared, ctx: slerp(float(shared["t"]), base, tensors[0]),
    shared_params={"t": Param(REQUIRED)},
    model_params={},
    min_models=1,
    max_models=1,
    description="spherical interpolation between the base and one model",
)

"""Karcher mean (mergekit ``karcher``): the weighted Riemannian mean of the models' directions on the sphere.

Every model (the base too, when one is given) counts equally: each tensor is split into its norm and its direction,
the directions' Karcher mean is found by at most ``max_iter`` steps of Riemannian gradient descent, and the result
is that direction times the mean norm. mergekit 0.1.5's algorithm, step for step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import MethodSpec, Param

__all__ = ["SPEC", "karcher_mean"]


def karcher_mean(tensors: Sequence[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Karcher mean of tensors with equal weights.

    Args:
        tensors: The models' tensors, all the same shape.
        max_iter: Most gradient steps on the sphere.
        tol: Norms, angles and steps below this count as zero.

    Returns:
        The mean direction times the mean norm, in the first tensor's dtype (norms in float32, float64 for float64).

    Example:
        >>> karcher_mean([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])])
        tensor([1.4142, 1.4142])
    """
    if not tensors:
        raise ValueError("karcher needs at least one tensor")
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    vunits = [units[i] for i in valid]
    mean = torch.zeros_like(vunits[0])
    for w, u in zip(weights, vunits):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = vunits[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, vunits):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if float(step) < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).to(tensors[0].dtype)


SPEC = MethodSpec(
    name="karcher",
    # (base, tensors, model params, shared params, ctx) -> merged tensor; the base, if any, is one more model
    merge_tensor=lambda base, tensors, params, shared, ctx: karcher_mean(
        [*([base] if base is not None else []), *tensors], max_iter=int(shared["max_iter"]), tol=float(shared["tol"])
    ),
    shared_params={"max_iter": Param(10, kind="int", low=0), "tol": Param(1e-5, low=0.0)},
    model_params={},
    needs_base=False,
    min_models=1,
    description="Riemannian mean of the models' directions, times their mean norm",
)

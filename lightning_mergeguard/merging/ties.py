"""TIES-merging (Yadav et al., 2023): trim each task vector, elect signs, disjoint mean, scale.

Trimming is per tensor by default (mergekit, peft). ``trim_scope="model"`` trims over the whole flattened task
vector, as in the TIES reference code: the engine then computes one magnitude threshold per model in a pre-pass
and passes it in through :class:`~lightning_mergeguard.merging.spec.TensorContext`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_mergeguard.merging.generalized import generalized_task_arithmetic
from lightning_mergeguard.merging.sparsify import RescaleNorm, magnitude_prune, rescale_masked
from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, TensorContext

__all__ = ["SPEC", "threshold_prune", "ties_merge"]


def threshold_prune(tensor: Tensor, threshold: float, rescale_norm: RescaleNorm | None = None) -> Tensor:
    """Keep the entries with ``|x| >= threshold`` (whole-model trimming with a precomputed threshold).

    Example:
        >>> import torch
        >>> threshold_prune(torch.tensor([0.1, -3.0, 2.0]), 1.0)
        tensor([ 0., -3.,  2.])
    """
    return rescale_masked(tensor, tensor.abs() >= threshold, rescale_norm)


def ties_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = False,
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    """TIES merge of one tensor with mergekit's semantics.

    Args:
        base: Base tensor.
        tensors: Fine-tuned tensors.
        weights: One weight per model.
        densities: Fraction of each task vector kept by magnitude (per tensor).
        normalize: Divide by the sum of the agreeing models' weights (mergekit default ``True``).
        lambda_: Scale of the merged task vector.
        rescale: Rescale trimmed task vectors to their original L1 norm.
        thresholds: Per-model magnitude thresholds for whole-model trimming; replaces ``densities``.

    Returns:
        The merged tensor.

    Example:
        >>> import torch
        >>> ties_merge(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 2.0])], [1, 1], [1, 1])
        tensor([2., 2.])
    """
    norm: RescaleNorm | None = "l1" if rescale else None

    def trim(delta: Tensor, i: int) -> Tensor:
        if thresholds is not None:
            return threshold_prune(delta, thresholds[i], norm)
        return magnitude_prune(delta, densities[i], norm)

    return generalized_task_arithmetic(
        base, tensors, weights, sparsify=trim, consensus="sum", normalize=normalize, lambda_=lambda_
    )


def _merge(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    params: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    ctx: TensorContext,
) -> Tensor:
    assert base is not None
    return ties_merge(
        base,
        tensors,
        [p["weight"] for p in params],
        [p["density"] for p in params],
        normalize=shared["normalize"],
        lambda_=shared["lambda"],
        rescale=shared["rescale"],
        thresholds=ctx.model_thresholds if shared.get("trim_scope") == "model" else None,
    )


SPEC = MethodSpec(
    name="ties",
    merge_tensor=_merge,
    shared_params={"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False},
    model_params={"weight": REQUIRED, "density": 1.0},
    extensions={"trim_scope": "tensor"},
    description="trim by magnitude, elect sign, disjoint mean",
)

"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop both the largest outliers and the smallest entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_mergeguard.merging.generalized import generalized_task_arithmetic
from lightning_mergeguard.merging.sparsify import magnitude_outliers_prune
from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, TensorContext

__all__ = ["BREADCRUMBS", "BREADCRUMBS_TIES", "breadcrumbs_merge"]


def breadcrumbs_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> Tensor:
    """Breadcrumbs merge of one tensor (mergekit ``breadcrumbs`` / ``breadcrumbs_ties``).

    Args:
        base: Base tensor.
        tensors: Fine-tuned tensors.
        weights: One weight per model.
        densities: Fraction kept per model.
        gammas: Fraction of largest outliers removed per model (mergekit default 0.01).
        consensus: Apply TIES sign election.
        normalize: Divide by the (agreeing) weights' sum.
        lambda_: Scale of the merged task vector.
        rescale: Rescale kept entries to the original L1 norm.

    Returns:
        The merged tensor.

    Example:
        >>> import torch
        >>> breadcrumbs_merge(torch.zeros(2), [torch.ones(2)], [1.0], [1.0], [0.01])
        tensor([1., 1.])
    """

    def trim(delta: Tensor, i: int) -> Tensor:
        return magnitude_outliers_prune(delta, densities[i], gammas[i], "l1" if rescale else None)

    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sparsify=trim,
        consensus="sum" if consensus else None,
        normalize=normalize,
        lambda_=lambda_,
    )


def _make(consensus: bool):
    def _merge(
        base: Tensor | None,
        tensors: Sequence[Tensor],
        params: Sequence[Mapping[str, Any]],
        shared: Mapping[str, Any],
        ctx: TensorContext,
    ) -> Tensor:
        assert base is not None
        return breadcrumbs_merge(
            base,
            tensors,
            [p["weight"] for p in params],
            [p["density"] for p in params],
            [p["gamma"] for p in params],
            consensus=consensus,
            normalize=shared["normalize"],
            lambda_=shared["lambda"],
            rescale=shared["rescale"],
        )

    return _merge


_SHARED = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
_MODEL = {"weight": REQUIRED, "density": 1.0, "gamma": 0.01}

BREADCRUMBS = MethodSpec(
    name="breadcrumbs",
    merge_tensor=_make(False),
    shared_params=_SHARED,
    model_params=_MODEL,
    description="drop outliers and small entries, weighted sum",
)
BREADCRUMBS_TIES = MethodSpec(
    name="breadcrumbs_ties",
    merge_tensor=_make(True),
    shared_params=_SHARED,
    model_params=_MODEL,
    description="breadcrumbs trimming with TIES sign election",
)

"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop both the largest outliers and the smallest entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.merging.methods.generalized import Sparsifier, sparse_merge, task_vector_method
from lightning_mergeguard.merging.methods.sparsify import magnitude_outliers_prune
from lightning_mergeguard.merging.spec import DENSITY, GAMMA, TensorContext, flag

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
        >>> breadcrumbs_merge(torch.zeros(2), [torch.ones(2)], [1.0], [1.0], [0.01])
        tensor([1., 1.])
    """
    sparsify = _trim(densities, gammas, rescale)
    return sparse_merge(base, tensors, weights, sparsify, consensus=consensus, normalize=normalize, lambda_=lambda_)


def _trim(densities: Sequence[float], gammas: Sequence[float], rescale: bool) -> Sparsifier:
    def trim(delta: Tensor, i: int) -> Tensor:
        return magnitude_outliers_prune(delta, densities[i], gammas[i], "l1" if rescale else None)

    return trim


def _sparsifier(
    params: Sequence[Mapping[str, Any]], values: Mapping[str, Any], ctx: TensorContext, device: torch.device
) -> Sparsifier:
    return _trim([p["density"] for p in params], [p["gamma"] for p in params], values["rescale"])


def _breadcrumbs(name: str, consensus: bool, description: str):
    return task_vector_method(
        name,
        normalize=False,
        sparsifier=_sparsifier,
        consensus=consensus,
        shared={"rescale": flag(False)},
        model={"density": DENSITY, "gamma": GAMMA},
        description=description,
    )


BREADCRUMBS = _breadcrumbs("breadcrumbs", False, "drop outliers and small entries, weighted sum")
BREADCRUMBS_TIES = _breadcrumbs("breadcrumbs_ties", True, "breadcrumbs trimming with TIES sign election")

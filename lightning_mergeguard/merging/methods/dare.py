"""DARE (Yu et al., 2024): drop task-vector entries at random and rescale, then combine linearly or with TIES.

Rescaling follows mergekit by default (``rescale: true`` matches each task vector's L1 norm after the drop).
Set ``rescale_mode="density"`` for the paper's exact ``1 / density`` (an extension, not replayable in mergekit).
Randomness comes from a generator seeded per (seed, model, tensor name), so a seeded merge repeats exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.merging.methods.generalized import Sparsifier, sparse_merge, task_vector_method
from lightning_mergeguard.merging.methods.sparsify import RescaleNorm, random_prune
from lightning_mergeguard.merging.spec import DENSITY, Param, TensorContext, flag

__all__ = ["DARE_LINEAR", "DARE_TIES", "dare_merge"]


def dare_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale_norm: RescaleNorm | None = "l1",
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """DARE-linear (``consensus=False``) or DARE-TIES (``consensus=True``) for one tensor.

    Args:
        base: Base tensor.
        tensors: Fine-tuned tensors.
        weights: One weight per model.
        densities: Keep probability per model.
        consensus: Apply TIES sign election after the drop.
        normalize: Divide by the (agreeing) weights' sum; mergekit's default is ``False`` for both variants.
        lambda_: Scale of the merged task vector.
        rescale_norm: ``"l1"`` (mergekit), ``"density"`` (paper), another norm, or ``None``.
        generators: One generator per model (``None`` entries use torch's global generator).

    Returns:
        The merged tensor.

    Example:
        >>> base = torch.zeros(3)
        >>> dare_merge(base, [torch.ones(3)], [1.0], [1.0], consensus=False)
        tensor([1., 1., 1.])
    """
    gens = list(generators) if generators is not None else [None] * len(tensors)
    sparsify = _drop(densities, rescale_norm, gens)
    return sparse_merge(base, tensors, weights, sparsify, consensus=consensus, normalize=normalize, lambda_=lambda_)


def _drop(
    densities: Sequence[float], rescale_norm: RescaleNorm | None, generators: Sequence[torch.Generator | None]
) -> Sparsifier:
    def drop(delta: Tensor, i: int) -> Tensor:
        return random_prune(delta, densities[i], rescale_norm, generators[i])

    return drop


def _sparsifier(
    params: Sequence[Mapping[str, Any]], values: Mapping[str, Any], ctx: TensorContext, device: torch.device
) -> Sparsifier:
    mode = values["rescale_mode"] if values["rescale"] else None
    return _drop([p["density"] for p in params], mode, [ctx.generator(i, device) for i in range(len(params))])


def _dare(name: str, consensus: bool, description: str):
    return task_vector_method(
        name,
        normalize=False,
        sparsifier=_sparsifier,
        consensus=consensus,
        shared={"rescale": flag(True)},
        model={"density": DENSITY},
        extensions={"rescale_mode": Param("l1", kind="choice", choices=("l1", "l2", "linf", "density"))},
        randomized=True,
        description=description,
    )


DARE_LINEAR = _dare("dare_linear", False, "random drop and rescale, then weighted sum")
DARE_TIES = _dare("dare_ties", True, "random drop and rescale, then TIES sign election")

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

from lightning_mergeguard.merging.generalized import generalized_task_arithmetic
from lightning_mergeguard.merging.sparsify import RescaleNorm, random_prune
from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, TensorContext

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

    def drop(delta: Tensor, i: int) -> Tensor:
        return random_prune(delta, densities[i], rescale_norm, gens[i])

    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sparsify=drop,
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
        mode = shared.get("rescale_mode", "l1") if shared["rescale"] else None
        return dare_merge(
            base,
            tensors,
            [p["weight"] for p in params],
            [p["density"] for p in params],
            consensus=consensus,
            normalize=shared["normalize"],
            lambda_=shared["lambda"],
            rescale_norm=mode,
            generators=[ctx.generator(i, base.device) for i in range(len(tensors))],
        )

    return _merge


_SHARED = {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False}

DARE_LINEAR = MethodSpec(
    name="dare_linear",
    merge_tensor=_make(consensus=False),
    shared_params=_SHARED,
    model_params={"weight": REQUIRED, "density": 1.0},
    randomized=True,
    extensions={"rescale_mode": "l1"},
    description="random drop and rescale, then weighted sum",
)
DARE_TIES = MethodSpec(
    name="dare_ties",
    merge_tensor=_make(consensus=True),
    shared_params=_SHARED,
    model_params={"weight": REQUIRED, "density": 1.0},
    randomized=True,
    extensions={"rescale_mode": "l1"},
    description="random drop and rescale, then TIES sign election",
)

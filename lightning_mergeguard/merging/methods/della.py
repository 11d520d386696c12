"""DELLA (Deep, Bhatt et al., 2024): magnitude-ranked random drop and rescale, then TIES or a weighted sum.

``della`` elects signs and takes the disjoint mean (TIES); ``della_linear`` sums. Each model's ``density`` is its
mean keep probability and ``epsilon`` (mergekit default 0.15) spreads it by magnitude rank, see
:func:`~lightning_mergeguard.merging.methods.sparsify.della_prune`. Defaults follow mergekit: ``rescale: true`` (match
each task vector's L1 norm), ``normalize: true`` for ``della`` and ``false`` for ``della_linear``. Randomness comes
from a generator seeded per (seed, model, tensor name), so a seeded merge repeats exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.merging.methods.generalized import Sparsifier, sparse_merge, task_vector_method
from lightning_mergeguard.merging.methods.sparsify import della_prune
from lightning_mergeguard.merging.spec import DENSITY, Param, TensorContext, flag

__all__ = ["DELLA", "DELLA_LINEAR", "EPSILON", "check_della", "della_merge"]

EPSILON = Param(0.15, low=0.0, high=1.0, high_open=True)


def della_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    consensus: bool,
    normalize: bool | None = None,
    lambda_: float = 1.0,
    rescale: bool = True,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """DELLA (``consensus=True``) or DELLA-linear (``consensus=False``) for one tensor.

    Args:
        base: The base model's tensor.
        tensors: The fine-tuned models' tensors, one per model.
        weights: The models' weights, in the same order.
        densities: Mean keep probability per model.
        epsilons: Spread of the keep probability per model.
        consensus: TIES sign election after the drop.
        normalize: Divide by the (agreeing) weights' sum; ``None`` takes mergekit's default (``consensus``).
        lambda_: Scale of the merged task vector.
        rescale: Rescale each dropped task vector to its L1 norm.
        generators: The random generator of each model's drop (``None``: torch's global one).

    Returns:
        The merged tensor (the base's shape and dtype).

    Example:
        >>> della_merge(torch.zeros(3), [torch.ones(3)], [1.0], [1.0], [0.15], consensus=False)
        tensor([1., 1., 1.])
    """
    gens = list(generators) if generators is not None else [None] * len(tensors)
    sparsify = _drop(densities, epsilons, rescale, gens)
    return sparse_merge(
        base,
        tensors,
        weights,
        sparsify,
        consensus=consensus,
        normalize=consensus if normalize is None else normalize,
        lambda_=lambda_,
    )


def _drop(
    densities: Sequence[float], epsilons: Sequence[float], rescale: bool, generators: Sequence[torch.Generator | None]
) -> Sparsifier:
    def drop(delta: Tensor, i: int) -> Tensor:
        return della_prune(delta, densities[i], epsilons[i], "l1" if rescale else None, generators[i])

    return drop


def check_della(where: str, params: Mapping[str, Any]) -> None:
    """Refuse a model whose keep probabilities ``density +/- epsilon`` would leave (0, 1) (mergekit refuses too).

    Example:
        >>> check_della("models[0]", {"density": 0.1, "epsilon": 0.15})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_mergeguard.errors.ConfigError: models[0]: DELLA needs density - epsilon > 0 ... epsilon 0.15
    """
    density, epsilon = params["density"], params["epsilon"]
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ConfigError(
            f"{where}: DELLA needs density - epsilon > 0 and density + epsilon < 1, got density {density} and "
            f"epsilon {epsilon}"
        )


def _sparsifier(
    params: Sequence[Mapping[str, Any]], values: Mapping[str, Any], ctx: TensorContext, device: torch.device
) -> Sparsifier:
    gens = [ctx.generator(i, device) for i in range(len(params))]
    return _drop([p["density"] for p in params], [p["epsilon"] for p in params], values["rescale"], gens)


def _della(name: str, consensus: bool, description: str):
    return task_vector_method(
        name,
        normalize=consensus,
        sparsifier=_sparsifier,
        consensus=consensus,
        shared={"rescale": flag(True)},
        model={"density": DENSITY, "epsilon": EPSILON},
        randomized=True,
        check_params=check_della,
        description=description,
    )


DELLA = _della("della", True, "magnitude-ranked random drop and rescale, then TIES sign election")
DELLA_LINEAR = _della("della_linear", False, "magnitude-ranked random drop and rescale, then weighted sum")

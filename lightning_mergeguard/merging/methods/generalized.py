"""The task-vector family shared by task arithmetic, TIES, DARE and breadcrumbs.

``merged = base + lambda * combine(sparsify(w_i * tau_i))`` with ``tau_i = theta_i - base``. The method modules
(:mod:`.task_arithmetic`, :mod:`.ties`, :mod:`.dare`, :mod:`.breadcrumbs`) each declare a sparsifier and their
parameters; :func:`task_vector_method` turns that declaration into a :class:`~.spec.MethodSpec`, so no method
writes its own adapter from the engine's per-tensor call to :func:`generalized_task_arithmetic`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_mergeguard.merging.methods.consensus import sign_consensus_mask
from lightning_mergeguard.merging.spec import (
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    CheckFn,
    MethodSpec,
    Param,
    PrepareFn,
    TensorContext,
)

__all__ = ["SparsifierFactory", "generalized_task_arithmetic", "sparse_merge", "task_vector_method"]

Sparsifier = Callable[[Tensor, int], Tensor]
SparsifierFactory = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any], TensorContext, torch.device], Sparsifier]
"""``f(model_params, shared_params, ctx, device) -> sparsify(delta, model_index)`` for one tensor."""


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None = None,
    consensus: Literal["sum", "count"] | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Merge one tensor of several fine-tunes through their task vectors.

    Args:
        base: The base model's tensor.
        tensors: The fine-tuned models' tensors, same shape as ``base``.
        weights: One weight per model.
        sparsify: ``f(delta, model_index) -> delta``, applied to each unweighted task vector (trim or drop).
        consensus: ``None`` (plain sum) or the TIES sign-election method.
        normalize: Divide by the sum of weights (of the agreeing models, with consensus); mergekit semantics,
            a zero divisor becomes one.
        lambda_: Scale of the combined task vector.

    Returns:
        The merged tensor, in ``base.dtype``.

    Raises:
        ValueError: If ``tensors`` and ``weights`` differ in length.

    Example:
        >>> base = torch.zeros(3)
        >>> generalized_task_arithmetic(base, [torch.ones(3), -torch.ones(3)], [0.5, 0.5])
        tensor([0., 0., 0.])
    """
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        return base
    if sparsify is None and consensus is None:
        # Plain weighted sum: two buffers instead of a stack of task vectors (same sums, mergekit's order).
        mixed = torch.sub(tensors[0], base).mul_(float(weights[0]))
        tmp = torch.empty_like(base) if len(tensors) > 1 else mixed
        for t, w in zip(tensors[1:], weights[1:]):
            torch.sub(t, base, out=tmp)
            mixed.add_(tmp, alpha=float(w))
        del tmp
        if normalize:
            total = sum(float(w) for w in weights)
            mixed /= total if abs(total) >= 1e-8 else 1.0
        if lambda_ != 1:
            mixed *= lambda_
        return mixed.add_(base).to(base.dtype)
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors):
        delta = t - base
        deltas[i] = sparsify(delta, i) if sparsify is not None else delta
    w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus is not None:
        mask = sign_consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def sparse_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    sparsify: Sparsifier,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """:func:`generalized_task_arithmetic` as the sparsifying methods call it (DARE, DELLA, Breadcrumbs).

    Args:
        base: The base model's tensor.
        tensors: The fine-tuned models' tensors.
        weights: One weight per model.
        sparsify: The method's per-model sparsifier.
        consensus: TIES's sign election (``"sum"``) after sparsifying.
        normalize: Divide by the (agreeing) weights' sum.
        lambda_: Scale of the merged task vector.

    Returns:
        The merged tensor.
    """
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sparsify=sparsify,
        consensus="sum" if consensus else None,
        normalize=normalize,
        lambda_=lambda_,
    )


def task_vector_method(
    name: str,
    *,
    normalize: bool,
    sparsifier: SparsifierFactory | None = None,
    consensus: bool = False,
    shared: Mapping[str, Param] | None = None,
    model: Mapping[str, Param] | None = None,
    extensions: Mapping[str, Param] | None = None,
    randomized: bool = False,
    prepare: PrepareFn | None = None,
    check_params: CheckFn | None = None,
    description: str = "",
) -> MethodSpec:
    """Declare a method of the task-vector family: ``base + lambda * combine(sparsify(w_i * tau_i))``.

    Every such method takes ``weight`` per model and ``normalize`` (default ``normalize``), ``lambda`` and
    ``int8_mask`` shared; ``shared`` and ``model`` add the method's own parameters.

    Args:
        name: mergekit's method name.
        normalize: Default of ``normalize``.
        sparsifier: Builds the per-tensor trim/drop from the resolved parameters (``None``: no sparsification).
        consensus: TIES sign election before combining.
        shared: Extra shared parameters.
        model: Extra per-model parameters.
        extensions: Parameters beyond mergekit's.
        randomized: Whether results depend on a seed.
        prepare: Whole-model hook (see :class:`~.spec.MethodSpec`).
        check_params: Check of one model's parameters taken together (see :class:`~.spec.MethodSpec`); run on
            every tensor's resolved parameters too.
        description: One line for messages.

    Example:
        >>> spec = task_vector_method("mean_tv", normalize=True)
        >>> spec.merge_tensor(torch.zeros(2), [torch.ones(2), 3 * torch.ones(2)], [{"weight": 1}, {"weight": 1}],
        ...                   {"normalize": True, "lambda": 1.0, "int8_mask": False}, TensorContext())
        tensor([2., 2.])
    """

    def merge_tensor(
        base: Tensor | None,
        tensors: Sequence[Tensor],
        params: Sequence[Mapping[str, Any]],
        values: Mapping[str, Any],
        ctx: TensorContext,
    ) -> Tensor:
        if base is None:
            raise ValueError(f"merge_method {name!r} needs a base model")
        if check_params is not None:
            for i, p in enumerate(params):
                check_params(f"models[{i}], tensor {ctx.key!r}", p)
        trim = sparsifier(params, values, ctx, base.device) if sparsifier is not None else None
        return generalized_task_arithmetic(
            base,
            tensors,
            [p["weight"] for p in params],
            sparsify=trim,
            consensus="sum" if consensus else None,
            normalize=values["normalize"],
            lambda_=values["lambda"],
        )

    return MethodSpec(
        name=name,
        merge_tensor=merge_tensor,
        shared_params={
            "normalize": Param(normalize, kind="bool"),
            "lambda": LAMBDA,
            "int8_mask": INT8_MASK,
            **(shared or {}),
        },
        model_params={"weight": WEIGHT, **(model or {})},
        extensions=dict(extensions or {}),
        randomized=randomized,
        prepare=prepare,
        check_params=check_params,
        description=description,
        elementwise=sparsifier is None and not consensus and prepare is None,
    )

"""Sharded parameters (FSDP2 ``DTensor``): what each rank holds, and moving between a full tensor and its shard.

Under Lightning's ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2), every parameter is a ``DTensor``: each
rank holds one slice of it (``Shard(0)``: a block of rows). Elementwise maths (the stage-1 gradient, ``theta_pre +
s * tau``, task arithmetic) runs on those slices unchanged as long as ``theta_pre`` and the task vectors are
sharded the same way (:func:`shard_like`); maths that needs a whole tensor (TIES' top-k, DARE's mask) gathers one
tensor at a time (:func:`full`), and the result is written back as this rank's slice (:func:`write_full_`).

Example:
    >>> import torch
    >>> is_sharded(torch.zeros(2)), full(torch.ones(2)).tolist()
    (False, [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_mergeguard.merging.sources import WeightSource

__all__ = [
    "GatheredSource",
    "any_sharded",
    "full",
    "gather_local",
    "is_sharded",
    "local",
    "local_part",
    "mean_across_ranks",
    "shard_like",
    "sum_across_ranks",
    "write_full_",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2 or another DTensor strategy)."""
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def any_sharded(params: Mapping[str, Tensor]) -> bool:
    """Whether any tensor of ``params`` is sharded."""
    return any(is_sharded(p) for p in params.values())


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded); a view that writes through."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather when ``t`` is sharded: every rank must call it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def _local_slices(like: Tensor) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def local_part(t: Tensor, like: Tensor) -> Tensor:
    """This rank's slice of a whole tensor ``t``, as ``like`` (a sharded tensor of the same shape) is split.

    A view of ``t`` (no communication); ``t`` itself when ``like`` is not sharded.
    """
    if not is_sharded(like):
        return t
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"cannot shard a tensor of shape {tuple(t.shape)} like one of shape {tuple(like.shape)}")
    return t[_local_slices(like)]


def shard_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a whole tensor of ``like``'s shape) as a ``DTensor`` sharded as ``like``: no communication.

    Only this rank's slice is kept, on ``like``'s device in ``t``'s dtype (a copy: the whole tensor can be freed).
    A tensor that is already sharded, or a ``like`` that is not, is returned as is.

    Raises:
        ValueError: If the shapes differ.
    """
    if not is_sharded(like) or is_sharded(t):
        return t
    from torch.distributed.tensor import DTensor

    piece = local_part(t, like).to(like.to_local().device, copy=True).contiguous()
    return DTensor.from_local(
        piece, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def gather_local(piece: Tensor, like: Tensor) -> Tensor:
    """The whole tensor from every rank's ``piece`` (this rank's slice, split as ``like``): an all-gather."""
    if not is_sharded(like):
        return piece
    from torch.distributed.tensor import DTensor

    piece = piece.to(like.to_local().device)
    return DTensor.from_local(
        piece.contiguous(), like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    ).full_tensor()


@torch.no_grad()
def write_full_(p: Tensor, value: Tensor) -> None:
    """Copy a whole tensor ``value`` into ``p``: into this rank's slice when ``p`` is sharded."""
    if is_sharded(p):
        p.to_local().copy_(local_part(value, p))
    else:
        p.copy_(value)


def sum_across_ranks(value: Tensor, like: Sequence[Tensor]) -> Tensor:
    """``value`` summed over the ranks that shard ``like`` (a collective, float64); ``value`` when none is sharded.

    Reductions over a whole sharded tensor need it: ``float(dtensor.sum())`` is only this rank's partial sum.
    """
    sharded = next((t for t in like if is_sharded(t)), None)
    if sharded is None:
        return value
    out = value.detach().clone().to(sharded.to_local().device, torch.float64)
    torch.distributed.all_reduce(out, group=sharded.device_mesh.get_group())
    return out


def mean_across_ranks(value: Tensor, like: Sequence[Tensor]) -> Tensor:
    """``value`` averaged over the ranks that shard ``like`` (a collective); ``value`` when nothing is sharded.

    Decisions taken on a loss (a clip, a check) must agree across FSDP2 ranks, since every forward and backward
    pass is a collective; averaging the per-rank means of equal-sized batches also gives one process's value.
    """
    sharded = next((t for t in like if is_sharded(t)), None)
    if sharded is None:
        return value
    return sum_across_ranks(value, like) / torch.distributed.get_world_size(sharded.device_mesh.get_group())


class GatheredSource(WeightSource):
    """A source of this rank's shards, read as whole tensors: each ``get`` all-gathers one tensor.

    Every rank must read the same keys in the same order (the merge engine does, with no read-ahead for in-memory
    sources). ``like`` gives, per name, the sharded parameter whose split the shards follow.
    """

    def __init__(self, inner: WeightSource, like: Mapping[str, Tensor]) -> None:
        self.inner, self.like, self.name = inner, like, inner.name

    @override
    def keys(self) -> list[str]:
        return self.inner.keys()

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        _, dtype = self.inner.meta(key)
        return tuple(self.like[key].shape), dtype

    @override
    def get(self, key: str) -> Tensor:
        return gather_local(self.inner.get(key), self.like[key])

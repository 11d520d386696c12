"""NearSwap (mergekit ``nearswap``): take the other model's value where it is within ``t`` of the base's."""

from __future__ import annotations

from torch import Tensor

from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, Param

__all__ = ["SPEC", "nearswap"]


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """Interpolate each entry towards ``other`` by ``t / |other - base|`` (clamped to [0, 1]).

    Entries that differ by at most ``t`` become ``other``'s; the further apart, the closer to the base.

    Example:
        >>> import torch
        >>> nearswap(torch.tensor([0.0, 0.0]), torch.tensor([0.1, 2.0]), t=0.5)
        tensor([0.1000, 0.5000])
    """
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


SPEC = MethodSpec(
    name="nearswap",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: nearswap(base, tensors[0], float(shared["t"])),
    shared_params={"t": Param(REQUIRED)},
    min_models=1,
    max_models=1,
    elementwise=True,
    description="the other model's values where they are within t of the base's, interpolated beyond",
)

"""mergekit's ``passthrough``: copy one model's tensors, optionally scaled (frankenmerges, layer stacking, surgery).

With ``slices`` (:meth:`~lightning_mergeguard.merging.config.MergeConfig.slice_config`) each output slice takes
its layers from its one source, so a model can be cut, stacked or assembled from several models' layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_mergeguard.merging.spec import MethodSpec, Param, TensorContext

__all__ = ["SPEC", "passthrough_merge"]


def passthrough_merge(tensor: Tensor, scale: float | None = None) -> Tensor:
    """The tensor itself, or times ``scale`` (mergekit's optional per-model ``scale``).

    Example:
        >>> import torch
        >>> passthrough_merge(torch.ones(2), scale=0.5)
        tensor([0.5000, 0.5000])
    """
    return tensor if scale is None else tensor * scale


def _merge(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    params: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    ctx: TensorContext,
) -> Tensor:
    # One input: the base when the config names it as the model (params are [base's]), else the one model.
    inputs = [*([base] if base is not None else []), *tensors]
    return passthrough_merge(inputs[0], params[0]["scale"])


SPEC = MethodSpec(
    name="passthrough",
    merge_tensor=_merge,
    model_params={"scale": Param(None)},
    needs_base=False,
    min_models=1,
    max_models=1,
    base_is_model=True,
    elementwise=True,
    description="copy one model's tensors (optionally times scale); with slices, stack or cut layers",
)

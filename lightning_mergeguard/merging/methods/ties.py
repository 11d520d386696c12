"""TIES-merging (Yadav et al., 2023): trim each task vector, elect signs, disjoint mean, scale.

Trimming is per tensor by default (mergekit, peft). ``trim_scope="model"`` trims over the whole flattened task
vector, as in the TIES reference code: the method's ``prepare`` hook computes one magnitude threshold per model in a
pre-pass (:func:`model_thresholds`), which reaches the per-tensor merge as ``ctx.prepared``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.merging.methods.generalized import Sparsifier, generalized_task_arithmetic, task_vector_method
from lightning_mergeguard.merging.methods.sparsify import RescaleNorm, magnitude_prune, rescale_masked, select_ranks
from lightning_mergeguard.merging.sources import WeightSource, read_checked
from lightning_mergeguard.merging.spec import DENSITY, Param, TensorContext, flag

__all__ = ["SPEC", "model_thresholds", "threshold_prune", "ties_merge"]


def threshold_prune(tensor: Tensor, threshold: float, rescale_norm: RescaleNorm | None = None) -> Tensor:
    """Keep the entries with ``|x| >= threshold`` (whole-model trimming with a precomputed threshold).

    Example:
        >>> threshold_prune(torch.tensor([0.1, -3.0, 2.0]), 1.0)
        tensor([ 0., -3.,  2.])
    """
    return rescale_masked(tensor, tensor.abs() >= threshold, rescale_norm)


def _trim(densities: Sequence[float], rescale: bool, thresholds: Sequence[float] | None = None) -> Sparsifier:
    norm: RescaleNorm | None = "l1" if rescale else None

    def trim(delta: Tensor, i: int) -> Tensor:
        if thresholds is not None:
            return threshold_prune(delta, thresholds[i], norm)
        return magnitude_prune(delta, densities[i], norm)

    return trim


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
        >>> ties_merge(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 2.0])], [1, 1], [1, 1])
        tensor([2., 2.])
    """
    trim = _trim(densities, rescale, thresholds)
    return generalized_task_arithmetic(
        base, tensors, weights, sparsify=trim, consensus="sum", normalize=normalize, lambda_=lambda_
    )


def model_thresholds(
    base: WeightSource, donors: Sequence[WeightSource], densities: Sequence[float], device: torch.device | str = "cpu"
) -> list[float]:
    """Per-model magnitude thresholds for whole-model TIES trimming (the TIES reference code's ``top-k%``).

    Each donor's floating-point task-vector magnitudes are gathered into one buffer (one model at a time) and the
    ``density`` quantile is selected exactly.
    """
    out = []
    keys = [k for k in base.keys() if base.meta(k)[1].is_floating_point]
    dev = torch.device(device)
    for src, density in zip(donors, densities):
        if density >= 1:
            out.append(0.0)
            continue
        total = sum(int(torch.Size(base.meta(k)[0]).numel()) for k in keys)
        buf = torch.empty(total, dtype=torch.float32, device=dev)
        pos = 0
        for k in keys:
            b = read_checked(base, k, torch.float32, dev)
            t = read_checked(src, k, torch.float32, dev)
            n = b.numel()
            torch.sub(t.reshape(-1), b.reshape(-1), out=buf[pos : pos + n]).abs_()
            pos += n
        kth = max(1, int(density * total))
        out.append(float(select_ranks(buf, total - kth, total - kth)[0]))
        del buf
    return out


def _prepare(cfg: Any, base: WeightSource | None, donors: Sequence[WeightSource], device: torch.device) -> Any:
    if cfg.shared_params().get("trim_scope") != "model":
        return None
    if base is None:
        raise ValueError("trim_scope: model needs a base model")
    settings = [m.parameters.get("density", cfg.parameters.get("density")) for m in cfg.donors]
    if any(isinstance(d, (list, Mapping)) for d in settings):
        raise ConfigError(
            "trim_scope: model trims each model's whole task vector at one density; a gradient or filtered density "
            "varies by tensor, so give each model one number (or use trim_scope: tensor)"
        )
    return model_thresholds(base, donors, [cfg.model_params(m)["density"] for m in cfg.donors], device)


def _sparsifier(
    params: Sequence[Mapping[str, Any]], values: Mapping[str, Any], ctx: TensorContext, device: torch.device
) -> Sparsifier:
    return _trim([p["density"] for p in params], values["rescale"], ctx.prepared)


SPEC = task_vector_method(
    "ties",
    normalize=True,
    sparsifier=_sparsifier,
    consensus=True,
    shared={"rescale": flag(False)},
    model={"density": DENSITY},
    extensions={"trim_scope": Param("tensor", kind="choice", choices=("tensor", "model"))},
    prepare=_prepare,
    description="trim by magnitude, elect sign, disjoint mean",
)

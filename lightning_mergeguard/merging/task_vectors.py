"""Task vectors ``tau = theta - theta_base`` and the small algebra on them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.merging.engine import check_compatible
from lightning_mergeguard.merging.sources import open_source
from lightning_mergeguard.merging.tied import reconcile_tied_heads

__all__ = ["add_task_vector", "task_vector", "task_vector_cosine", "task_vector_cosines", "task_vector_norm"]


def task_vector(
    model: Any, base: Any, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """``model - base`` for every floating-point tensor.

    Args:
        model: Fine-tuned weights: state dict, module, safetensors file or Hugging Face directory.
        base: The base weights, in any of the same forms.
        dtype: Dtype of the result (``torch.bfloat16`` halves the memory of stored task vectors).
        device: Device of the result.

    Returns:
        The task vector as a state dict (integer buffers are left out).

    Raises:
        ValueError: If keys or shapes differ, or a tensor is not finite.

    Example:
        >>> task_vector({"w": torch.ones(2)}, {"w": torch.zeros(2)})
        {'w': tensor([1., 1.])}
    """
    m, b = open_source(model, "model"), open_source(base, "base")
    (m,) = reconcile_tied_heads(b, [m])
    check_compatible(b, [m])
    out = {}
    for k in b.keys():
        bt = b.get(k)
        if not bt.is_floating_point():
            continue
        mt = m.get(k)
        d = mt.to(device=device, dtype=torch.float32) - bt.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"tensor {k!r}: the task vector has NaN/Inf values")
        out[k] = d.to(dtype)
    return out


def add_task_vector(base: Mapping[str, Tensor], tau: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """``base + scale * tau`` (tensors missing from ``tau`` are copied from ``base``).

    Args:
        base: ``theta_pre``.
        tau: The task vector.
        scale: Its coefficient.

    Returns:
        The new state dict.

    Example:
        >>> add_task_vector({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.3)
        {'w': tensor([0.3000, 0.3000])}
    """
    out = {}
    for k, b in base.items():
        out[k] = (b + scale * tau[k].to(b.dtype)) if k in tau else b.clone()
    return out


def task_vector_norm(tau: Mapping[str, Tensor]) -> float:
    """Global L2 norm of a task vector.

    Args:
        tau: A task vector.

    Returns:
        ``sqrt(sum ||tau_k||^2)``.

    Example:
        >>> task_vector_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        5.0
    """
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tau.values())))


def task_vector_cosine(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Cosine similarity of two task vectors over their shared tensors (0.0 if either is zero).

    ``b``'s tensors are moved to the device of ``a``'s, so task vectors held on different devices (a donor on the
    CPU, the live model on a GPU) can be compared.

    Args:
        a: A task vector.
        b: Another.

    Returns:
        The cosine.

    Raises:
        ValueError: If they share no tensor.

    Example:
        >>> task_vector_cosine({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])})
        0.7071
    """
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError("task vectors share no tensors")
    device = a[keys[0]].device
    zero = {k: torch.zeros((), device=device) for k in keys}
    return task_vector_cosines({k: a[k] for k in keys}, zero, {"b": {k: b[k] for k in keys}}, device)["b"]


def task_vector_cosines(
    live: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    donors: Mapping[str, Mapping[str, Tensor]],
    device: torch.device | str,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Cosine between the task vector ``live - reference`` and each donor task vector, one tensor at a time.

    ``reduce`` sums the partial dot products and norms across processes when every tensor is one rank's shard
    (FSDP2); the result is then the cosine of the whole task vectors, on every rank.

    Every tensor is moved to ``device`` before it is combined (donors may sit on the CPU in bf16 while the model
    trains on a GPU); sums accumulate in float64 on ``device`` and are read back once. No full-model temporary.

    Example:
        >>> ref, donor = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 1.0])}
        >>> task_vector_cosines({"w": torch.tensor([1.0, 0.0])}, ref, {"d": donor}, "cpu")["d"]
        0.7071
    """
    device = torch.device(device)
    names = list(donors)
    acc = torch.zeros(len(names), 2, dtype=torch.float64, device=device)  # [dot, ||donor||^2]
    live_sq = torch.zeros((), dtype=torch.float64, device=device)
    for key, w in live.items():
        lt = w.to(device, torch.float32, non_blocking=True) - reference[key].to(
            device, torch.float32, non_blocking=True
        )
        live_sq += lt.pow(2).sum(dtype=torch.float64)
        for i, d in enumerate(names):
            dt = donors[d][key].to(device, torch.float32, non_blocking=True)
            acc[i, 0] += (lt * dt).sum(dtype=torch.float64)
            acc[i, 1] += dt.pow(2).sum(dtype=torch.float64)
    if reduce is not None:
        sums = reduce(torch.cat([acc.flatten(), live_sq.reshape(1)]))
        acc, live_sq = sums[:-1].reshape(acc.shape), sums[-1]
    denom = (acc[:, 1] * live_sq).sqrt()
    cos = torch.where(denom > 0, acc[:, 0] / denom.clamp_min(1e-300), torch.zeros_like(denom)).tolist()
    return dict(zip(names, cos))

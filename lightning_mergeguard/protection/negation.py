"""Stage 2 as the paper's summary states it: adversarial negation of a masked task vector.

``theta_hat = theta' - beta * M * tau'`` with ``tau' = theta' - theta_pre``; ``M = 0`` on the critical layers (the
``critical_fraction`` most important) and on the ``small_fraction`` smallest-magnitude entries of each other
tensor, 1 elsewhere. ``beta = 1`` resets the masked entries to the base; ``beta > 1`` flips their sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["apply_negation_", "critical_layers", "negation_mask"]


def critical_layers(scores: Mapping[str, float], fraction: float) -> list[str]:
    """The ``ceil(fraction * L)`` layers with the largest importance (at least one when ``fraction > 0``).

    Example:
        >>> critical_layers({"a": 0.1, "b": 0.5, "c": 0.0}, 0.1)
        ['b']
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"critical fraction must be in [0, 1], got {fraction}")
    k = math.ceil(fraction * len(scores)) if fraction > 0 else 0
    return sorted(scores, key=lambda name: scores[name], reverse=True)[:k]


def negation_mask(tau: Tensor, *, critical: bool, small_fraction: float) -> Tensor:
    """Mask for one tensor: all zero for a critical layer, else zero on its smallest-|tau| entries.

    Example:
        >>> negation_mask(torch.tensor([0.1, -2.0, 3.0, 0.2]), critical=False, small_fraction=0.5)
        tensor([0., 1., 1., 0.])
    """
    if critical:
        return torch.zeros_like(tau)
    if small_fraction <= 0:
        return torch.ones_like(tau)
    n = tau.numel()
    k = int(small_fraction * n)
    mask = torch.ones(n, dtype=tau.dtype, device=tau.device)
    if k > 0:
        idx = tau.abs().reshape(-1).float().topk(k, largest=False).indices
        mask[idx] = 0
    return mask.reshape(tau.shape)


@torch.no_grad()
def apply_negation_(
    params: Mapping[str, nn.Parameter],
    reference: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    beta: float,
) -> None:
    """In place: ``p -= beta * mask * (p - reference)`` for every parameter with a mask."""
    for name, mask in masks.items():
        p = params[name]
        p.sub_(beta * mask * (p - reference[name]))

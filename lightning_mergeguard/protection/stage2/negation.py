"""Stage 2 as the paper's summary states it: adversarial negation of a masked task vector.

``theta_hat = theta' - beta * M * tau'`` with ``tau' = theta' - theta_pre``; ``M = 0`` on the critical layers (the
``critical_fraction`` most important) and on the ``small_fraction`` smallest-magnitude entries of each other
tensor, 1 elsewhere. ``beta = 1`` resets the masked entries to the base; ``beta > 1`` flips their sign.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_mergeguard.merging.layers import group_layers
from lightning_mergeguard.protection.stage2.base import (
    Stage2,
    Stage2Context,
)

__all__ = ["Negation", "apply_negation_", "critical_layers", "layer_importance", "negation_mask"]


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


@torch.no_grad()
def layer_importance(
    params: Mapping[str, nn.Parameter],
    reference: Mapping[str, Tensor],
    layers: Mapping[str, list[str]],
    metric: Callable[[], float],
    *,
    progress: bool = False,
) -> tuple[float, dict[str, float]]:
    """Score each layer by ``metric(theta') - metric(theta' with that layer reset to theta_pre)``.

    The parameters are modified in place one layer at a time and restored exactly after each measurement.

    Args:
        params: Name -> live parameter.
        reference: Name -> pretrained tensor.
        layers: Layer name -> parameter names (see :func:`~lightning_mergeguard.merging.layers.group_layers`).
        metric: Evaluates the live model (higher is better), e.g. accuracy on a fixed set of validation batches.
        progress: Show a progress bar.

    Returns:
        The metric of the unmodified model, and layer -> drop.

    Example:
        >>> w = nn.Parameter(torch.tensor([2.0]))
        >>> layer_importance({"w": w}, {"w": torch.zeros(1)}, {"L": ["w"]}, lambda: float(w))
        (2.0, {'L': 2.0})
    """
    full = metric()
    scores = {}
    for layer, names in tqdm(layers.items(), desc="stage 2: layer importance", disable=not progress, leave=False):
        saved = {n: params[n].detach().clone() for n in names}
        for n in names:
            params[n].copy_(reference[n])
        try:
            scores[layer] = full - metric()
        finally:
            for n in names:
                params[n].copy_(saved[n])
    return full, scores


class Negation(Stage2):
    """The paper summary's literal stage 2: ``theta_hat = theta' - beta * M * tau'``.

    Layer importance is the score drop when one layer's task vector is removed; the ``critical_fraction`` most
    important layers and the ``small_fraction`` smallest entries of every other tensor are masked out (``M = 0``).
    If the score falls by more than the tolerance, ``beta`` is halved (up to three times), else nothing is applied.

    Args:
        beta: Negation strength (``1`` resets the masked entries to the base, ``> 1`` flips their sign).
        critical_fraction: Fraction of layers spared as critical.
        small_fraction: Fraction of smallest entries spared per tensor.
        granularity: What a "layer" is: ``"block"``, ``"module"`` or ``"tensor"``.
    """

    name = "negation"

    def __init__(
        self,
        beta: float = 1.0,
        critical_fraction: float = 0.1,
        small_fraction: float = 0.1,
        granularity: str = "block",
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        for what, frac in (("critical_fraction", critical_fraction), ("small_fraction", small_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{what} must be in [0, 1), got {frac!r}")
        if granularity not in ("block", "module", "tensor"):
            raise ValueError(f"granularity must be 'block', 'module' or 'tensor', got {granularity!r}")
        self.beta = float(beta)
        self.critical_fraction = critical_fraction
        self.small_fraction = small_fraction
        self.granularity = granularity

    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """Negate the masked task vector, halving ``beta`` until the score holds; see :meth:`Stage2.run`.

        Args:
            ctx: Where the layer importances come from (its metric) and the parameters negated against theta_pre.

        Returns:
            The score after negation, and the report (the critical layers, the ``beta`` applied, the masked share).
        """
        params, ref = ctx.params, ctx.reference
        layers = group_layers(params, self.granularity)
        _, scores = layer_importance(params, ref, layers, ctx.metric, progress=ctx.progress)
        critical = set(critical_layers(scores, self.critical_fraction))
        masks = {}
        for layer, names in layers.items():
            for n in names:
                tau = params[n].detach() - ref[n]
                masks[n] = negation_mask(tau, critical=layer in critical, small_fraction=self.small_fraction)
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in params.items()}
        tried = []
        beta, after = self.beta, ctx.before
        for beta in (self.beta / 2**i for i in range(4)):
            apply_negation_(params, ref, masks, beta)
            after = ctx.metric()
            tried.append({"beta": beta, "score": after})
            if ctx.before - after <= ctx.tolerance:
                break
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        else:
            beta, after = 0.0, ctx.before
        if beta != self.beta:
            ctx.warn(f"MergeGuardCallback: beta={self.beta} cost more than {ctx.tolerance} points; used beta={beta}.")
        return after, {"layer_scores": scores, "critical_layers": sorted(critical), "beta_used": beta, "backoff": tried}

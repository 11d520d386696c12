"""Layer importance: the drop in a metric when one layer's task vector is removed (reset to the base)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["layer_importance"]


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
        layers: Layer name -> parameter names (see :func:`~lightning_mergeguard.parameters.group_layers`).
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

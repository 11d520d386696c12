"""AdaMerging (Yang et al., ICLR 2024): task arithmetic with per-layer coefficients learned on unlabeled data.

``theta_l = theta_pre_l + sum_k lambda_{k,l} * tau_{k,l}``, with the coefficients ``lambda`` (one per task vector and
layer, clamped to ``[0, 1]``) trained by Adam to minimise the prediction entropy of the merged model on unlabeled
inputs of the tasks. mergekit has no equivalent (it needs data), so this is a function, not a YAML merge method.
The merged weights are built functionally (``torch.func.functional_call``): the module's own parameters are never
modified.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_mergeguard.evaluation import eval_mode
from lightning_mergeguard.merging.layers import group_layers

__all__ = ["adamerging", "prediction_entropy"]

EntropyFn = Callable[[Callable[..., Any], Any], Tensor]
"""``(forward, batch) -> mean entropy``; ``forward(*args, **kwargs)`` runs the module with the merged weights."""


def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits`` over the last dimension.

    Args:
        logits: ``[..., classes]``.

    Returns:
        A scalar tensor.

    Example:
        >>> round(float(prediction_entropy(torch.zeros(3, 4))), 4)  # uniform over 4 classes: log 4
        1.3863
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def adamerging(
    module: nn.Module,
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    batches: Iterable[Any],
    entropy_fn: EntropyFn,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    init: float = 0.3,
    layers: Mapping[str, list[str]] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """Learn layer-wise merge coefficients by entropy minimisation; return the merged weights and coefficients.

    Args:
        module: The architecture; its parameters named in ``base`` are replaced (functionally) by merged ones.
        base: ``theta_pre`` for the merged names.
        task_vectors: ``{model name: {tensor name: tau}}``, the same names as ``base``.
        batches: Unlabeled batches (cycled), passed to ``entropy_fn``.
        entropy_fn: ``(forward, batch) -> entropy``.
        steps: Adam steps.
        lr: Adam learning rate.
        init: Initial coefficient of every task vector and layer.
        layers: Groups of tensor names sharing one coefficient (default: one group per transformer block, see
            :func:`~lightning_mergeguard.merging.layers.group_layers`).
        progress: Show a progress bar.

    Returns:
        ``(merged state, {model: {layer: lambda}})``.

    Raises:
        ValueError: ``steps < 0`` or no task vector.
        KeyError: A task vector that lacks tensors of ``base``.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> base = {k: v.detach().clone() for k, v in net.named_parameters()}
        >>> tvs = {"a": {k: torch.randn_like(v) for k, v in base.items()}}
        >>> fn = lambda forward, x: prediction_entropy(forward(x))
        >>> merged, coef = adamerging(net, base, tvs, [torch.randn(8, 2)], fn, steps=0, init=0.5)
        >>> torch.allclose(merged["weight"], base["weight"] + 0.5 * tvs["a"]["weight"])
        True
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not task_vectors:
        raise ValueError("adamerging needs at least one task vector")
    names = list(base)
    for model, tv in task_vectors.items():
        missing = [n for n in names if n not in tv]
        if missing:
            raise KeyError(f"task vector of {model!r} lacks {len(missing)} tensors, e.g. {missing[0]!r}")
        for n in names:
            if tv[n].shape != base[n].shape:
                raise ValueError(f"{model!r}: shape of {n!r} is {tuple(tv[n].shape)}, base has {tuple(base[n].shape)}")
    groups = dict(layers) if layers is not None else group_layers(names)
    grouped = {n for g in groups.values() for n in g}
    if grouped != set(names):
        raise ValueError("layers must group exactly the names of base")
    group_of = {n: g for g, members in groups.items() for n in members}
    models = list(task_vectors)
    coef = torch.full((len(models), len(groups)), float(init), requires_grad=True)
    index = {g: i for i, g in enumerate(groups)}

    def merged_params() -> dict[str, Tensor]:
        out = {}
        for n in names:
            j = index[group_of[n]]
            w = base[n]
            for i, m in enumerate(models):
                w = w + coef[i, j] * task_vectors[m][n].to(w.dtype)
            out[n] = w
        return out

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(module, params, args, kwargs, strict=False)

    opt = torch.optim.Adam([coef], lr=lr)
    it = itertools.cycle(batches) if steps else iter(())
    with eval_mode(module):
        for _ in tqdm(range(steps), desc="AdaMerging", disable=not progress, leave=False):
            params = merged_params()
            opt.zero_grad()
            entropy_fn(forward, next(it)).backward()
            opt.step()
            with torch.no_grad():
                coef.clamp_(0.0, 1.0)
        with torch.no_grad():
            params = merged_params()
            merged = {n: t.detach() for n, t in params.items()}
    values = coef.detach()
    coefficients = {m: {g: float(values[i, index[g]]) for g in groups} for i, m in enumerate(models)}
    return merged, coefficients

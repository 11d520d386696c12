"""Stage 2 as an optimisation: keep the model good, make scaled-down copies of its task vector bad.

Every merge applies a scaled copy of the protected task vector, ``theta_pre + s * tau`` with ``s`` around the merge
coefficient (0.3 for 8-task arithmetic, 0.5 for a two-model average). This stage minimises, over the owner's data,

``L(theta) - mean_s min(L(theta_pre + s * (theta - theta_pre)), clip)``

for a few Adam steps: the owner's own loss stays low while the loss along the merge path rises until the clip.
This is the curvature-incompatibility idea of the method made operational (close to TRAP²); it needs no second
model and no change to the architecture. The gradient of the scaled term is exact:
``d/dtheta L(theta_pre + s * tau) = s * grad L`` at the scaled point, computed with in-place weight swaps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_mergeguard.evaluation import LossFn, move_batch
from lightning_mergeguard.protection._adversarial import (
    accumulate_grads_,
    backward_own_loss,
    optimising,
    reduce_grads_,
)
from lightning_mergeguard.sharding import local, mean_across_ranks, shard_like

__all__ = ["scale_adversarial_", "write_scaled_"]


@torch.no_grad()
def write_scaled_(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    live: Mapping[str, Tensor],
    scale: float,
    mask: Mapping[str, Tensor] | None = None,
) -> None:
    """In place: ``p = reference + scale * (live - reference)``, the scaled task vector every merge applies.

    ``scale=1`` (without a mask) restores ``live`` exactly. With ``mask``, the task vector is multiplied by it
    elementwise first (a DARE-style copy when the mask is a random keep mask and ``scale`` includes ``1/density``).

    Example:
        >>> p = {"w": torch.zeros(2)}
        >>> write_scaled_(p, {"w": torch.ones(2)}, {"w": torch.tensor([3.0, 5.0])}, 0.5)
        >>> p["w"]
        tensor([2., 3.])
        >>> keep = {"w": torch.tensor([1.0, 0.0])}
        >>> write_scaled_(p, {"w": torch.ones(2)}, {"w": torch.tensor([3.0, 5.0])}, 2.0, keep)
        >>> p["w"]
        tensor([5., 1.])
    """
    for n, p in params.items():
        if mask is not None:
            p.copy_(reference[n] + scale * mask[n] * (live[n] - reference[n]))
        elif scale == 1:
            p.copy_(live[n])
        else:
            p.copy_(reference[n] + scale * (live[n] - reference[n]))


def _bernoulli(like: Tensor, p: float, gen: torch.Generator) -> Tensor:
    # Drawn whole on every rank from the same generator (so FSDP2 shards draw one process's mask), then sharded.
    mask = (torch.rand(like.shape, generator=gen, device=local(like).device) < p).to(like.dtype)
    return shard_like(mask, like)


def scale_adversarial_(
    module: nn.Module,
    params: Mapping[str, nn.Parameter],
    reference: Mapping[str, Tensor],
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    steps: int = 150,
    scales: Sequence[float] = (0.2, 0.3, 0.5),
    clip: float = 5.0,
    lr: float = 1e-3,
    device: torch.device | None = None,
    grad_reduce: Callable[[Tensor], Tensor] | None = None,
    check_every: int = 0,
    check: Callable[[int], None] | None = None,
    progress: bool = False,
    drop_density: float | None = None,
    seed: int = 0,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    history: list[dict[str, float]] | None = None,
    keep_batches: Sequence[Any] = (),
) -> list[dict[str, float]]:
    """Run the optimisation in place on ``params``.

    Args:
        module: The model; it runs in eval mode (no dropout, frozen batch-norm statistics) during this stage.
        params: The parameters optimised (the others stay fixed).
        reference: Pretrained tensors for the same names.
        batches: The owner's training batches, cycled.
        loss_fn: ``(module, batch) -> loss``.
        steps: Number of Adam steps.
        scales: The merge scales ``s`` to sabotage.
        clip: Loss at a scaled copy above which it is not pushed further.
        lr: Adam learning rate.
        device: Device for batches (default: the parameters').
        grad_reduce: Mean across processes (DDP) applied to each gradient, so replicas stay identical.
        check_every: Call ``check(step)`` every this many steps (0: never); the callback uses it to keep the
            latest weights that still meet its tolerance.
        check: The function called (with the module in eval mode and the weights as they are after that step).
        progress: Show a progress bar.
        drop_density: If set, every other step sabotages DARE-style copies instead of exact ones:
            ``theta_pre + s * (m * tau) / drop_density`` with a fresh Bernoulli(``drop_density``) mask ``m`` per
            tensor, the copy that DARE merges apply (their random drop otherwise dodges the exact scaled copies).
            The gradient is exact for the drawn mask.
        seed: Seed of the masks.
        forward_context: Context entered around every forward pass (a Trainer's
            ``precision_plugin.forward_context`` for autocast); the backward runs outside it, as in training.
        history: A list to append the per-step history to (so ``check`` can read it while the loop runs).
        keep_batches: Batches whose loss joins the own term every step (behaviour to keep, e.g. a fingerprint).

    Returns:
        Per-step history: ``own_loss`` and ``scaled_loss`` (mean over scales).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not scales:
        raise ValueError("scales must not be empty")
    if drop_density is not None and not 0 < drop_density < 1:
        raise ValueError(f"drop_density must be in (0, 1) or None, got {drop_density}")
    names = list(params)
    tensors = [params[n] for n in names]
    device = device or next(iter(params.values())).device
    opt = torch.optim.Adam([params[n] for n in names], lr=lr)
    history = [] if history is None else history
    it = itertools.cycle(batches)
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = [move_batch(b, device) for b in keep_batches]
    with optimising(module, tensors):
        for step in tqdm(range(steps), desc="stage 2: scale-adversarial", disable=not progress, leave=False):
            batch = move_batch(next(it), device)
            opt.zero_grad(set_to_none=True)
            own = backward_own_loss(module, batch, keep, loss_fn, forward_context)
            with torch.no_grad():
                live = {n: params[n].detach().clone() for n in names}
            scaled_total = 0.0
            masked = drop_density is not None and step % 2 == 1
            for s in scales:
                # Exact copy theta_pre + s * tau, or (every other step with drop_density) a DARE-style copy
                # theta_pre + (s / d) * m * tau, whose gradient w.r.t. theta is (s / d) * m * grad.
                masks = {n: _bernoulli(live[n], drop_density, gen) for n in names} if masked else None
                factor = s / drop_density if masked else s
                write_scaled_(params, reference, live, factor, masks)
                with forward_context():
                    loss_s = loss_fn(module, batch)
                value = float(mean_across_ranks(loss_s.detach(), tensors))  # FSDP2 ranks must agree on the clip
                scaled_total += value
                if value >= clip:
                    continue
                factors = [masks[n] for n in names] if masks is not None else None
                accumulate_grads_(-(factor / len(scales)) * loss_s, tensors, factors)
            write_scaled_(params, reference, live, 1.0)
            reduce_grads_(tensors, grad_reduce)
            opt.step()
            own = mean_across_ranks(own, tensors)
            history.append({"own_loss": float(own), "scaled_loss": scaled_total / len(scales)})
            if check is not None and check_every > 0 and len(history) % check_every == 0:
                check(len(history))
    return history

"""What the optimising stage-2 loops share: the module set up for the optimisation, and the own-loss term."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.evaluation import LossFn, eval_mode
from lightning_mergeguard.sharding import is_sharded

__all__ = ["accumulate_grads_", "add_grads_", "backward_own_loss", "optimising", "reduce_grads_"]


@contextmanager
def optimising(module: nn.Module, tensors: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode, every other parameter frozen; on exit restore both and drop the optimised tensors' gradients."""
    frozen = [p for p in module.parameters() if p.requires_grad and all(p is not q for q in tensors)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with eval_mode(module):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in tensors:
            p.grad = None


def backward_own_loss(
    module: nn.Module,
    batch: Any,
    keep: Sequence[Any],
    loss_fn: LossFn,
    forward_context: Callable[[], AbstractContextManager[Any]],
) -> Tensor:
    """Backpropagate the owner's loss on ``batch`` plus the mean loss on the ``keep`` batches; return it."""
    with forward_context():
        own = loss_fn(module, batch)
        for b in keep:
            own = own + loss_fn(module, b) / len(keep)
    own.backward()
    return own.detach()


@torch.no_grad()
def add_grads_(
    tensors: Sequence[nn.Parameter], grads: Sequence[Tensor | None], factors: Sequence[Tensor] | None = None
) -> None:
    """Accumulate ``grads`` (times the elementwise ``factors``, if given) into the tensors' ``.grad``."""
    for i, (p, g) in enumerate(zip(tensors, grads)):
        if g is None:
            continue
        if factors is not None:
            g = g * factors[i]
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def accumulate_grads_(
    objective: Tensor, tensors: Sequence[nn.Parameter], factors: Sequence[Tensor] | None = None
) -> None:
    """Add the gradient of ``objective`` w.r.t. ``tensors`` (times the elementwise ``factors``) to their ``.grad``.

    Unsharded parameters: ``torch.autograd.grad``, which leaves DDP's hooks and other parameters alone. FSDP2
    parameters (DTensor) get no gradient from ``autograd.grad``: theirs arrives only through FSDP's post-backward
    reduce-scatter into ``.grad`` (already averaged over ranks), so the objective is backpropagated with the
    current gradients set aside, and the new ones are scaled and added to them. Every rank must call this.
    """
    if not any(is_sharded(p) for p in tensors):
        add_grads_(tensors, torch.autograd.grad(objective, tensors, allow_unused=True), factors)
        return
    saved = [p.grad for p in tensors]
    for p in tensors:
        p.grad = None
    objective.backward()
    with torch.no_grad():
        fresh = [p.grad for p in tensors]
        for p, g in zip(tensors, saved):
            p.grad = g
    add_grads_(tensors, fresh, factors)


@torch.no_grad()
def reduce_grads_(tensors: Sequence[nn.Parameter], grad_reduce: Callable[[Tensor], Tensor] | None) -> None:
    """Replace each gradient by ``grad_reduce(grad)`` (the cross-process mean under DDP); nothing without one."""
    if grad_reduce is None:
        return
    for p in tensors:
        if p.grad is not None:
            p.grad.copy_(grad_reduce(p.grad))

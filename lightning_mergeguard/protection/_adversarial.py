"""What the optimising stage-2 loops share: the module set up for the optimisation, and the own-loss term."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import Tensor, nn

from lightning_mergeguard.evaluation import LossFn

__all__ = ["backward_own_loss", "optimising"]


@contextmanager
def optimising(module: nn.Module, tensors: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode, every other parameter frozen; on exit restore both and drop the optimised tensors' gradients."""
    frozen = [p for p in module.parameters() if p.requires_grad and all(p is not q for q in tensors)]
    for p in frozen:
        p.requires_grad_(False)
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in tensors:
            p.grad = None
        module.train(was_training)


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

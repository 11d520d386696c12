"""What the optimising stage-2 loops share: the module set up for the optimisation, and the own-loss term."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_mergeguard.evaluation import LossFn, eval_mode, move_batch
from lightning_mergeguard.quantization import write_format_
from lightning_mergeguard.sharding import is_sharded, mean_across_ranks

__all__ = [
    "accumulate_grads_",
    "add_grads_",
    "adversarial_loop",
    "backward_own_loss",
    "checkpointing_in_eval",
    "optimising",
    "reduce_grads_",
]


@contextmanager
def optimising(module: nn.Module, tensors: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode, every other parameter frozen; on exit restore both and drop the optimised tensors' gradients.

    Layers with Hugging Face gradient checkpointing on stay checkpointed (see :func:`checkpointing_in_eval`).
    """
    frozen = [p for p in module.parameters() if p.requires_grad and all(p is not q for q in tensors)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with eval_mode(module), checkpointing_in_eval(module):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in tensors:
            p.grad = None


@contextmanager
def checkpointing_in_eval(module: nn.Module) -> Iterator[int]:
    """Keep the activation checkpointing the user turned on (``gradient_checkpointing_enable()``) in eval mode.

    Hugging Face layers checkpoint only in train mode, and stage 2 optimises in eval mode (no dropout): without
    this, a model that trains only thanks to checkpointing would hold every layer's activations in stage 2
    (measured on an 8-layer Llama, 4 x 256 tokens: 247 MiB of saved activations against 14 MiB in training). Each
    such layer's forward is wrapped, for the block, in PyTorch's non-reentrant checkpoint (the same values and
    gradients, recomputed in the backward pass), and forwards with grad run without the model's KV cache (a layer
    that writes it cannot be recomputed). Without grad (the guard rail's evaluations, greedy decoding included)
    everything runs as it is.

    Yields:
        The number of layers wrapped.

    Example:
        >>> with checkpointing_in_eval(nn.Linear(2, 2)) as wrapped:
        ...     wrapped
        0
    """
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    own = [layer.__dict__.get("forward") for layer in layers]  # a forward set on the instance (accelerate's hooks)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)  # an instance attribute: module hooks stay outside
    models = [m for m in module.modules() if layers and _takes_use_cache(m)]
    hooks = [m.register_forward_pre_hook(_no_cache_with_grad, with_kwargs=True) for m in models]
    try:
        yield len(layers)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _takes_use_cache(module: nn.Module) -> bool:
    """A Hugging Face model whose forward takes ``use_cache`` (its default read from ``config.use_cache``)."""
    if getattr(getattr(module, "config", None), "use_cache", None) is None:
        return False
    try:
        return "use_cache" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _no_cache_with_grad(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``use_cache=False`` for a forward with grad: a layer that writes the KV cache cannot be recomputed.

    Without grad (greedy decoding in a guard-rail check) the cache stays as the caller asked.
    """
    if not torch.is_grad_enabled():
        return None
    return args, {**kwargs, "use_cache": False}


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


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


Adversary = Callable[[int, Any, Mapping[str, Tensor]], Mapping[str, float]]
"""``(step, batch, live weights) -> history entries``: adds the adversarial gradients of one step to ``.grad``."""


def adversarial_loop(
    module: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    loss_fn: LossFn,
    adversary: Adversary,
    *,
    steps: int,
    lr: float,
    device: torch.device,
    desc: str,
    keep_batches: Sequence[Any] = (),
    grad_reduce: Callable[[Tensor], Tensor] | None = None,
    check_every: int = 0,
    check: Callable[[int], bool | None] | None = None,
    progress: bool = False,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    history: list[dict[str, float]] | None = None,
    deployed: Sequence[str] = (),
) -> list[dict[str, float]]:
    """The loop both adversarial strategies share, one Adam step per batch.

    Each step backpropagates the owner's loss (with the ``keep_batches``), snapshots the live weights, lets
    ``adversary`` add its gradients (it may write other weights into ``params``: the live ones are put back after
    it), reduces the gradients across processes, steps, records ``own_loss`` with the adversary's entries, and calls
    the guard rail's ``check`` every ``check_every`` steps (a true return stops the loop).

    With ``deployed`` weight formats (:data:`lightning_mergeguard.quantization.QUANTIZERS` names), each step also
    backpropagates the owner's loss at the whole model in one of them, in turn (every floating matrix quantized, the
    frozen ones such as embeddings too, as users deploy it), and adds that gradient to the live weights'
    (straight-through, as quantization-aware training does): the own score is kept where the owner's users run the
    model, not only at full precision.

    Returns:
        The per-step history (``history`` itself when given, so ``check`` can read it while the loop runs).
    """
    names = list(params)
    tensors = [params[n] for n in names]
    opt = torch.optim.Adam(tensors, lr=lr)
    history = [] if history is None else history
    it = itertools.cycle(batches)
    keep = [move_batch(b, device) for b in keep_batches]
    # A deployed format quantizes the whole model: the parameters stage 2 leaves alone too (held by identity, as
    # their names may differ from ``params``'), whose values are kept once.
    optimised = {id(p) for p in tensors}
    others = [p for p in module.parameters() if id(p) not in optimised] if deployed else []
    with torch.no_grad():
        kept_others = [p.detach().clone() for p in others]
    with optimising(module, tensors):
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            batch = move_batch(next(it), device)
            opt.zero_grad(set_to_none=True)
            own = backward_own_loss(module, batch, keep, loss_fn, forward_context)
            with torch.no_grad():
                live = {n: params[n].detach().clone() for n in names}
            entries: dict[str, float] = {}
            if deployed:
                targets = {**params, **{f"\0{i}": p for i, p in enumerate(others)}}
                values = {**live, **{f"\0{i}": v for i, v in enumerate(kept_others)}}
                write_format_(targets, values, deployed[step % len(deployed)])
                at_format = backward_own_loss(module, batch, keep, loss_fn, forward_context)
                entries["deployed_loss"] = float(mean_across_ranks(at_format, tensors))
                with torch.no_grad():
                    for n, target in targets.items():
                        target.copy_(values[n])
            entries.update(adversary(step, batch, live))
            with torch.no_grad():
                for n in names:
                    params[n].copy_(live[n])
            reduce_grads_(tensors, grad_reduce)
            opt.step()
            history.append({"own_loss": float(mean_across_ranks(own, tensors)), **entries})
            if check is not None and check_every > 0 and len(history) % check_every == 0 and check(len(history)):
                break  # the guard rail has what it needs
    return history

"""How the defense and the probe measure a model: a score function and a loss function over batches.

Defaults cover the common batch shapes: ``(inputs, targets)`` tuples for classifiers and
``{"input_ids", "labels", ...}`` dicts for Hugging Face causal LMs (next-token accuracy on labels != -100).
Pass your own ``score_fn(module, batch) -> (sum_of_scores, count)`` (or one number, a batch's mean) and
``loss_fn(module, batch) -> loss`` for anything else (exact-match generation, retrieval, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LossFn",
    "ScoreFn",
    "answer_exact_match",
    "default_loss",
    "default_score",
    "eval_mode",
    "evaluate",
    "rng_kept",
]

ScoreFn = Callable[[nn.Module, Any], tuple[Tensor | float, int]]  # or one number (see score_parts)
LossFn = Callable[[nn.Module, Any], Tensor]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block, then give every submodule back its own mode.

    ``module.train(was_training)`` would switch every submodule to train mode, including those the user keeps in
    eval mode during fit (a frozen BatchNorm backbone, whose running statistics would then drift). Lightning's own
    loops restore modes module by module for the same reason.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     assert not net.training
        >>> net.training, net[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def rng_kept(module: nn.Module) -> AbstractContextManager[Any]:
    """Fork the global RNGs (CPU, and the accelerators ``module`` lives on) so the block leaves them as they were.

    A callback that evaluates or merges mid-fit must not move the training run's random stream: iterating a
    DataLoader draws a seed from it, and a dropout or sampling score function draws more.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> state = torch.random.get_rng_state()
        >>> with rng_kept(net):
        ...     _ = torch.rand(3)
        >>> torch.equal(state, torch.random.get_rng_state())
        True
    """
    kinds = {p.device.type for p in module.parameters()} - {"cpu", "meta"}
    if not kinds:
        return torch.random.fork_rng(devices=[])
    if kinds == {"cuda"}:
        cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
        return torch.random.fork_rng(devices=cuda)
    kind = sorted(kinds)[0]
    return torch.random.fork_rng(device_type=kind)


def _forward(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor | None, Any]:
    if isinstance(batch, dict):
        try:
            out = module(**batch)
        except TypeError as err:
            if "unexpected keyword argument" not in str(err):
                raise
            raise TypeError(
                f"the model does not take this batch's keys {sorted(batch)} as arguments ({err}); the default score "
                "and loss take (inputs, targets) tuples or Hugging Face dicts (input_ids/pixel_values..., labels): "
                "pass score_fn/loss_fn"
            ) from err
        logits = out.logits if hasattr(out, "logits") else out
        return logits, batch.get("labels"), out
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        out = module(batch[0])
        logits = out.logits if hasattr(out, "logits") else out
        return logits, batch[1], out
    raise TypeError(
        f"cannot infer inputs and targets from a batch of type {type(batch).__name__}; pass score_fn/loss_fn"
    )


def _inputs(batch: Any) -> Tensor | None:
    if isinstance(batch, dict):
        return batch.get("input_ids")
    return batch[0] if isinstance(batch, (tuple, list)) and isinstance(batch[0], Tensor) else None


def _predicts_next_token(batch: Any, target: Tensor) -> bool:
    """Whether sequence labels follow the causal-LM convention: a copy of ``input_ids`` (``-100`` where masked).

    Hugging Face causal LMs take ``labels == input_ids`` and shift inside the model, so position ``t`` predicts
    label ``t + 1``. Token classification labels (classes) and seq2seq labels (decoder targets) are aligned with
    the logits instead; treating them as shifted would score every row against its neighbour's label.
    """
    ids = _inputs(batch)
    if ids is None or ids.shape != target.shape or ids.is_floating_point():
        return False
    valid = target != -100
    return bool(valid.any()) and bool((target[valid] == ids[valid]).all())


def _sequence_pairs(batch: Any, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and the labels they predict, for ``[B, T, C]`` logits: shifted by one for causal LMs, else aligned."""
    if _predicts_next_token(batch, target):
        return logits[:, :-1], target[:, 1:]
    if logits.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"sequence logits {tuple(logits.shape)} do not line up with labels {tuple(target.shape)}, and the labels "
            "are not a copy of input_ids (the causal-LM convention); pass score_fn/loss_fn"
        )
    return logits, target


def default_score(module: nn.Module, batch: Any) -> tuple[Tensor, int]:
    """Accuracy numerator and denominator for one batch.

    Classification (logits ``[B, C]``, targets ``[B]``) counts correct argmax predictions. Sequence logits
    ``[B, T, C]`` count correct predictions where ``labels != -100``: next-token predictions when the labels are a
    copy of ``input_ids`` (Hugging Face's causal-LM convention, the model shifts them), else position by position
    (token classification, seq2seq decoder labels).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> default_score(net, (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])))
        (tensor(1), 2)
    """
    logits, target, _ = _forward(module, batch)
    if target is None:
        raise ValueError("batch has no targets/labels; pass score_fn")
    if logits.dim() == 3:
        logits, tgt = _sequence_pairs(batch, logits, target)
        pred = logits.argmax(-1)
        valid = tgt != -100
        return (pred.eq(tgt) & valid).sum(), int(valid.sum())
    return logits.argmax(-1).eq(target).sum(), int(target.numel())


def answer_exact_match(module: nn.Module, batch: Any) -> tuple[Tensor, int]:
    """Exact match of whole answers for causal-LM batches: rows whose every labelled token is the argmax.

    A row counts when greedy decoding from its prompt reproduces its answer tokens (teacher-forced: the argmax at
    each answer position, given the true prefix, is the answer's next token, which is what greedy decoding does
    while it is right). One forward pass per batch, so the guard rail can judge exact match, not token accuracy.

    Example:
        >>> class Echo(nn.Module):  # predicts token t+1 = token t
        ...     def forward(self, input_ids, labels=None):
        ...         return F.one_hot(input_ids, 5).float()
        >>> ids = torch.tensor([[1, 2, 2, 2], [1, 3, 3, 4]])
        >>> labels = torch.tensor([[-100, -100, 2, 2], [-100, -100, 3, 4]])
        >>> answer_exact_match(Echo(), {"input_ids": ids, "labels": labels})
        (tensor(1), 2)
    """
    logits, target, _ = _forward(module, batch)
    if target is None or logits.dim() != 3:
        raise ValueError("answer_exact_match needs causal-LM batches with labels (-100 outside the answer)")
    pred = logits[:, :-1].argmax(-1)
    tgt = target[:, 1:]
    valid = tgt != -100
    rows = valid.any(-1)
    correct = ((pred == tgt) | ~valid).all(-1) & rows
    return correct.sum(), int(rows.sum())


def default_loss(module: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy for ``(x, y)`` batches; the model's own ``loss`` for Hugging Face dict batches."""
    logits, target, out = _forward(module, batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    if target is None:
        raise ValueError("batch has no targets/labels; pass loss_fn")
    if logits.dim() == 3:
        logits, tgt = _sequence_pairs(batch, logits, target)
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    return F.cross_entropy(logits, target)


def move_batch(batch: Any, device: torch.device) -> Any:
    """Move tensors of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def score_parts(result: Any) -> tuple[float, float]:
    """``(sum_of_scores, count)`` from what a score function returned for one batch.

    Either that pair, or one number (a float, or a one-element tensor such as a batch's accuracy), which counts as
    the batch's mean score: batches are then averaged alike.

    Example:
        >>> score_parts((torch.tensor(3.0), 4)), score_parts(torch.tensor(0.75))
        ((3.0, 4.0), (0.75, 1.0))
    """
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return float(result[0]), float(result[1])
    if isinstance(result, (int, float)) or (isinstance(result, Tensor) and result.numel() == 1):
        return float(result), 1.0
    what = f"a tensor of shape {tuple(result.shape)}" if isinstance(result, Tensor) else repr(result)[:80]
    raise TypeError(
        f"score_fn must return (sum_of_scores, count) for a batch, or one number (its mean score); got {what}"
    )


@torch.no_grad()
def evaluate(
    module: nn.Module,
    batches: Iterable[Any],
    score_fn: ScoreFn = default_score,
    *,
    device: torch.device | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    shard: tuple[int, int] | None = None,
) -> float:
    """Mean score over batches, as a fraction (0..1).

    Args:
        module: The model (switched to eval mode for the call; each submodule's mode is restored).
        batches: An iterable of batches (a list, to evaluate several weight settings on the same data).
        score_fn: ``(module, batch) -> (sum_of_scores, count)``, or one number, the batch's mean score (see
            :func:`score_parts`).
        device: Where to move batches (default: the module's first parameter's device).
        reduce: Optional cross-process sum (for DDP); applied to ``[sum, count]``.
        shard: ``(rank, world_size)``: score only batches ``i`` with ``i % world_size == rank`` (each process a
            disjoint share; ``reduce`` then sums the shares).

    Returns:
        ``sum / count``.
    """
    if device is None:
        device = next(module.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with eval_mode(module):
        for i, batch in enumerate(batches):
            if shard is not None and i % shard[1] != shard[0]:
                continue
            s, n = score_parts(score_fn(module, move_batch(batch, device)))
            total[0] += s
            total[1] += n
    if reduce is not None:
        total = reduce(total)
    if total[1] == 0:
        raise ValueError("evaluation saw no examples")
    return float(total[0] / total[1])

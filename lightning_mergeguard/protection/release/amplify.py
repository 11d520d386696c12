"""The release's re-parameterisation, checked after stage 2.

:func:`amplify_checked` applies exact symmetries (and optionally a permutation of the residual stream) and undoes
what a check on the live model refuses.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from lightning_mergeguard.evaluation import eval_mode, rng_kept
from lightning_mergeguard.protection.release.residual import draw_permutation, find_residual_stream, permute_residual_
from lightning_mergeguard.protection.release.symmetry import amplify_module_, find_symmetries
from lightning_mergeguard.protection.stage2.base import Stage2Context

__all__ = ["RESIDUAL_TOLERANCE", "amplify_checked"]


def amplify_checked(
    module: nn.Module,
    strength: float,
    ctx: Stage2Context,
    after: float,
    names: Collection[str] | None = None,
    permute_residual: bool = False,
) -> tuple[float, dict[str, Any]]:
    """Apply :func:`~lightning_mergeguard.protection.release.symmetry.amplify_module_` after stage 2, checked twice.

    First, on one training batch, each kind of symmetry must leave the recognised blocks' outputs unchanged
    (:func:`~lightning_mergeguard.protection.release.symmetry.symmetry_errors`); kinds that do not (a block that only
    looks like a known one) are left out with a warning. With ``permute_residual``, the residual stream's channels are
    then permuted (:mod:`~lightning_mergeguard.protection.release.residual`), which touches the embeddings, the final
    norm and the head too, whatever ``names`` says; the batch's loss must not move by more than
    :data:`RESIDUAL_TOLERANCE` (relative) or the permutation is undone with a warning. Then the guard rail's score:
    if it drops below ``ctx.before - ctx.tolerance``, the weights are put back and a warning says so. When no kind
    passes, or the forward pass cannot be checked, the model is left as stage 2 left it, with a warning.

    Args:
        module: The model, after stage 2.
        strength: Largest scale.
        ctx: The stage-2 context (its ``batches``, ``loss_fn``, ``metric``, ``before``, ``tolerance``, ``warn``).
        after: The score stage 2 left.
        names: Parameter names the symmetries may touch (``None``: all).
        permute_residual: Also permute the residual stream's channels (a model whose stream is not recognised
            gets a warning and the symmetries alone).

    Returns:
        The score kept, and the report entry (``strength``, ``applied``, groups, ``checked``, ``dropped``,
        ``score_before``, ``score_after``, ``reverted``; ``skipped``: why nothing was applied; with
        ``permute_residual``, ``residual``: ``applied``, ``width``, ``tensors``, the loss's ``change``, or why not).
    """
    groups = find_symmetries(module, names)
    stream = find_residual_stream(module) if permute_residual else None
    touched = {f.name for g in groups for f in g.factors} | {n for n, _ in (stream.axes if stream else ())}
    params = {n: p for n, p in module.named_parameters() if n in touched}
    with torch.no_grad():
        saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}  # for a revert; off the accelerator
    batch = next(ctx.batches, None)

    def forward() -> Any:
        with ctx.forward_context():
            return ctx.loss_fn(module, batch)

    try:
        if batch is None:
            raise ValueError("amplify has no training batch left to check the symmetries on")
        report = amplify_module_(module, strength, groups=groups, forward=forward, reduce=ctx.grad_reduce)
    except ValueError as err:
        ctx.warn(f"{err}; the model is left without amplification.")
        return after, {
            "strength": strength,
            "applied": False,
            "skipped": str(err),
            "score_before": after,
            "score_after": after,
            "reverted": False,
        }
    if report["dropped"]:
        changes = ", ".join(f"{k}: {report['checked'][k]:.3g}" for k in report["dropped"])
        ctx.warn(f"amplify left out symmetries that change this model's blocks' outputs (relative change {changes}).")
    if permute_residual:
        report["residual"] = _permute_checked(module, stream, forward, ctx)
    score = ctx.metric()
    report.update(score_before=after, score_after=score, reverted=False, applied=True)
    if score < ctx.before - ctx.tolerance:
        ctx.warn(
            f"amplify moved the score from {after:.2f} to {score:.2f} (tolerance {ctx.tolerance} below "
            f"{ctx.before:.2f}): this model's blocks are not the symmetric ones they look like; amplification undone."
        )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        report.update(reverted=True, applied=False, score_after=after)
        return after, report
    return score, report


RESIDUAL_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
"""Largest relative change of a batch's loss a residual permutation may cause, per dtype (half types: 1e-2).

A permutation reorders sums (the norms' statistics, every reader's dot products), so the loss moves by rounding
only; a reader of the stream the permutation missed moves it by order one."""


def _permute_checked(module: nn.Module, stream: Any, forward: Any, ctx: Stage2Context) -> dict[str, Any]:
    """Permute ``module``'s residual stream in place if one batch's loss stays put; the report entry."""
    if stream is None:
        why = (
            "no residual stream recognised (a Hugging Face Llama-style causal LM or an open_clip VisionTransformer "
            "with its proj, held once, whose layers are not wrapped or sharded)"
        )
        ctx.warn(f"permute_residual: {why}; the model is amplified without it.")
        return {"applied": False, "skipped": why}
    params = dict(module.named_parameters())
    names = [n for n, _ in stream.axes]

    def loss() -> float:
        with eval_mode(module), torch.no_grad(), rng_kept(module):
            torch.manual_seed(0)
            return float(forward())

    with torch.no_grad():
        before = loss()
        perm = draw_permutation(stream.width)
        permute_residual_(params, stream, perm)
        change = abs(loss() - before) / max(abs(before), 1e-12)
        if ctx.grad_reduce is not None:  # one decision on every process
            device = params[names[0]].device
            change = float(ctx.grad_reduce(torch.tensor([change], dtype=torch.float64, device=device)))
        limit = RESIDUAL_TOLERANCE.get(params[names[0]].dtype, 1e-2)
        if not change <= limit:
            permute_residual_(params, stream, torch.argsort(perm))  # a permutation is undone exactly
            ctx.warn(
                f"permute_residual changed a training batch's loss by {change:.3g} (relative, more than {limit:g}): "
                "the model reads its residual stream somewhere this layout does not know; permutation undone."
            )
            return {"applied": False, "skipped": f"loss changed by {change:.3g}", "change": change}
    return {"applied": True, "width": stream.width, "tensors": len(names), "change": change}

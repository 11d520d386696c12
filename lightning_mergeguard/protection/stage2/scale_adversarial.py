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

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.evaluation import LossFn, move_batch
from lightning_mergeguard.protection.stage2._adversarial import (
    accumulate_grads_,
    adversarial_loop,
)
from lightning_mergeguard.protection.stage2.base import (
    Stage2,
    Stage2Context,
    _check_common,
    _guarded_loop,
    _numbers,
    _scores_at,
)
from lightning_mergeguard.quantization import check_formats
from lightning_mergeguard.sharding import local, mean_across_ranks, shard_like
from lightning_mergeguard.validation import is_number

__all__ = ["ScaleAdversarial", "scale_adversarial_", "write_scaled_"]


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
    check: Callable[[int], bool | None] | None = None,
    progress: bool = False,
    drop_density: float | None = None,
    seed: int = 0,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    history: list[dict[str, float]] | None = None,
    deployed: Sequence[str] = (),
    keep_batches: Sequence[Any] = (),
    keep_scaled: bool = False,
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
        check: The function called (with the module in eval mode and the weights as they are after that step); a
            true return stops the loop.
        progress: Show a progress bar.
        drop_density: If set, every other step sabotages DARE-style copies instead of exact ones:
            ``theta_pre + s * (m * tau) / drop_density`` with a fresh Bernoulli(``drop_density``) mask ``m`` per
            tensor, the copy that DARE merges apply (their random drop otherwise dodges the exact scaled copies).
            The gradient is exact for the drawn mask.
        seed: Seed of the masks.
        forward_context: Context entered around every forward pass (a Trainer's
            ``precision_plugin.forward_context`` for autocast); the backward runs outside it, as in training.
        history: A list to append the per-step history to (so ``check`` can read it while the loop runs).
        deployed: Weight formats whose own loss is also minimised, one per step in turn (straight-through).
        keep_batches: Batches whose loss joins the own term every step (behaviour to keep, e.g. a fingerprint).
        keep_scaled: Also minimise the ``keep_batches``' loss at each scaled copy, so what they hold (a trigger set)
            is still answered by the merges whose own task stage 2 makes fail.

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
    gen = torch.Generator(device=device).manual_seed(seed)
    kept = [move_batch(b, device) for b in keep_batches] if keep_scaled else []

    def adversary(step: int, batch: Any, live: Mapping[str, Tensor]) -> dict[str, float]:
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
            factors = [masks[n] for n in names] if masks is not None else None
            if kept:  # the kept behaviour must hold at the scaled copy too: its loss is minimised there
                with forward_context():
                    loss_k = sum(loss_fn(module, b) for b in kept) / len(kept)
                accumulate_grads_((factor / len(scales)) * loss_k, tensors, factors)
            if value >= clip:
                continue
            accumulate_grads_(-(factor / len(scales)) * loss_s, tensors, factors)
        return {"scaled_loss": scaled_total / len(scales)}

    return adversarial_loop(
        module, params, batches, loss_fn, adversary, steps=steps, lr=lr, device=device,
        desc="stage 2: scale-adversarial", keep_batches=keep_batches, grad_reduce=grad_reduce,
        check_every=check_every, check=check, progress=progress, forward_context=forward_context, history=history,
        deployed=deployed,
    )  # fmt: skip


class ScaleAdversarial(Stage2):
    """Keep the model good while making the scaled copies ``theta_pre + s * tau`` that merges apply bad.

    A short Adam optimisation of ``L(theta) - mean_s min(L(theta_pre + s * tau), clip)`` on the owner's training
    batches (:func:`~lightning_mergeguard.protection.stage2.scale_adversarial.scale_adversarial_`). The guard rail
    checks every ``ceil(steps / checks)`` steps (so at most ``checks`` times); a check scores the model and its scaled
    copy at the sabotaged scale nearest the scales' mean (the *merge proxy*): at most ``2 + 2 * checks`` validation
    passes in all. A check is eligible if its score is within
    ``tolerance`` of the starting score and its proxy is below the stage-1 weights'; eligible checks whose proxy is
    within ``tolerance`` points of the lowest are taken as equally protective, and the one with the best own score
    is kept (the stage-1 weights if no check is eligible).

    Args:
        steps: Optimisation steps.
        scales: Merge scales sabotaged, each in (0, 1) (one number: one scale).
        clip: Loss ceiling at the scaled copies.
        lr: Adam learning rate.
        drop_density: Also sabotage DARE-style copies (random keep rate ``drop_density``, rescaled) on every other
            step; ``None`` sabotages the exact scaled copies only.
        checks: Guard-rail checks.
        keep_scaled: Also keep the callback's ``keep_batches`` (a trigger set) answered at the scaled copies, so
            merges whose own task stage 2 makes fail still answer them (``benchmarks/trigger_set.py``).
        deployed: Weight formats the owner's users run the model in (``"int4-g128"``, ``"int8-row"``, ``"fp16"``...,
            :data:`lightning_mergeguard.quantization.QUANTIZERS`; one name alone is a list of one): each step also
            minimises the own loss at the weights in one of them (straight-through). The guard rail holds the own
            score in each to ``tolerance`` of the stage-1 weights' in that format, and prefers weights within
            ``tolerance`` of the full-precision score in every format (stage 1 itself can cost under 4-bit); if no
            check is by ``steps``, stage 2 runs up to ``steps`` more, to the first that is (report: ``steps_run``,
            and ``deployed_short``, the formats still short). One more validation pass per format and check. Off by
            default.
    """

    name = "scale_adversarial"
    supports_sharded = True

    def __init__(
        self,
        steps: int = 300,
        scales: float | Sequence[float] = (0.2, 0.3, 0.5),
        clip: float = 5.0,
        lr: float = 1e-3,
        drop_density: float | None = None,
        checks: int = 8,
        keep_scaled: bool = False,
        deployed: str | Sequence[str] = (),
    ) -> None:
        _check_common(steps, clip, lr, checks)
        if not is_number(scales) and (isinstance(scales, (str, bytes)) or not scales):
            raise ValueError(f"scales must be a non-empty list of merge scales in (0, 1), got {scales!r}")
        if any(not 0.0 < s < 1.0 for s in _numbers(scales, "scales")):
            raise ValueError(f"scales must be a non-empty list of merge scales in (0, 1), got {scales!r}")
        if drop_density is not None and not 0 < drop_density < 1:
            raise ValueError(f"drop_density must be in (0, 1) or None, got {drop_density!r}")
        self.steps = steps
        self.scales = _numbers(scales, "scales")  # one scale given alone is a list of one
        self.clip = float(clip)
        self.lr = float(lr)
        self.drop_density = drop_density
        self.checks = checks
        if not isinstance(keep_scaled, bool):
            raise ValueError(f"keep_scaled must be True or False, got {keep_scaled!r}")
        self.keep_scaled = keep_scaled
        self.deployed = check_formats(deployed)

    @property
    def proxy_scale(self) -> float:
        """The scale whose copy the guard rail scores: the sabotaged scale nearest the scales' mean."""
        mean = sum(self.scales) / len(self.scales)
        return min(self.scales, key=lambda s: abs(s - mean))

    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """Make the scaled copies of the task vector bad under the guard rail; see :meth:`Stage2.run`.

        Args:
            ctx: What the optimisation uses: the model, its perturbed parameters, their reference, batches, metric.

        Returns:
            The kept weights' score and the report (the proxy scale, every check, first and last losses).
        """
        params, ref = ctx.params, ctx.reference
        scale = self.proxy_scale

        def proxy() -> float:
            return _scores_at(ctx, [lambda live: write_scaled_(params, ref, live, scale)])[0]

        def loop(batches: Any, settings: dict[str, Any]) -> None:
            scale_adversarial_(
                ctx.module,
                params,
                ref,
                batches,
                ctx.loss_fn,
                scales=self.scales,
                clip=self.clip,
                drop_density=self.drop_density,
                lr=self.lr,
                keep_scaled=self.keep_scaled,
                **settings,
            )

        losses_logged = ("own_loss", "scaled_loss")
        score, report, losses = _guarded_loop(ctx, proxy, self.steps, self.checks, loop, losses_logged, self.deployed)
        return score, {**report, "merge_proxy_scale": scale, **losses}

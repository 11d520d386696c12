"""The default stage 2: keep the model good while the scaled copies ``theta_pre + s * tau`` merges apply are bad."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_mergeguard.protection.scale_adversarial import scale_adversarial_, write_scaled_
from lightning_mergeguard.protection.strategies.base import (
    Stage2,
    Stage2Context,
    _check_common,
    _guarded_loop,
    _numbers,
    _scores_at,
)
from lightning_mergeguard.validation import is_number

__all__ = ["ScaleAdversarial"]


class ScaleAdversarial(Stage2):
    """Keep the model good while making the scaled copies ``theta_pre + s * tau`` that merges apply bad.

    A short Adam optimisation of ``L(theta) - mean_s min(L(theta_pre + s * tau), clip)`` on the owner's training
    batches (:func:`~lightning_mergeguard.protection.scale_adversarial.scale_adversarial_`). The guard rail checks
    every ``ceil(steps / checks)`` steps (so at most ``checks`` times); a check scores the model and its scaled copy
    at the sabotaged scale nearest the scales' mean (the *merge proxy*): at most ``2 + 2 * checks`` validation passes
    in all. A check is eligible if its score is within
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

    @property
    def proxy_scale(self) -> float:
        """The scale whose copy the guard rail scores: the sabotaged scale nearest the scales' mean."""
        mean = sum(self.scales) / len(self.scales)
        return min(self.scales, key=lambda s: abs(s - mean))

    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """See the class docstring.

        Args:
            ctx: What stage 2 may use: the module, the parameters it may change, the reference, batches, the metric.

        Returns:
            ``(score of the weights kept, the strategy's report entries)``.
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
                steps=self.steps,
                scales=self.scales,
                clip=self.clip,
                drop_density=self.drop_density,
                lr=self.lr,
                **settings,
            )

        score, report, losses = _guarded_loop(ctx, proxy, self.steps, self.checks, loop, ("own_loss", "scaled_loss"))
        return score, {**report, "merge_proxy_scale": scale, **losses}

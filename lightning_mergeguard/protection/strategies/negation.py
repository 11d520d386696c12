"""The paper summary's literal stage 2: negate the masked task vector, ``theta_hat = theta' - beta * M * tau'``."""

from __future__ import annotations

from typing import Any

import torch

from lightning_mergeguard.parameters import group_layers
from lightning_mergeguard.protection.importance import layer_importance
from lightning_mergeguard.protection.negation import apply_negation_, critical_layers, negation_mask
from lightning_mergeguard.protection.strategies.base import (
    Stage2,
    Stage2Context,
)

__all__ = ["Negation"]


class Negation(Stage2):
    """The paper summary's literal stage 2: ``theta_hat = theta' - beta * M * tau'``.

    Layer importance is the score drop when one layer's task vector is removed; the ``critical_fraction`` most
    important layers and the ``small_fraction`` smallest entries of every other tensor are masked out (``M = 0``).
    If the score falls by more than the tolerance, ``beta`` is halved (up to three times), else nothing is applied.

    Args:
        beta: Negation strength (``1`` resets the masked entries to the base, ``> 1`` flips their sign).
        critical_fraction: Fraction of layers spared as critical.
        small_fraction: Fraction of smallest entries spared per tensor.
        granularity: What a "layer" is: ``"block"``, ``"module"`` or ``"tensor"``.
    """

    name = "negation"

    def __init__(
        self,
        beta: float = 1.0,
        critical_fraction: float = 0.1,
        small_fraction: float = 0.1,
        granularity: str = "block",
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        for what, frac in (("critical_fraction", critical_fraction), ("small_fraction", small_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{what} must be in [0, 1), got {frac!r}")
        if granularity not in ("block", "module", "tensor"):
            raise ValueError(f"granularity must be 'block', 'module' or 'tensor', got {granularity!r}")
        self.beta = float(beta)
        self.critical_fraction = critical_fraction
        self.small_fraction = small_fraction
        self.granularity = granularity

    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """See the class docstring.

        Args:
            ctx: What stage 2 may use: the module, the parameters it may change, the reference, batches, the metric.

        Returns:
            ``(score of the weights kept, the strategy's report entries)``.
        """
        params, ref = ctx.params, ctx.reference
        layers = group_layers(params, self.granularity)
        _, scores = layer_importance(params, ref, layers, ctx.metric, progress=ctx.progress)
        critical = set(critical_layers(scores, self.critical_fraction))
        masks = {}
        for layer, names in layers.items():
            for n in names:
                tau = params[n].detach() - ref[n]
                masks[n] = negation_mask(tau, critical=layer in critical, small_fraction=self.small_fraction)
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in params.items()}
        tried = []
        beta, after = self.beta, ctx.before
        for beta in (self.beta / 2**i for i in range(4)):
            apply_negation_(params, ref, masks, beta)
            after = ctx.metric()
            tried.append({"beta": beta, "score": after})
            if ctx.before - after <= ctx.tolerance:
                break
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        else:
            beta, after = 0.0, ctx.before
        if beta != self.beta:
            ctx.warn(f"MergeGuardCallback: beta={self.beta} cost more than {ctx.tolerance} points; used beta={beta}.")
        return after, {"layer_scores": scores, "critical_layers": sorted(critical), "beta_used": beta, "backoff": tried}

"""A stage 2 that perturbs nothing: the re-parameterisation layers (``amplify``) alone on the fine-tuned weights."""

from __future__ import annotations

from typing import Any

from lightning_mergeguard.protection.stage2.base import Stage2, Stage2Context

__all__ = ["KeepWeights"]


class KeepWeights(Stage2):
    """Leave the fine-tuned weights as they are (no validation pass, nothing changed).

    What ``MergeGuardCallback(stage2="none", amplify=...)`` runs: the amplifying symmetries (and, with
    ``permute_residual``, the stream permutation) then act on the fine-tuned model itself, so the own score does not
    move at all. The trade-off, measured on the grid of ``benchmarks/protection.py``: off-the-shelf merges collapse
    as they do over a stage 2, but an attacker who re-aligns the model to ``theta_pre`` gets the unprotected
    fine-tune back, where a stage 2 underneath would still be in the way of some merges (uniform task arithmetic,
    TIES, DARE, AdaMerging).

    Example:
        >>> KeepWeights()
        KeepWeights()
    """

    name = "none"
    supports_sharded = True  # it touches no weight

    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """Return the score before stage 2, unchanged, and an empty report.

        Args:
            ctx: What stage 2 may use: the module, the parameters it may change, the reference, batches, the metric.

        Returns:
            ``(score of the weights kept, the strategy's report entries)``.
        """
        return ctx.before, {"perturbed": False}

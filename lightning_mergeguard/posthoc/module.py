"""Protect a module in memory: stage 2 on a model that is already trained, then the release steps."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from lightning_mergeguard.callbacks._common import repeat
from lightning_mergeguard.errors import IncompatibleModelsError
from lightning_mergeguard.evaluation import LossFn, default_loss
from lightning_mergeguard.merging.sources import match_names, open_source
from lightning_mergeguard.parameters import ParameterSelection, parameter_selection, refuse_non_finite
from lightning_mergeguard.protection.release.amplify import amplify_checked
from lightning_mergeguard.protection.release.deployment import deployment_check
from lightning_mergeguard.protection.release.key import embed_release_key
from lightning_mergeguard.protection.release.settings import Release, release_settings
from lightning_mergeguard.protection.stage2 import (
    DEFAULT_TOLERANCE,
    ScaleAdversarial,
    Stage2,
    Stage2Context,
)
from lightning_mergeguard.protection.verdict import (
    not_protected_reason,
    weights_changed,
    weights_digest,
)
from lightning_mergeguard.reference import ReferenceWeights

__all__ = ["deployment_table", "protect_module"]


STAGE2_CHOICES = ("auto", "scale_adversarial", "merge_neighbourhood", "none")


def protect_module(
    module: nn.Module,
    base: Any,
    train_batches: Iterable[Any],
    metric: Callable[[nn.Module], float],
    *,
    stage2: Stage2 | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    parameters: ParameterSelection | None = None,
    loss_fn: LossFn = default_loss,
    refit: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
    release: Release | None = None,
    who: str = "protect_module",
    advice: str = "Raise tolerance=, the strategy's steps= or lr=, or pass refit=.",
) -> dict[str, Any]:
    """Protect ``module`` in place; return the report.

    Args:
        module: The fine-tuned model (its parameters are changed in place).
        base: The pretrained weights (anything :func:`~lightning_mergeguard.merging.sources.open_source` reads).
        train_batches: The owner's training batches (cycled).
        metric: ``module -> score`` in points (the guard rail's measure, e.g. exact match or accuracy).
        stage2: The strategy (default: ``ScaleAdversarial()``, as the callback's).
        tolerance: Largest allowed drop of the score, in points.
        parameters: The weights stage 2 may change
            (:meth:`~lightning_mergeguard.parameters.ParameterSelection.select_stage2`, of those the base has);
            default: every trainable one but embeddings, final norms, LM and task heads.
        loss_fn: ``(module, batch) -> loss``.
        refit: Called when stage 2 alone finds no weights within the tolerance: a short stage-1 re-fit of
            ``module`` that also applies stage 2 (as
            :func:`~lightning_mergeguard.posthoc.checkpoint.protect_checkpoint` does); ``None`` skips it.
        progress: Show a progress bar.
        release: The steps after stage 2 (:class:`~lightning_mergeguard.protection.release.Release`): the ownership
            key, the deployment check, and ``amplify``/``permute_residual``. Its ``dtype`` applies where a release
            is written (``protect_checkpoint``), not here.
        who: The entry point, as warnings name it.
        advice: What to change when stage 2 keeps no step, in the entry point's words.

    Returns:
        ``score_before``, ``score_after``, ``stage2`` (the strategy's report), ``refit`` (whether it ran),
        ``weights_changed``, ``protected`` and ``not_protected`` (why not, or ``None``: no weight changed, or stage 2
        kept no step and nothing else was applied; a warning says so too); with the release's steps,
        ``ownership_key``, ``deployment`` (treatment -> unprotected and protected score) and ``amplify`` (the
        symmetries applied or why not, the score after them, whether they were reverted).

    Raises:
        IncompatibleModelsError: A base that has none of the model's parameters.
        NonFiniteError: Non-finite weights in ``module``.
        TypeError: ``parameters`` or ``release`` of the wrong type.

    Example:
        >>> report = protect_module(model, "base.safetensors", batches, accuracy)  # doctest: +SKIP
        >>> report["protected"], report["score_after"]  # doctest: +SKIP
        (True, 91.2)
    """
    selection = parameter_selection(parameters)
    release = release_settings(release)
    stage2 = stage2 or ScaleAdversarial()
    refuse_non_finite(module, "protect_module")
    src = open_source(base, name="base")
    candidates = selection.select_stage2(module)
    names = match_names(candidates, src.keys(), what="base", missing="skip")  # a task head the base lacks stays out
    if not names:
        raise IncompatibleModelsError("the base has none of the model's parameters: is it the right base model?")
    params = {n: candidates[n] for n in names}
    reference = ReferenceWeights({n: src.get(k) for n, k in names.items()})
    reference.resolve(params)
    passes = [0]

    def counted() -> float:
        passes[0] += 1
        return metric(module)

    before = counted()
    start = weights_digest(module.state_dict())  # for the verdict: a digest per tensor, not a copy of the model
    unprotected = _cpu_copy(module) if release.deployment_check else None

    ctx = Stage2Context(
        module=module,
        params=params,
        reference=reference.as_dict(params, like=params),
        batches=iter(train_batches),
        metric=counted,
        loss_fn=loss_fn,
        before=before,
        tolerance=tolerance,
        progress=progress,
        warn=lambda message: warnings.warn(message, stacklevel=3),
        who=who,
        advice=advice,
    )
    after, extra = stage2.run(ctx)
    report: dict[str, Any] = {
        "score_before": before,
        "score_after": after,
        "stage2": {"settings": stage2.settings(), **extra, "validation_passes": passes[0]},
        "parameters_protected": len(params),
        "refit": False,
    }
    if extra.get("steps_used") == 0 and refit is not None:
        refit(module)
        report["refit"] = True
        report["score_after"] = metric(module)
    changed = weights_changed(start, module.state_dict())  # by stage 2 or the re-fit; the key protects nothing
    if release.ownership_key is not None:
        report["ownership_key"] = embed_release_key(params, ctx, extra, release.ownership_key, release.key_strength)
        report["score_after"] = report["ownership_key"]["score_after_key"]
    if release.amplify is not None:
        report["score_after"], report["amplify"] = amplify_checked(
            module, release.amplify, ctx, report["score_after"], permute_residual=release.permute_residual
        )
    report["validation_passes"] = passes[0]  # stage 2's, plus the check after the symmetries
    if unprotected is not None:
        # the fine-tuning treatments take 50 batches each: a short list or loader is cycled, not cut short
        report["deployment"] = deployment_table(module, unprotected, metric, repeat(train_batches), loss_fn)
    report["weights_changed"] = changed or bool((report.get("amplify") or {}).get("applied"))
    reason = not_protected_reason(report, report["weights_changed"], stage2_words=advice)
    report.update(protected=reason is None, not_protected=reason)
    if reason is not None:
        warnings.warn(f"{who}: the model is NOT protected: {reason}", stacklevel=2)
    return report


def _cpu_copy(module: nn.Module) -> dict[str, Tensor]:
    """The module's state, copied to the CPU (kept aside while the module is changed)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def deployment_table(
    module: nn.Module,
    unprotected: dict[str, Tensor],
    metric: Callable[[nn.Module], float],
    batches: Iterable[Any],
    loss_fn: LossFn = default_loss,
) -> dict[str, dict[str, float]]:
    """Own score under each deployment treatment, of the unprotected and the protected model (module restored).

    Args:
        module: The protected model (restored to its protected weights on return).
        unprotected: The state of the model before protection.
        metric: ``module -> score`` in points.
        batches: The owner's training batches (the fine-tuning treatments use them).
        loss_fn: ``(module, batch) -> loss`` for those treatments.

    Returns:
        Treatment -> ``{"unprotected": score, "protected": score}``
        (:func:`~lightning_mergeguard.protection.release.deployment.deployment_check`'s treatments).
    """
    protected = _cpu_copy(module)
    module.load_state_dict(unprotected)
    before = deployment_check(module, metric, batches=batches, loss_fn=loss_fn)
    module.load_state_dict(protected)
    after = deployment_check(module, metric, batches=batches, loss_fn=loss_fn)
    return {t: {"unprotected": before[t], "protected": after[t]} for t in after}

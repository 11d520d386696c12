"""Stage-2 strategies: each validates its own settings and runs as a pure function of a :class:`Stage2Context`.

:class:`~lightning_mergeguard.MergeGuardCallback` builds the context from the trainer (the model, the parameters
stage 2 may change, the reference, the owner's training batches, a metric on validation batches) and calls
:meth:`Stage2.run`; tests and scripts can call it directly without a Trainer.

Example:
    >>> strategy = ScaleAdversarial(steps=100, scales=(0.2, 0.3, 0.5))
    >>> strategy.settings()["steps"]
    100
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.evaluation import LossFn
from lightning_mergeguard.parameters import group_layers
from lightning_mergeguard.protection.importance import layer_importance
from lightning_mergeguard.protection.negation import apply_negation_, critical_layers, negation_mask
from lightning_mergeguard.protection.scale_adversarial import scale_adversarial_, write_scaled_

__all__ = [
    "DEFAULT_STAGE2_EXCLUDE",
    "Negation",
    "ScaleAdversarial",
    "Stage2",
    "Stage2Context",
    "resolve_stage2",
]

DEFAULT_STAGE2_EXCLUDE: tuple[str, ...] = (
    r"embed",  # token / position embeddings (LLMs), open_clip token_embedding
    r"(^|\.)wte\.|(^|\.)wpe\.",
    r"lm_head",
    r"(^|\.)(norm|final_layernorm|ln_f|ln_final|ln_post)\.",  # final norms
    r"(^|\.)(head|classifier|score)\.",  # task heads
    r"(^|\.)(text_projection|logit_scale|proj)$",
)
"""Stage 2 leaves these out by default: embeddings, final norm, LM and task heads (as the method prescribes)."""


@dataclass
class Stage2Context:
    """What a stage-2 strategy works on.

    Attributes:
        module: The model (its forward is what ``loss_fn`` and ``metric`` call).
        params: The parameters stage 2 may change, in place.
        reference: ``theta_pre`` for those names, on their device and dtype.
        batches: The owner's training batches (an endless iterator).
        metric: The monitored score of the live weights, in points (the guard rail's measure).
        loss_fn: ``(module, batch) -> loss``.
        before: The score before stage 2.
        tolerance: Largest allowed drop of the score, in points.
        grad_reduce: Mean across processes applied to each gradient (DDP), or ``None``.
        forward_context: Context around forward passes of the optimisation (autocast).
        progress: Show a progress bar.
        warn: Where warnings go (rank zero only under DDP).
    """

    module: nn.Module
    params: Mapping[str, nn.Parameter]
    reference: Mapping[str, Tensor]
    batches: Iterator[Any]
    metric: Callable[[], float]
    loss_fn: LossFn
    before: float
    tolerance: float
    grad_reduce: Callable[[Tensor], Tensor] | None = None
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext
    progress: bool = False
    warn: Callable[[str], None] = field(default=lambda message: None)


class Stage2(ABC):
    """A stage-2 strategy: perturb ``ctx.params`` in place within the guard rail; return (score after, report)."""

    name: str = "stage2"

    @abstractmethod
    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """Apply the strategy; return the score of the weights kept and what the report should hold."""

    def settings(self) -> dict[str, Any]:
        """The strategy's settings (for the protection report)."""
        return {"method": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "method")
        return f"{type(self).__name__}({args})"


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
        scales: Merge scales sabotaged, each in (0, 1).
        clip: Loss ceiling at the scaled copies.
        lr: Adam learning rate.
        drop_density: Also sabotage DARE-style copies (random keep rate ``drop_density``, rescaled) on every other
            step; ``None`` sabotages the exact scaled copies only.
        checks: Guard-rail checks.
    """

    name = "scale_adversarial"

    def __init__(
        self,
        steps: int = 300,
        scales: Sequence[float] = (0.2, 0.3, 0.5),
        clip: float = 5.0,
        lr: float = 1e-3,
        drop_density: float | None = None,
        checks: int = 8,
    ) -> None:
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not scales or any(not 0.0 < s < 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of merge scales in (0, 1), got {scales!r}")
        if not (clip > 0 and lr > 0):
            raise ValueError(f"clip and lr must be > 0, got clip={clip!r}, lr={lr!r}")
        if drop_density is not None and not 0 < drop_density < 1:
            raise ValueError(f"drop_density must be in (0, 1) or None, got {drop_density!r}")
        if not (isinstance(checks, int) and checks >= 1):
            raise ValueError(f"checks must be a positive integer, got {checks!r}")
        self.steps = steps
        self.scales = tuple(float(s) for s in scales)
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
        """See the class docstring."""
        params, ref = ctx.params, ctx.reference
        scale = self.proxy_scale

        def proxy() -> float:
            with torch.no_grad():
                live = {n: p.detach().clone() for n, p in params.items()}
            try:
                write_scaled_(params, ref, live, scale)
                return ctx.metric()
            finally:
                write_scaled_(params, ref, live, 1.0)

        history: list[dict[str, float]] = []
        checks: list[dict[str, float]] = []
        best: dict[str, float] = {"step": 0, "score": ctx.before}
        lowest = [math.inf]  # the lowest merge proxy seen at a check within tolerance
        with torch.no_grad():
            best_weights = {n: p.detach().clone() for n, p in params.items()}

        def check(step: int) -> None:
            entry = {"step": step, "score": ctx.metric(), "merge_proxy": proxy()}
            checks.append(entry)
            if ctx.before - entry["score"] > ctx.tolerance or entry["merge_proxy"] >= proxy_before:
                return  # costs too much, or protects no better than the stage-1 weights
            lowest[0] = min(lowest[0], entry["merge_proxy"])
            band = lowest[0] + ctx.tolerance  # proxies within the tolerance of the lowest: equally protective
            if entry["merge_proxy"] > band:
                return
            if best["step"] == 0 or best["merge_proxy"] > band or entry["score"] > best["score"]:
                best.update(entry)
                with torch.no_grad():
                    for n, p in params.items():
                        best_weights[n].copy_(p)

        best["merge_proxy"] = proxy_before = proxy()  # the stage-1 weights, kept if no check is eligible
        scale_adversarial_(
            ctx.module,
            params,
            ref,
            itertools.islice(ctx.batches, self.steps),
            ctx.loss_fn,
            steps=self.steps,
            scales=self.scales,
            clip=self.clip,
            drop_density=self.drop_density,
            lr=self.lr,
            grad_reduce=ctx.grad_reduce,
            check_every=max(1, math.ceil(self.steps / self.checks)),
            check=check,
            progress=ctx.progress,
            forward_context=ctx.forward_context,
            history=history,
        )
        if self.steps and (not checks or checks[-1]["step"] != self.steps):
            check(self.steps)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_weights[n])
        steps_used = int(best["step"])
        if steps_used == 0:
            ctx.warn(
                f"MergeGuardCallback: no stage-2 weights stayed within {ctx.tolerance} points while lowering the "
                f"merge proxy by more than {ctx.tolerance} points; kept the stage-1 weights. Try more steps, a lower "
                "lr or a larger tolerance."
            )
        first, last = history[0] if history else {}, history[-1] if history else {}
        return float(best["score"]), {
            "steps_used": steps_used,
            "merge_proxy_scale": scale,
            "merge_proxy_before": proxy_before,
            "merge_proxy_after": best["merge_proxy"],
            "checks": checks,
            "own_loss_first": first.get("own_loss"),
            "own_loss_last": last.get("own_loss"),
            "scaled_loss_first": first.get("scaled_loss"),
            "scaled_loss_last": last.get("scaled_loss"),
        }


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
        """See the class docstring."""
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


STRATEGIES: dict[str, type[Stage2]] = {"scale_adversarial": ScaleAdversarial, "negation": Negation}


def resolve_stage2(stage2: str | Stage2 | None, **legacy: Any) -> Stage2 | None:
    """A strategy from a name (``"scale_adversarial"``, ``"negation"``, ``"none"``), an object, or ``None``.

    ``legacy`` holds the per-strategy keyword arguments older versions took on the callback; only the chosen
    strategy's are used, and the others must be absent.

    Example:
        >>> resolve_stage2("negation", beta=0.5)
        Negation(beta=0.5, critical_fraction=0.1, small_fraction=0.1, granularity='block')
    """
    if stage2 is None or stage2 == "none":
        if legacy:
            raise ValueError(f"{sorted(legacy)} configure stage 2, but stage2 is {stage2!r}")
        return None
    if isinstance(stage2, Stage2):
        if legacy:
            raise ValueError(f"pass {sorted(legacy)} to the {type(stage2).__name__} object, not to the callback")
        return stage2
    if not isinstance(stage2, str) or stage2 not in STRATEGIES:
        raise ValueError(
            f"stage2 must be 'scale_adversarial', 'negation', 'none', None or a Stage2 object, got {stage2!r}"
        )
    cls = STRATEGIES[stage2]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    foreign = sorted(set(legacy) - accepted)
    if foreign:
        raise ValueError(f"{foreign} do not apply to stage2={stage2!r} (it takes {sorted(accepted)})")
    return cls(**legacy)

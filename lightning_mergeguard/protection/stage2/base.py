"""The stage-2 interface: :class:`Stage2Context` (what a strategy works on), :class:`Stage2`, and the guard rail."""

from __future__ import annotations

import functools
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
from lightning_mergeguard.parameters import DEFAULT_STAGE2_EXCLUDE
from lightning_mergeguard.quantization import write_format_
from lightning_mergeguard.validation import check_int, is_number

__all__ = ["DEFAULT_STAGE2_EXCLUDE", "DEFAULT_TOLERANCE", "Stage2", "Stage2Context"]

DEFAULT_TOLERANCE = 1.0
"""The guard rail's default: the largest drop of the owner's score stage 2 may cost, in points (one set of defaults
for the callback, ``protect_module``, ``protect_checkpoint`` and ``mergeguard-protect``)."""


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
        partners: Task vectors of other fine-tunes of the same base known to the trainer (a MergeProbe's donors),
            name -> (parameter name -> tensor); strategies that rehearse merges use them.
        keep_batches: Batches whose behaviour stage 2 must keep (a fingerprint's rows): they join the own loss.
        who: The entry point that runs stage 2, as its warnings name it.
        advice: What to change when stage 2 keeps no step, in that entry point's words.
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
    partners: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    keep_batches: Sequence[Any] = ()
    who: str = "MergeGuardCallback"
    advice: str = "Try more stage-2 steps, a lower lr or a larger tolerance (stage2=...(steps=, lr=), tolerance=)."


class Stage2(ABC):
    """A stage-2 strategy: perturb ``ctx.params`` in place within the guard rail; return (score after, report)."""

    name: str = "stage2"
    supports_sharded: bool = False
    """Whether the strategy runs on FSDP2-sharded parameters (elementwise maths on each rank's shard)."""

    @abstractmethod
    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """Apply the strategy; return the score of the weights kept and what the report should hold.

        Args:
            ctx: What stage 2 may use: the module, the parameters it may change, the reference, batches, the metric.
        """

    def settings(self) -> dict[str, Any]:
        """The strategy's settings (for the protection report).

        Returns:
            A JSON-ready dict of the constructor's arguments and the strategy's name.
        """
        return {"method": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "method")
        return f"{type(self).__name__}({args})"


def _scores_at(
    ctx: Stage2Context,
    writes: Sequence[Callable[[Mapping[str, Tensor]], None]],
    tensors: Mapping[str, Tensor] | None = None,
) -> list[float]:
    """The metric after each ``write(live)`` of other weights; the live weights restored.

    ``tensors`` are the weights written and restored (default ``ctx.params``).
    """
    tensors = ctx.params if tensors is None else tensors
    with torch.no_grad():
        live = {n: p.detach().clone() for n, p in tensors.items()}
    scores = []
    try:
        for write in writes:
            with torch.no_grad():
                write(live)
            scores.append(ctx.metric())
    finally:
        with torch.no_grad():
            for n, p in tensors.items():
                p.copy_(live[n])
    return scores


def deployed_scores(ctx: Stage2Context, formats: Sequence[str]) -> dict[str, float]:
    """The own score (``ctx.metric``) of the whole model in each weight format; the weights restored after.

    Every floating matrix is quantized, as users quantize the model, not only the parameters stage 2 changes.
    """
    if not formats:
        return {}
    tensors = dict(ctx.module.named_parameters())
    writes = [functools.partial(write_format_, tensors, fmt=fmt) for fmt in formats]
    return dict(zip(formats, _scores_at(ctx, writes, tensors)))


class _GuardRail:
    """Keeps the best checked weights: within tolerance, and protecting better than the stage-1 weights.

    A check is eligible if its score is within ``tolerance`` of the starting score and its merge proxy (lower is
    better protected) is below the stage-1 weights'. With ``deployed`` weight formats, the whole model's score in each
    format (every floating matrix quantized, embeddings and heads too, as users deploy it) must also be within
    ``tolerance`` of the stage-1 weights' in that format (one validation pass per format and check).
    Eligible checks whose proxy is within ``tolerance`` points of the lowest count as equally protective. Among them
    a check that *holds* every deployed format (within ``tolerance`` of the full-precision score stage 2 started from,
    which the stage-1 weights may not reach in a format: stage 1 itself can cost under 4-bit) comes first, then the
    best own score, then the best mean score in the deployed formats.
    """

    def __init__(self, ctx: Stage2Context, proxy: Callable[[], float], deployed: Sequence[str] = ()) -> None:
        self.ctx, self.proxy, self.deployed = ctx, proxy, tuple(deployed)
        self.checks: list[dict[str, Any]] = []
        self.lowest = math.inf
        with torch.no_grad():
            self.weights = {n: p.detach().clone() for n, p in ctx.params.items()}
        self.proxy_before = proxy()  # the stage-1 weights, kept if no check is eligible
        self.deployed_before = self._deployed_scores()
        self.best: dict[str, Any] = {"step": 0, "score": ctx.before, "merge_proxy": self.proxy_before}
        if self.deployed:
            self.best["deployed"] = dict(self.deployed_before)

    def _deployed_scores(self) -> dict[str, float]:
        """The own score of the whole model in each deployed weight format (:func:`deployed_scores`)."""
        return deployed_scores(self.ctx, self.deployed)

    def _held(self, check: Mapping[str, Any]) -> dict[str, float]:
        """The deployed formats a check loses more than the tolerance in, against the full-precision starting score."""
        return {f: v for f, v in (check.get("deployed") or {}).items() if self.ctx.before - v > self.ctx.tolerance}

    def _quality(self, check: Mapping[str, Any]) -> tuple[bool, float, float]:
        """How well a check keeps the owner's score: every format held, the own score, the mean deployed score."""
        deployed = check.get("deployed") or {}
        return not self._held(check), float(check["score"]), sum(deployed.values()) / max(1, len(deployed))

    def holds(self) -> bool:
        """Whether the kept weights are a check that holds the score in every deployed format."""
        return self.best["step"] > 0 and not self._held(self.best)

    def check(self, step: int) -> None:
        """Score the live weights (own score, merge proxy, deployed formats); keep them if the best so far."""
        entry: dict[str, Any] = {"step": step, "score": self.ctx.metric(), "merge_proxy": self.proxy()}
        if self.deployed:
            entry["deployed"] = self._deployed_scores()
        self.checks.append(entry)
        if self.ctx.before - entry["score"] > self.ctx.tolerance or entry["merge_proxy"] >= self.proxy_before:
            return  # costs too much, or protects no better than the stage-1 weights
        if any(self.deployed_before[f] - v > self.ctx.tolerance for f, v in entry.get("deployed", {}).items()):
            return  # costs too much in a format the owner's users deploy
        self.lowest = min(self.lowest, entry["merge_proxy"])
        band = self.lowest + self.ctx.tolerance
        if entry["merge_proxy"] > band:
            return
        best = self.best
        if best["step"] == 0 or best["merge_proxy"] > band or self._quality(entry) > self._quality(best):
            best.update(entry)
            with torch.no_grad():
                for n, p in self.ctx.params.items():
                    self.weights[n].copy_(p)

    def _in_formats(self) -> str:
        """The deployed formats that no check kept within the tolerance, for the warning (one more reason)."""
        best = {f: max((c["deployed"][f] for c in self.checks), default=math.nan) for f in self.deployed}
        lost = {f: b for f, b in best.items() if not self.deployed_before[f] - b <= self.ctx.tolerance}
        if not lost:
            return ""
        named = ", ".join(f"{f} (stage-1 weights {self.deployed_before[f]:.1f}, best check {b:.1f})"
                          for f, b in lost.items())  # fmt: skip
        return f" and within it in each deployed format, which no check was in {named}"

    def finish(self, steps: int) -> tuple[float, dict[str, Any]]:
        """Check the final weights if the last check was earlier, restore the kept weights; (score, report).

        ``steps`` is the number of steps the loop ran.
        """
        if steps and (not self.checks or self.checks[-1]["step"] != steps):
            self.check(steps)
        with torch.no_grad():
            for n, p in self.ctx.params.items():
                p.copy_(self.weights[n])
        steps_used = int(self.best["step"])
        if steps_used == 0:
            self.ctx.warn(
                f"{self.ctx.who}: no stage-2 weights stayed within {self.ctx.tolerance} points while lowering "
                f"the merge proxy below the weights it started from{self._in_formats()}; kept those (NOT protected "
                f"by stage 2). {self.ctx.advice}"
            )
        report: dict[str, Any] = {
            "steps_used": steps_used,
            "merge_proxy_before": self.proxy_before,
            "merge_proxy_after": self.best["merge_proxy"],
            "checks": self.checks,
        }
        if self.deployed:
            short = self._held(self.best)
            report["deployed_before"] = self.deployed_before
            report["deployed_after"] = self.best["deployed"]
            report["deployed_short"] = short
            if steps_used and short:
                named = ", ".join(f"{f} {v:.1f}" for f, v in short.items())
                self.ctx.warn(
                    f"{self.ctx.who}: the kept stage-2 weights score {named}, more than {self.ctx.tolerance} points "
                    f"below the full-precision {self.ctx.before:.1f}, after {steps} steps (the stage-1 weights: "
                    + ", ".join(f"{f} {self.deployed_before[f]:.1f}" for f in short)
                    + "). Users who run the model in those formats lose that much; more validation data, more steps "
                    "or a lower lr may hold them."
                )
        return float(self.best["score"]), report


def _numbers(value: Any, what: str) -> tuple[float, ...]:
    """A list of finite numbers; one number given alone is a list of one."""
    if is_number(value):
        return (float(value),)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(is_number(v) for v in value):
        raise ValueError(f"{what} must be a number or a list of finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _weight_range(value: Any, what: str, upper: float) -> tuple[float, float]:
    """A ``(low, high)`` range in ``(0, upper]``; one number given alone is the range ``(x, x)``."""
    values = _numbers(value, what)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0 < values[0] <= values[1] <= upper:
        raise ValueError(
            f"{what} must be a number or a range (low, high) with 0 < low <= high <= {upper}, got {value!r}"
        )
    return values[0], values[1]


def _check_common(steps: Any, clip: float, lr: float, checks: Any) -> None:
    check_int(steps, "steps")
    if not (clip > 0 and lr > 0):
        raise ValueError(f"clip and lr must be > 0, got clip={clip!r}, lr={lr!r}")
    check_int(checks, "checks", low=1, want="a positive integer")


def _guarded_loop(
    ctx: Stage2Context,
    proxy: Callable[[], float],
    steps: int,
    checks: int,
    loop: Callable[[Iterator[Any], dict[str, Any]], object],
    losses: tuple[str, ...],
    deployed: Sequence[str] = (),
) -> tuple[float, dict[str, Any], dict[str, float | None]]:
    """Run an optimising loop on ``steps`` of the context's batches, the guard rail checking its weights.

    ``loop(batches, settings)`` runs it, with ``settings`` the keyword arguments every loop takes from the context
    and the rail (which checks every ``ceil(steps / checks)`` steps, against ``proxy``), ``steps`` among them. With
    ``deployed`` weight formats, the loop also minimises the own loss in them and the rail holds each to the
    tolerance; if no check holds every format within the tolerance of the full-precision score by step ``steps``,
    the loop goes on, for at most ``steps`` more, until the first check that does (the loop's ``check`` returns
    ``True`` to stop it).

    Returns:
        The rail's score and report, and the first and last of each logged loss in ``losses``.
    """
    history: list[dict[str, float]] = []
    rail = _GuardRail(ctx, proxy, deployed)
    if deployed:
        losses = (*losses, "deployed_loss")
    limit = 2 * steps if deployed else steps

    def check(step: int) -> bool:
        rail.check(step)
        return step >= steps and rail.holds()

    settings = {
        "steps": limit,
        "grad_reduce": ctx.grad_reduce,
        "check_every": max(1, math.ceil(steps / checks)),
        "check": check,
        "progress": ctx.progress,
        "forward_context": ctx.forward_context,
        "history": history,
        "keep_batches": ctx.keep_batches,
        "deployed": tuple(deployed),
    }
    loop(itertools.islice(ctx.batches, limit), settings)
    score, report = rail.finish(len(history) if history else steps)
    report["steps_run"] = len(history)
    return score, report, _first_and_last(history, *losses)


def _first_and_last(history: Sequence[Mapping[str, float]], *keys: str) -> dict[str, float | None]:
    """``<key>_first`` and ``<key>_last`` of each logged loss, for the report (``None`` when nothing ran)."""
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {f"{k}_{when}": entry.get(k) for k in keys for when, entry in (("first", first), ("last", last))}

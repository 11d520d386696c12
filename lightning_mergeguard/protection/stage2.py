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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.evaluation import LossFn
from lightning_mergeguard.parameters import group_layers
from lightning_mergeguard.protection.importance import layer_importance
from lightning_mergeguard.protection.negation import apply_negation_, critical_layers, negation_mask
from lightning_mergeguard.protection.neighbourhood import (
    MERGE_FAMILIES,
    MergeDraw,
    draw_merge,
    merge_with_owner,
    neighbourhood_adversarial_,
    surrogate_task_vectors,
)
from lightning_mergeguard.protection.scale_adversarial import scale_adversarial_, write_scaled_

__all__ = [
    "DEFAULT_STAGE2_EXCLUDE",
    "MergeNeighbourhood",
    "Negation",
    "ScaleAdversarial",
    "Stage2",
    "Stage2Context",
    "amplify_checked",
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
        partners: Task vectors of other fine-tunes of the same base known to the trainer (a MergeProbe's donors),
            name -> (parameter name -> tensor); strategies that rehearse merges use them.
        keep_batches: Batches whose behaviour stage 2 must keep (a fingerprint's rows): they join the own loss.
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


class Stage2(ABC):
    """A stage-2 strategy: perturb ``ctx.params`` in place within the guard rail; return (score after, report)."""

    name: str = "stage2"
    supports_sharded: bool = False
    """Whether the strategy runs on FSDP2-sharded parameters (elementwise maths on each rank's shard)."""

    @abstractmethod
    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """Apply the strategy; return the score of the weights kept and what the report should hold."""

    def settings(self) -> dict[str, Any]:
        """The strategy's settings (for the protection report)."""
        return {"method": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "method")
        return f"{type(self).__name__}({args})"


def _scores_at(ctx: Stage2Context, writes: Sequence[Callable[[Mapping[str, Tensor]], None]]) -> list[float]:
    """The metric after each ``write(live)`` of other weights into ``ctx.params``; the live weights restored."""
    with torch.no_grad():
        live = {n: p.detach().clone() for n, p in ctx.params.items()}
    scores = []
    try:
        for write in writes:
            with torch.no_grad():
                write(live)
            scores.append(ctx.metric())
    finally:
        with torch.no_grad():
            for n, p in ctx.params.items():
                p.copy_(live[n])
    return scores


class _GuardRail:
    """Keeps the best checked weights: within tolerance, and protecting better than the stage-1 weights.

    A check is eligible if its score is within ``tolerance`` of the starting score and its merge proxy (lower is
    better protected) is below the stage-1 weights'. Eligible checks whose proxy is within ``tolerance`` points of
    the lowest count as equally protective, and the one with the best own score is kept.
    """

    def __init__(self, ctx: Stage2Context, proxy: Callable[[], float]) -> None:
        self.ctx, self.proxy = ctx, proxy
        self.checks: list[dict[str, float]] = []
        self.lowest = math.inf
        with torch.no_grad():
            self.weights = {n: p.detach().clone() for n, p in ctx.params.items()}
        self.proxy_before = proxy()  # the stage-1 weights, kept if no check is eligible
        self.best: dict[str, float] = {"step": 0, "score": ctx.before, "merge_proxy": self.proxy_before}

    def check(self, step: int) -> None:
        """Score the live weights (own score and merge proxy) and keep them if they are the best so far."""
        entry = {"step": step, "score": self.ctx.metric(), "merge_proxy": self.proxy()}
        self.checks.append(entry)
        if self.ctx.before - entry["score"] > self.ctx.tolerance or entry["merge_proxy"] >= self.proxy_before:
            return  # costs too much, or protects no better than the stage-1 weights
        self.lowest = min(self.lowest, entry["merge_proxy"])
        band = self.lowest + self.ctx.tolerance
        if entry["merge_proxy"] > band:
            return
        best = self.best
        if best["step"] == 0 or best["merge_proxy"] > band or entry["score"] > best["score"]:
            best.update(entry)
            with torch.no_grad():
                for n, p in self.ctx.params.items():
                    self.weights[n].copy_(p)

    def finish(self, steps: int) -> tuple[float, dict[str, Any]]:
        """Check the final weights if the last check was earlier, restore the kept weights; (score, report)."""
        if steps and (not self.checks or self.checks[-1]["step"] != steps):
            self.check(steps)
        with torch.no_grad():
            for n, p in self.ctx.params.items():
                p.copy_(self.weights[n])
        steps_used = int(self.best["step"])
        if steps_used == 0:
            self.ctx.warn(
                f"MergeGuardCallback: no stage-2 weights stayed within {self.ctx.tolerance} points while lowering "
                "the merge proxy below the stage-1 weights'; kept the stage-1 weights. Try more steps, a lower lr "
                "or a larger tolerance."
            )
        return float(self.best["score"]), {
            "steps_used": steps_used,
            "merge_proxy_before": self.proxy_before,
            "merge_proxy_after": self.best["merge_proxy"],
            "checks": self.checks,
        }


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
        if not _is_number(scales) and (isinstance(scales, (str, bytes)) or not scales):
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
        """See the class docstring."""
        params, ref = ctx.params, ctx.reference
        scale = self.proxy_scale

        def proxy() -> float:
            return _scores_at(ctx, [lambda live: write_scaled_(params, ref, live, scale)])[0]

        history: list[dict[str, float]] = []
        rail = _GuardRail(ctx, proxy)
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
            check=rail.check,
            progress=ctx.progress,
            forward_context=ctx.forward_context,
            history=history,
            keep_batches=ctx.keep_batches,
        )
        score, report = rail.finish(self.steps)
        first, last = history[0] if history else {}, history[-1] if history else {}
        return score, {
            **report,
            "merge_proxy_scale": scale,
            "own_loss_first": first.get("own_loss"),
            "own_loss_last": last.get("own_loss"),
            "scaled_loss_first": first.get("scaled_loss"),
            "scaled_loss_last": last.get("scaled_loss"),
        }


class MergeNeighbourhood(Stage2):
    """Keep the model good while the merges around it, owner-weighted ones included, are bad.

    Each of ``steps`` Adam steps draws ``draws`` merges of the live weights with partner task vectors
    (:func:`~lightning_mergeguard.protection.neighbourhood.draw_merge`: a family among ``methods``, the owner's
    weight uniform in ``owner_weights``, a random non-empty subset of partners at weights uniform in
    ``partner_weights``, a density in ``densities``) and minimises ``L(theta) - mean min(L(merge), clip)`` on the
    owner's batches (:func:`~lightning_mergeguard.protection.neighbourhood.neighbourhood_adversarial_`).

    Partners: the fine-tunes in ``partners`` (paths of other fine-tunes of the same base), the task vectors of a
    :class:`~lightning_mergeguard.MergeProbe`'s donors when one is attached (``use_probe_donors``), and
    ``surrogates`` random low-rank task vectors with the norm of the owner's own (by default three when there is no
    real partner, none otherwise). Measured on the vision track of ``benchmarks/protection.py --grid`` (seeded;
    ``benchmarks/results/protection_grid.md``): with two real partners, task arithmetic of the owner at 1 and the
    partners at 0.3 falls to 15.6% of the owner's task (89.7% unprotected), but the owner at 1 with one partner at
    0.1 keeps 85-87% with a partner it rehearsed and 89.6-90.1% with one it never saw (own 90.0%); with surrogates
    only, no step stayed within the tolerance.

    The guard rail checks every ``ceil(steps / checks)`` steps: the own score, and the merge proxy, the highest
    score among the ``proxies`` merges (task arithmetic, ``(owner weight, partner weight)`` with every partner);
    at most ``(1 + len(proxies)) * (1 + checks)`` validation passes (27 at the defaults). Selection as in
    :class:`ScaleAdversarial`.

    Args:
        steps: Optimisation steps.
        draws: Merges drawn per step.
        owner_weights: Range of the owner's weight (one number: that weight).
        partner_weights: Range of each partner's weight (one number: that weight).
        methods: Merge families drawn (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``), or one.
        densities: Range of TIES/DARE densities (one number: that density).
        partners: Paths of other fine-tunes of the same base (safetensors, HF directories, ...).
        use_probe_donors: Also rehearse against an attached MergeProbe's donors.
        surrogates: Random partners added (``None``: 3 without real partners, else 0).
        surrogate_rank: Rank of the surrogates' matrices (``None``: dense).
        clip: Loss ceiling at a drawn merge.
        lr: Adam learning rate.
        checks: Guard-rail checks.
        proxies: ``(owner weight, partner weight)`` of the task-arithmetic merges the guard rail scores, or one pair.
        seed: Seed of the draws and surrogates.

    Example:
        >>> MergeNeighbourhood(steps=100).settings()["owner_weights"]
        (0.2, 1.0)
    """

    name = "merge_neighbourhood"

    def __init__(
        self,
        steps: int = 300,
        draws: int = 2,
        owner_weights: float | Sequence[float] = (0.2, 1.0),
        partner_weights: float | Sequence[float] = (0.1, 1.0),
        methods: str | Sequence[str] = MERGE_FAMILIES,
        densities: float | Sequence[float] = (0.2, 0.8),
        partners: Sequence[str] = (),
        use_probe_donors: bool = True,
        surrogates: int | None = None,
        surrogate_rank: int | None = 4,
        clip: float = 5.0,
        lr: float = 5e-4,
        checks: int = 8,
        proxies: Sequence[float] | Sequence[Sequence[float]] = ((1.0, 0.3), (0.3, 0.3)),
        seed: int = 0,
    ) -> None:
        _check_common(steps, clip, lr, checks)
        if not (isinstance(draws, int) and draws >= 1):
            raise ValueError(f"draws must be a positive integer, got {draws!r}")
        # One number given alone is a fixed weight (density); one string is one method; one pair is one proxy.
        owner_weights = _weight_range(owner_weights, "owner_weights", 5.0)
        partner_weights = _weight_range(partner_weights, "partner_weights", 5.0)
        densities = _weight_range(densities, "densities", 1.0)
        if isinstance(methods, str):
            methods = [methods]
        if isinstance(proxies, Sequence) and len(proxies) == 2 and all(_is_number(p) for p in proxies):
            proxies = [proxies]
        unknown = [m for m in methods if m not in MERGE_FAMILIES]
        if not methods or unknown:
            raise ValueError(f"methods must be a non-empty subset of {MERGE_FAMILIES}, got {list(methods)!r}")
        if surrogates is not None and not (isinstance(surrogates, int) and surrogates >= 0):
            raise ValueError(f"surrogates must be an integer >= 0 or None, got {surrogates!r}")
        if surrogate_rank is not None and not (isinstance(surrogate_rank, int) and surrogate_rank >= 1):
            raise ValueError(f"surrogate_rank must be a positive integer or None, got {surrogate_rank!r}")
        if isinstance(partners, str):
            raise ValueError("partners must be a list of paths, not one string")
        pairs = [isinstance(p, Sequence) and len(p) == 2 and all(_is_number(x) for x in p) for p in proxies]
        if not proxies or not all(pairs) or any(not (p[0] > 0 and p[1] >= 0) for p in proxies):
            raise ValueError(
                f"proxies must be a non-empty list of (owner weight > 0, partner weight >= 0), got {proxies!r}"
            )
        self.steps = steps
        self.draws = draws
        self.owner_weights = (float(owner_weights[0]), float(owner_weights[1]))
        self.partner_weights = (float(partner_weights[0]), float(partner_weights[1]))
        self.methods = tuple(methods)
        self.densities = (float(densities[0]), float(densities[1]))
        self.partners = [str(p) for p in partners]
        self.use_probe_donors = use_probe_donors
        self.surrogates = surrogates
        self.surrogate_rank = surrogate_rank
        self.clip = float(clip)
        self.lr = float(lr)
        self.checks = checks
        self.proxies = tuple((float(a), float(b)) for a, b in proxies)
        self.seed = seed

    def partner_task_vectors(self, ctx: Stage2Context) -> dict[str, dict[str, Tensor]]:
        """Every partner rehearsed, as task vectors on the CPU: given paths, probe donors, surrogates."""
        from lightning_mergeguard.probing import donor_task_vector

        params, ref = ctx.params, ctx.reference
        cpu = torch.device("cpu")
        out: dict[str, dict[str, Tensor]] = {}
        count = self.surrogates
        for i, path in enumerate(self.partners):
            out[f"partner{i}"], _ = donor_task_vector(
                path, path, params, ref, device=cpu, dtype=torch.float32, who="MergeNeighbourhood: partner"
            )
        if self.use_probe_donors:
            for name, tau in ctx.partners.items():
                missing = [n for n in params if n not in tau]
                if missing:
                    raise ValueError(f"probe donor {name!r} lacks {missing[:3]} (stage 2 perturbs them)")
                out[f"probe:{name}"] = {n: tau[n] for n in params}
        if count is None:
            count = 0 if out else 3
        for j, tv in enumerate(
            surrogate_task_vectors(params, ref, count, self.seed, device=cpu, rank=self.surrogate_rank)
        ):
            out[f"surrogate{j}"] = tv
        if not out:
            raise ValueError(
                "MergeNeighbourhood has no partners: pass partners=, attach a MergeProbe, or keep surrogates > 0"
            )
        return out

    def run(self, ctx: Stage2Context) -> tuple[float, dict[str, Any]]:
        """See the class docstring."""
        params, ref = ctx.params, ctx.reference
        partners = self.partner_task_vectors(ctx)
        taus = list(partners.values())
        k = len(taus)

        def write_merge(draw: MergeDraw) -> Callable[[Mapping[str, Tensor]], None]:
            def write(live: Mapping[str, Tensor]) -> None:
                for n, p in params.items():
                    parts = [tv[n].to(p.device, non_blocking=True) for tv in taus]
                    p.copy_(merge_with_owner(ref[n], live[n], parts, draw)[0])

            return write

        def proxy() -> float:
            draws = [MergeDraw("task_arithmetic", owner, (weight,) * k) for owner, weight in self.proxies]
            return max(_scores_at(ctx, [write_merge(d) for d in draws]))

        def sample(rng: Any) -> MergeDraw:
            return draw_merge(rng, k, self.owner_weights, self.partner_weights, self.methods, self.densities)

        history: list[dict[str, float]] = []
        rail = _GuardRail(ctx, proxy)
        neighbourhood_adversarial_(
            ctx.module,
            params,
            ref,
            taus,
            itertools.islice(ctx.batches, self.steps),
            ctx.loss_fn,
            steps=self.steps,
            draws=self.draws,
            sample=sample,
            clip=self.clip,
            lr=self.lr,
            keep_batches=ctx.keep_batches,
            grad_reduce=ctx.grad_reduce,
            check_every=max(1, math.ceil(self.steps / self.checks)),
            check=rail.check,
            progress=ctx.progress,
            seed=self.seed,
            forward_context=ctx.forward_context,
            history=history,
        )
        score, report = rail.finish(self.steps)
        first, last = history[0] if history else {}, history[-1] if history else {}
        return score, {
            **report,
            "partners": list(partners),
            "own_loss_first": first.get("own_loss"),
            "own_loss_last": last.get("own_loss"),
            "merged_loss_first": first.get("merged_loss"),
            "merged_loss_last": last.get("merged_loss"),
        }


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(value: Any, what: str) -> tuple[float, ...]:
    """A list of finite numbers; one number given alone is a list of one."""
    if _is_number(value):
        return (float(value),)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(_is_number(v) for v in value):
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
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (clip > 0 and lr > 0):
        raise ValueError(f"clip and lr must be > 0, got clip={clip!r}, lr={lr!r}")
    if not (isinstance(checks, int) and not isinstance(checks, bool) and checks >= 1):
        raise ValueError(f"checks must be a positive integer, got {checks!r}")


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


def amplify_checked(
    module: nn.Module, strength: float, ctx: Stage2Context, after: float, names: Collection[str] | None = None
) -> tuple[float, dict[str, Any]]:
    """Apply :func:`~lightning_mergeguard.protection.symmetry.amplify_module_` after stage 2, checked twice.

    First, on one training batch, each kind of symmetry must leave the recognised blocks' outputs unchanged
    (:func:`~lightning_mergeguard.protection.symmetry.symmetry_errors`); kinds that do not (a block that only looks
    like a known one) are left out with a warning. Then the guard rail's score: if it drops below
    ``ctx.before - ctx.tolerance``, the weights are put back and a warning says so. When no kind passes, or the
    forward pass cannot be checked, the model is left as stage 2 left it, with a warning.

    Args:
        module: The model, after stage 2.
        strength: Largest scale.
        ctx: The stage-2 context (its ``batches``, ``loss_fn``, ``metric``, ``before``, ``tolerance``, ``warn``).
        after: The score stage 2 left.
        names: Parameter names the symmetries may touch (``None``: all).

    Returns:
        The score kept, and the report entry (``strength``, ``applied``, groups, ``checked``, ``dropped``,
        ``score_before``, ``score_after``, ``reverted``; ``skipped``: why nothing was applied).
    """
    from lightning_mergeguard.protection.symmetry import amplify_module_, find_symmetries

    groups = find_symmetries(module, names)
    touched = {f.name for g in groups for f in g.factors}
    params = {n: p for n, p in module.named_parameters() if n in touched}
    with torch.no_grad():
        saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}  # for a revert; off the accelerator
    batch = next(ctx.batches, None)

    def forward() -> None:
        with ctx.forward_context():
            ctx.loss_fn(module, batch)

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


STRATEGIES: dict[str, type[Stage2]] = {
    "scale_adversarial": ScaleAdversarial,
    "merge_neighbourhood": MergeNeighbourhood,
    "negation": Negation,
}


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
        raise ValueError(f"stage2 must be one of {[*STRATEGIES, 'none']}, None or a Stage2 object, got {stage2!r}")
    cls = STRATEGIES[stage2]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    foreign = sorted(set(legacy) - accepted)
    if foreign:
        raise ValueError(f"{foreign} do not apply to stage2={stage2!r} (it takes {sorted(accepted)})")
    return cls(**legacy)

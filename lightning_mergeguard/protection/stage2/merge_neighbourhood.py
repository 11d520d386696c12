"""Stage 2 against the merge neighbourhood: rehearse the merges a free-rider could choose, not three points.

A merge that includes the protected model applies, tensor by tensor,

``merged = theta_pre + c * tau_own + r``

where ``tau_own = theta - theta_pre``, ``c`` is an elementwise coefficient (the owner's weight, times the TIES trim
and sign-election masks or the DARE keep mask and rescale, divided by the normaliser) and ``r`` is what the
partners contribute. For a drawn merge (method, owner weight, partner weights, density) :func:`merge_with_owner`
computes ``merged`` with mergekit's semantics and ``c``; since the masks are piecewise constant, ``c * grad L`` at
the merged point is the exact gradient of ``L(merged)`` with respect to ``theta`` almost everywhere for task
arithmetic and TIES. For DARE it holds the drawn mask and the L1 rescale factor fixed (the factor depends on the
whole tensor; its rank-one share of the gradient is left out).

:func:`neighbourhood_adversarial_` minimises ``L(theta) - mean_draws min(L(merged_draw), clip)`` over random draws:
owner weights over a continuous range up to and including 1, partner task vectors at weights in about [0.1, 1],
through task arithmetic (normalised or not), TIES and DARE. Partners are the fine-tunes the user passes, or
*surrogates* (:func:`surrogate_task_vectors`): per-tensor random directions with the norm of the owner's own task
vector, so the model learns to be fragile to any added task vector, not to three known ones.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.donors import donor_task_vector
from lightning_mergeguard.evaluation import LossFn
from lightning_mergeguard.merging.methods.consensus import sign_consensus_mask
from lightning_mergeguard.merging.methods.sparsify import magnitude_prune, random_prune
from lightning_mergeguard.protection.stage2._adversarial import add_grads_, adversarial_loop
from lightning_mergeguard.protection.stage2.base import (
    Stage2,
    Stage2Context,
    _check_common,
    _guarded_loop,
    _scores_at,
    _weight_range,
)
from lightning_mergeguard.quantization import check_formats
from lightning_mergeguard.validation import is_number

__all__ = [
    "MERGE_FAMILIES",
    "MergeDraw",
    "MergeNeighbourhood",
    "draw_merge",
    "merge_with_owner",
    "neighbourhood_adversarial_",
    "surrogate_task_vectors",
]


MERGE_FAMILIES: tuple[str, ...] = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
"""The merge families rehearsed (mergekit's method names)."""


@dataclass(frozen=True)
class MergeDraw:
    """One merge of the neighbourhood.

    Attributes:
        method: One of :data:`MERGE_FAMILIES`.
        owner_weight: The protected model's weight.
        partner_weights: One weight per partner task vector (``0`` leaves that partner out).
        density: Kept fraction for TIES trimming / DARE drop (ignored by task arithmetic).
        normalize: Divide by the (agreeing) weights' sum, as mergekit's ``normalize``.
    """

    method: str
    owner_weight: float
    partner_weights: tuple[float, ...] = ()
    density: float = 1.0
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.method not in MERGE_FAMILIES:
            raise ValueError(f"method must be one of {MERGE_FAMILIES}, got {self.method!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")


def draw_merge(
    rng: random.Random,
    n_partners: int,
    owner_weights: tuple[float, float] = (0.2, 1.0),
    partner_weights: tuple[float, float] = (0.1, 1.0),
    methods: Sequence[str] = MERGE_FAMILIES,
    densities: tuple[float, float] = (0.2, 0.8),
) -> MergeDraw:
    """A random merge: uniform owner weight, a random non-empty subset of partners at uniform weights.

    Example:
        >>> d = draw_merge(random.Random(0), 2, methods=("ties",))
        >>> d.method, 0.2 <= d.owner_weight <= 1.0, len(d.partner_weights)
        ('ties', True, 2)
    """
    method = rng.choice(list(methods))
    owner = rng.uniform(*owner_weights)
    weights = [0.0] * n_partners
    if n_partners:
        for i in rng.sample(range(n_partners), rng.randint(1, n_partners)):
            weights[i] = rng.uniform(*partner_weights)
    density = rng.uniform(*densities) if method != "task_arithmetic" else 1.0
    normalize = rng.random() < 0.5 if method in ("task_arithmetic", "ties") else False
    return MergeDraw(method, owner, tuple(weights), density, normalize)


def merge_with_owner(
    base: Tensor,
    owner: Tensor,
    partners: Sequence[Tensor],
    draw: MergeDraw,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One tensor of the drawn merge, and its elementwise derivative with respect to ``owner``.

    Semantics are mergekit's (TIES: magnitude trim, sum sign election, disjoint mean normalised by the agreeing
    weights; DARE: Bernoulli drop with L1 rescale; ``lambda`` 1).

    Args:
        base: ``theta_pre``'s tensor.
        owner: The protected model's tensor (``theta``).
        partners: The partners' task vectors (``theta_j - theta_pre``), one per entry of ``draw.partner_weights``.
        draw: The merge.
        generator: Random generator for DARE's drop.

    Returns:
        ``(merged, coefficient)``: ``merged = base + coefficient * (owner - base) + partner part``.

    Example:
        >>> base, owner = torch.zeros(2), torch.tensor([1.0, -2.0])
        >>> merged, c = merge_with_owner(base, owner, [torch.ones(2)], MergeDraw("task_arithmetic", 1.0, (0.5,)))
        >>> merged, c
        (tensor([ 1.5000, -1.5000]), tensor([1., 1.]))
    """
    if len(partners) != len(draw.partner_weights):
        raise ValueError(f"got {len(partners)} partner tensors for {len(draw.partner_weights)} partner weights")
    used = [(t, w) for t, w in zip(partners, draw.partner_weights) if w != 0]
    tau = owner - base
    deltas = [tau, *(t.to(tau.dtype) for t, _ in used)]
    weights = [draw.owner_weight, *(w for _, w in used)]
    if draw.method == "ties":
        kept = [magnitude_prune(d, draw.density) for d in deltas]
    elif draw.method.startswith("dare"):
        kept = [random_prune(d, draw.density, "l1", generator) for d in deltas]
    else:
        kept = deltas
    # kept[0] = factor * tau elementwise (a mask, times DARE's rescale): the owner's share of the derivative.
    factor = torch.where(tau != 0, kept[0] / torch.where(tau != 0, tau, 1), 0.0)
    w = torch.tensor(weights, dtype=tau.dtype, device=tau.device).reshape(-1, *([1] * tau.dim()))
    weighted = torch.stack(kept) * w
    if draw.method in ("ties", "dare_ties"):
        agree = sign_consensus_mask(weighted, "sum").to(tau.dtype)
        weighted = weighted * agree
        divisor = (w * agree).sum(0)
        divisor = torch.where(divisor == 0, 1, divisor)
    else:
        agree = torch.ones_like(weighted[:1])
        total = float(sum(weights))
        divisor = torch.full_like(tau, total if abs(total) >= 1e-8 else 1.0)
    mixed = weighted.sum(0)
    coefficient = draw.owner_weight * factor * agree[0]
    if draw.normalize:
        mixed = mixed / divisor
        coefficient = coefficient / divisor
    return base + mixed, coefficient


@torch.no_grad()
def surrogate_task_vectors(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    count: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    rank: int | None = 4,
) -> list[dict[str, Tensor]]:
    """Partners the owner does not have: per tensor, random directions with the norm of the owner's task vector.

    Fine-tuning updates of matrices are close to low rank, so by default a matrix's direction is a random rank-
    ``rank`` product ``A @ B`` (``None``: a dense Gaussian direction); other tensors get dense directions.

    Args:
        params: The owner's weights.
        reference: ``theta_pre`` for the same names.
        count: Number of surrogate partners.
        seed: Seed of the directions.
        device: Where to keep them (default: each parameter's device).

        rank: Rank of the matrices' directions (``None``: dense).

    Returns:
        ``count`` task vectors (name -> tensor).

    Example:
        >>> tv = surrogate_task_vectors({"w": torch.ones(4)}, {"w": torch.zeros(4)}, 2)
        >>> len(tv), round(float(tv[0]["w"].norm()), 4)
        (2, 2.0)
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 or None, got {rank}")
    out: list[dict[str, Tensor]] = [{} for _ in range(count)]
    for name, p in params.items():
        tau = p.detach() - reference[name]
        norm = tau.float().norm()
        gen = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
        for j in range(count):
            if rank is not None and p.dim() == 2 and min(p.shape) > rank:
                a = torch.randn(p.shape[0], rank, generator=gen, device=p.device)
                d = a @ torch.randn(rank, p.shape[1], generator=gen, device=p.device)
            else:
                d = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            d = d * (norm / d.norm().clamp_min(1e-12))
            out[j][name] = d.to(dtype=p.dtype, device=device or p.device)
    return out


def neighbourhood_adversarial_(
    module: nn.Module,
    params: Mapping[str, nn.Parameter],
    reference: Mapping[str, Tensor],
    partners: Sequence[Mapping[str, Tensor]],
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    steps: int = 300,
    draws: int = 2,
    sample: Callable[[random.Random], MergeDraw] | None = None,
    clip: float = 5.0,
    lr: float = 1e-3,
    keep_batches: Sequence[Any] = (),
    grad_reduce: Callable[[Tensor], Tensor] | None = None,
    check_every: int = 0,
    check: Callable[[int], bool | None] | None = None,
    progress: bool = False,
    seed: int = 0,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    history: list[dict[str, float]] | None = None,
    deployed: Sequence[str] = (),
) -> list[dict[str, float]]:
    """Run the neighbourhood optimisation in place on ``params``.

    Each step: the owner's loss on one batch (plus, with ``keep_batches``, the loss on those batches, e.g. the
    fingerprint's rows, so their behaviour is kept), minus the clipped loss of ``draws`` random merges of the
    live weights with the partners on the same batch. The module runs in eval mode.

    Args:
        module: The model.
        params: The parameters optimised.
        reference: ``theta_pre`` for those names.
        partners: Partner task vectors (name -> tensor, any device; moved per tensor).
        batches: The owner's training batches, cycled.
        loss_fn: ``(module, batch) -> loss``.
        steps: Adam steps.
        draws: Merges drawn per step.
        sample: ``rng -> MergeDraw``; default :func:`draw_merge` over all families and ``len(partners)`` partners.
        clip: Loss at a merge above which it is not pushed further.
        lr: Adam learning rate.
        keep_batches: Batches whose loss joins the own term every step.
        grad_reduce: Mean across processes (DDP) applied to each gradient.
        check_every: Call ``check(step)`` every this many steps (0: never).
        check: The guard rail's check; a true return stops the loop.
        progress: Show a progress bar.
        seed: Seed of the draws and of DARE's masks.
        forward_context: Context around forward passes (autocast).
        history: A list the per-step history is appended to.
        deployed: Weight formats whose own loss is also minimised, one per step in turn (straight-through).

    Returns:
        Per-step history: ``own_loss``, ``merged_loss`` (mean over draws).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    names = list(params)
    tensors = [params[n] for n in names]
    device = tensors[0].device
    sample = sample or (lambda rng: draw_merge(rng, len(partners)))
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)

    def adversary(step: int, batch: Any, live: Mapping[str, Tensor]) -> dict[str, float]:
        merged_total = 0.0
        for _ in range(draws):
            draw = sample(rng)
            coefficients = {}
            with torch.no_grad():
                for n in names:
                    parts = [tv[n].to(device, non_blocking=True) for tv in partners]
                    merged, coefficients[n] = merge_with_owner(reference[n], live[n], parts, draw, gen)
                    params[n].copy_(merged)
            with forward_context():
                loss_m = loss_fn(module, batch)
            value = float(loss_m.detach())
            merged_total += value
            if value >= clip:
                continue
            grads = torch.autograd.grad(-loss_m / draws, tensors, allow_unused=True)
            add_grads_(tensors, grads, [coefficients[n] for n in names])
        return {"merged_loss": merged_total / draws}

    return adversarial_loop(
        module, params, batches, loss_fn, adversary, steps=steps, lr=lr, device=device,
        desc="stage 2: merge neighbourhood", keep_batches=keep_batches, grad_reduce=grad_reduce,
        check_every=check_every, check=check, progress=progress, forward_context=forward_context, history=history,
        deployed=deployed,
    )  # fmt: skip


class MergeNeighbourhood(Stage2):
    """Keep the model good while the merges around it, owner-weighted ones included, are bad.

    Each of ``steps`` Adam steps draws ``draws`` merges of the live weights with partner task vectors
    (:func:`~lightning_mergeguard.protection.stage2.merge_neighbourhood.draw_merge`: a family among ``methods``, the
    owner's weight uniform in ``owner_weights``, a random non-empty subset of partners at weights uniform in
    ``partner_weights``, a density in ``densities``) and minimises ``L(theta) - mean min(L(merge), clip)`` on the
    owner's batches (:func:`~lightning_mergeguard.protection.stage2.merge_neighbourhood.neighbourhood_adversarial_`).

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
        deployed: Weight formats the owner's users run the model in, trained for and held by the guard rail as
            :class:`~lightning_mergeguard.protection.stage2.ScaleAdversarial`'s ``deployed`` are. Off by default.

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
        deployed: str | Sequence[str] = (),
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
        if isinstance(proxies, Sequence) and len(proxies) == 2 and all(is_number(p) for p in proxies):
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
        pairs = [isinstance(p, Sequence) and len(p) == 2 and all(is_number(x) for x in p) for p in proxies]
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
        self.deployed = check_formats(deployed)

    def surrogate_count(self, has_partners: bool) -> int:
        """Surrogates added: ``surrogates``, or by default three when there is no real partner, none otherwise.

        Args:
            has_partners: Whether real partners (paths or probe donors) are rehearsed.

        Returns:
            The number of surrogate partners.
        """
        if self.surrogates is not None:
            return self.surrogates
        return 0 if has_partners else 3

    def partner_task_vectors(self, ctx: Stage2Context) -> dict[str, dict[str, Tensor]]:
        """Every partner rehearsed, as task vectors on the CPU: given paths, probe donors, surrogates.

        Args:
            ctx: What stage 2 may use: the module, the parameters it may change, the reference, batches, the metric.

        Returns:
            ``partner name -> task vector`` (CPU tensors, the names of ``ctx.params``).

        Raises:
            ValueError: A partner or probe donor that lacks tensors stage 2 perturbs, or has other shapes.
        """
        params, ref = ctx.params, ctx.reference
        cpu = torch.device("cpu")
        out: dict[str, dict[str, Tensor]] = {}
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
        count = self.surrogate_count(bool(out))
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
        """Rehearse merges with the partners (or surrogates) under the guard rail; see :meth:`Stage2.run`.

        Args:
            ctx: The model and the parameters to perturb, theta_pre, the owner's batches, the metric, and the
                trainer's partners (a probe's donors) when ``use_probe_donors``.

        Returns:
            The score of the weights kept, and the report: partners, surrogates, the rail's checks and losses.
        """
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

        def loop(batches: Any, settings: dict[str, Any]) -> None:
            neighbourhood_adversarial_(
                ctx.module,
                params,
                ref,
                taus,
                batches,
                ctx.loss_fn,
                draws=self.draws,
                sample=sample,
                clip=self.clip,
                lr=self.lr,
                seed=self.seed,
                **settings,
            )

        losses_logged = ("own_loss", "merged_loss")
        score, report, losses = _guarded_loop(ctx, proxy, self.steps, self.checks, loop, losses_logged, self.deployed)
        return score, {**report, "partners": list(partners), **losses}

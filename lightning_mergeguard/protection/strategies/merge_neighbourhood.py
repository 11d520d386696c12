"""A stage 2 that rehearses the merge neighbourhood: owner-weighted merges with partner task vectors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.protection.neighbourhood import (
    MERGE_FAMILIES,
    MergeDraw,
    draw_merge,
    merge_with_owner,
    neighbourhood_adversarial_,
    surrogate_task_vectors,
)
from lightning_mergeguard.protection.strategies.base import (
    Stage2,
    Stage2Context,
    _check_common,
    _guarded_loop,
    _scores_at,
    _weight_range,
)
from lightning_mergeguard.validation import is_number

__all__ = ["MergeNeighbourhood"]


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
        from lightning_mergeguard.probing import donor_task_vector

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
        """See the class docstring.

        Args:
            ctx: What stage 2 may use: the module, the parameters it may change, the reference, batches, the metric.

        Returns:
            ``(score of the weights kept, the strategy's report entries)``.
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
                steps=self.steps,
                draws=self.draws,
                sample=sample,
                clip=self.clip,
                lr=self.lr,
                seed=self.seed,
                **settings,
            )

        score, report, losses = _guarded_loop(ctx, proxy, self.steps, self.checks, loop, ("own_loss", "merged_loss"))
        return score, {**report, "partners": list(partners), **losses}

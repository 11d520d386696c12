"""The merge neighbourhood a free-rider can choose from, as mergekit configs, and its worst case for the owner.

Used by ``protection.py --grid``. Every merge has the owner's model and the partners (other fine-tunes of the same
base); the grid covers uniform task arithmetic over a lambda range, owner-weighted task arithmetic and TIES
(normalised and not), TIES with the owner weighted several times the others, the study's TIES / DARE settings,
pairwise weight averaging and SLERP with each partner, DELLA and DELLA-linear, Model Stock, SCE, Karcher, NuSLERP
of the owner's and each partner's task vectors, task arithmetic of the owner at 1 with one partner, mergekit's newer
methods (Multi-SLERP owner-weighted, RAM and RAM+, Arcee Fusion of each partner into the owner and of the owner into
each partner, NearSwap of the owner with each partner), near copies (NearSwap at far smaller thresholds, the owner
at 1 with one partner at 0.01 or 0.0001), layer-wise merges (mergekit's gradient SLERP of the owner with
each partner, task arithmetic whose weights run across the layers, and passthrough frankenmerges stacking half of the
owner's layers on half of a partner's), AdaMerging, and a post-merge repair (fine-tuning a merge on 64 owner
examples), compared with the same repair of ``theta_pre``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

State = dict[str, Tensor]

OWNER_WEIGHTS = (0.6, 0.8, 1.0, 1.2)
PARTNER_WEIGHTS = (0.1, 0.3, 0.5)
TIES_OWNER_FACTORS = (2, 3, 4, 5)
NUSLERP_OWNER_WEIGHTS = (0.5, 0.8)
PAIR_PARTNER_WEIGHTS = (0.1, 0.3)
MULTISLERP_OWNER_WEIGHTS = (0.5, 0.8)
NEARSWAP_T = 1e-4
"""NearSwap's threshold, as in the model that named the method (``QuartetAnemoi-70B-t0.0001``)."""
LATER_FAMILIES = (
    "DELLA",
    "Model Stock",
    "SCE",
    "NuSLERP",
    "Karcher",
    "TA owner 1 with ",
    "Multi-SLERP",
    "RAM",
    "Arcee Fusion",
    "NearSwap",
)
"""Merge families added to the grid after its first rows were measured (rows from before lack them)."""
NEAR_COPY_T = (1e-6, 1e-8)
"""NearSwap thresholds far below :data:`NEARSWAP_T`: each weight moves at most ``t`` towards the partner's."""
NEAR_COPY_WEIGHTS = (1e-2, 1e-4)
"""Partner weights far below :data:`PAIR_PARTNER_WEIGHTS`, with the owner's task vector at exactly 1."""
NEAR_COPY_FAMILIES = ("near copy: ",)
"""Merges that are the owner's model up to a tiny change: the limit every merge family has (added last)."""
LAYERWISE_FAMILIES = ("gradient SLERP", "TA layer gradient", "layers: ")
"""Merges whose weights change from layer to layer, or that take whole layers from one model (added last)."""
GRADIENT_SLERP_T = (
    {"filter": "attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
)
"""The ``t`` of mergekit's ``examples/gradient-slerp.yml`` (its ``self_attn`` filter shortened to ``attn``, so it
also matches open_clip's ``attn`` modules); the owner is the base, so ``t = 0`` keeps the owner's layer."""


def grid_configs(
    owner: str,
    partners: Sequence[str],
    lambdas: Sequence[float],
    full: bool = True,
    owner_weights: Sequence[float] | None = None,
    layers: int | None = None,
) -> dict[str, Any]:
    """``label -> (mergekit config, partners it uses)`` for the whole neighbourhood.

    ``full=False`` drops owner-weighted normalised task arithmetic and un-normalised TIES, and ``owner_weights``
    replaces :data:`OWNER_WEIGHTS` (for slow tracks). ``layers``: the models' layer count; with two or more, the
    layer-wise merges (:data:`LAYERWISE_FAMILIES`) join the grid.
    """

    def cfg(method: str, weights: dict[str, float], density: float | None = None, **shared: Any) -> dict[str, Any]:
        extra = {} if density is None else {"density": density}
        return {
            "merge_method": method,
            "base_model": "pre",
            "parameters": shared,
            "models": [{"model": n, "parameters": {"weight": w, **extra}} for n, w in weights.items()],
        }

    def all_at(o: float, p: float) -> dict[str, float]:
        return {owner: o, **{n: p for n in partners}}

    everyone = tuple(partners)
    out: dict[str, Any] = {}
    for lam in lambdas:
        out[f"uniform TA λ={lam:g}"] = (cfg("task_arithmetic", all_at(1.0, 1.0), **{"lambda": lam}), everyone)
    for o in owner_weights or OWNER_WEIGHTS:
        for p in PARTNER_WEIGHTS:
            out[f"TA owner {o:g} / partners {p:g}"] = (cfg("task_arithmetic", all_at(o, p)), everyone)
            out[f"TIES-norm owner {o:g} / partners {p:g}"] = (cfg("ties", all_at(o, p), 0.4), everyone)
            if full:
                out[f"TIES owner {o:g} / partners {p:g}"] = (
                    cfg("ties", all_at(o, p), 0.4, normalize=False),
                    everyone,
                )
                out[f"TA-norm owner {o:g} / partners {p:g}"] = (
                    cfg("task_arithmetic", all_at(o, p), normalize=True),
                    everyone,
                )
    for k in TIES_OWNER_FACTORS:
        out[f"TIES owner {k}x"] = (cfg("ties", all_at(float(k), 1.0), 0.4), everyone)
    out["TIES (study)"] = (cfg("ties", all_at(1.0, 1.0), 0.4), everyone)
    out["DARE-linear (study)"] = (cfg("dare_linear", all_at(1.0, 1.0), 0.4), everyone)
    out["DARE-TIES (study)"] = (cfg("dare_ties", all_at(1.0, 1.0), 0.4), everyone)
    out["DELLA (study)"] = (cfg("della", all_at(1.0, 1.0), 0.4), everyone)  # epsilon: mergekit's 0.15
    out["DELLA-linear (study)"] = (cfg("della_linear", all_at(1.0, 1.0), 0.4), everyone)
    out["DELLA-linear owner 1 / partners 0.3"] = (cfg("della_linear", all_at(1.0, 0.3), 0.4), everyone)
    unweighted = [{"model": n} for n in (owner, *partners)]
    out["Model Stock"] = ({"merge_method": "model_stock", "base_model": "pre", "models": unweighted}, everyone)
    out["SCE"] = ({"merge_method": "sce", "base_model": "pre", "models": unweighted}, everyone)
    out["Karcher"] = ({"merge_method": "karcher", "base_model": "pre", "models": unweighted}, everyone)
    out["RAM"] = ({"merge_method": "ram", "base_model": "pre", "models": unweighted}, everyone)
    out["RAM+"] = ({"merge_method": "ramplus_tl", "base_model": "pre", "models": unweighted}, everyone)
    for o in MULTISLERP_OWNER_WEIGHTS:  # the owner at weight o, the partners sharing the rest
        weights = {owner: o, **{n: (1 - o) / len(partners) for n in partners}}
        out[f"Multi-SLERP owner {o:g}"] = (cfg("multislerp", weights), everyone)
    out["SCE top 0.3"] = (
        {"merge_method": "sce", "base_model": "pre", "models": unweighted, "parameters": {"select_topk": 0.3}},
        everyone,
    )
    for n in partners:
        out[f"WA with {n}"] = (
            {
                "merge_method": "linear",
                "models": [{"model": owner, "parameters": {"weight": 1}}, {"model": n, "parameters": {"weight": 1}}],
            },
            (n,),
        )
        out[f"SLERP with {n}"] = (
            {
                "merge_method": "slerp",
                "base_model": owner,
                "parameters": {"t": 0.5},
                "models": [{"model": owner}, {"model": n}],
            },
            (n,),
        )
        for p in PAIR_PARTNER_WEIGHTS:  # the owner at full weight with one partner only
            out[f"TA owner 1 with {n} {p:g}"] = (cfg("task_arithmetic", {owner: 1.0, n: p}), (n,))
        # The owner's model kept, the partner's most important changes fused in; and the reverse, the owner's
        # most important changes fused into the partner (importing the owner's skill into one's own model).
        pair = [{"model": owner}, {"model": n}]
        out[f"Arcee Fusion of {n} into owner"] = (
            {"merge_method": "arcee_fusion", "base_model": owner, "models": pair},
            (n,),
        )
        out[f"Arcee Fusion of owner into {n}"] = (
            {"merge_method": "arcee_fusion", "base_model": n, "models": pair},
            (n,),
        )
        out[f"NearSwap owner / {n} t={NEARSWAP_T:g}"] = (
            {"merge_method": "nearswap", "base_model": owner, "models": pair, "parameters": {"t": NEARSWAP_T}},
            (n,),
        )
        # Near copies: no protection that keeps the owner's function can stop the owner's model itself, so these
        # measure how close to a copy a merge has to stay to keep the owner's skill.
        for t in NEAR_COPY_T:
            out[f"near copy: NearSwap owner / {n} t={t:g}"] = (
                {"merge_method": "nearswap", "base_model": owner, "models": pair, "parameters": {"t": t}},
                (n,),
            )
        for p in NEAR_COPY_WEIGHTS:
            out[f"near copy: TA owner 1 with {n} {p:g}"] = (cfg("task_arithmetic", {owner: 1.0, n: p}), (n,))
        for w in NUSLERP_OWNER_WEIGHTS:
            out[f"NuSLERP owner {w:g} with {n}"] = (
                {
                    "merge_method": "nuslerp",
                    "base_model": "pre",
                    "models": [
                        {"model": owner, "parameters": {"weight": w}},
                        {"model": n, "parameters": {"weight": 1 - w}},
                    ],
                },
                (n,),
            )
    if layers is not None and layers >= 2:
        out.update(_layerwise(cfg, owner, everyone, layers))
    return out


def _layerwise(cfg: Callable[..., dict[str, Any]], owner: str, partners: Sequence[str], layers: int) -> dict[str, Any]:
    """Layer-wise merges: gradient SLERP, task arithmetic with per-layer weights, and half/half frankenmerges."""
    out: dict[str, Any] = {}
    # The owner's weight falling (rising) across the layers and the partners' rising (falling): mergekit
    # interpolates a list of weights over the layers, the tensors outside them taking the first value.
    for o, p in (([1.0, 0.5], [0.1, 0.5]), ([0.5, 1.0], [0.5, 0.1])):
        weights = {owner: o, **{n: p for n in partners}}
        label = f"TA layer gradient owner {o[0]:g}→{o[1]:g} / partners {p[0]:g}→{p[1]:g}"
        out[label] = (cfg("task_arithmetic", weights), tuple(partners))
    half = layers // 2
    for n in partners:
        out[f"gradient SLERP with {n}"] = (
            {
                "merge_method": "slerp",
                "base_model": owner,
                "parameters": {"t": [dict(entry) for entry in GRADIENT_SLERP_T]},
                "models": [{"model": owner}, {"model": n}],
            },
            (n,),
        )
        # Whole layers from each model (passthrough): the owner's embeddings and lower half under the partner's upper
        # half and final norm, and the reverse.
        for lower, upper in ((owner, n), (n, owner)):
            name = "owner" if lower == owner else n
            other = n if lower == owner else "owner"
            out[f"layers: {name} 0-{half}, {other} {half}-{layers}"] = (
                {
                    "merge_method": "passthrough",
                    "slices": [
                        {"sources": [{"model": lower, "layer_range": [0, half]}]},
                        {"sources": [{"model": upper, "layer_range": [half, layers]}]},
                    ],
                },
                (n,),
            )
    return out


def run_grid(
    owner: str,
    state: State,
    partners: dict[str, State],
    pre: State,
    evaluate: Callable[[State, Sequence[str]], dict[str, float]],
    individual: dict[str, float],
    lambdas: Sequence[float],
    *,
    adamerge: Callable[[dict[str, State]], State] | None = None,
    repair: Callable[[State, int], State] | None = None,
    repair_steps: Sequence[int] = (),
    full: bool = True,
    owner_weights: Sequence[float] | None = None,
    bar: Any = None,
) -> dict[str, dict[str, Any]]:
    """Owner-task accuracy and the partners' mean normalized accuracy for every merge of the grid.

    ``evaluate(state, tasks)`` returns accuracies in percent; ``individual`` holds each task's fine-tune accuracy
    (the normalizer). Repair rows fine-tune uniform TA lambda 0.3 for each of ``repair_steps``.
    """
    from lightning_mergeguard.merging import merge, task_vector

    states = {**partners, owner: state}
    out: dict[str, dict[str, Any]] = {}
    layers = layer_count(state)

    def record(label: str, merged: State, used: Sequence[str]) -> None:
        acc = evaluate(merged, [owner, *used])
        others = [acc[n] / max(individual[n], 1e-9) for n in used]
        out[label] = {"owner": acc[owner], "partners_normalized": sum(others) / len(others), "partners": list(used)}
        if bar is not None:
            bar.update()

    for label, (cfg, used) in grid_configs(owner, list(partners), lambdas, full, owner_weights, layers).items():
        # Defended models are merged on purpose (a re-parameterised model looks like another base): no base check.
        # SLERP's base_model is the owner (one end of the interpolation), the others' is theta_pre.
        base = pre if cfg.get("base_model") == "pre" else None
        record(label, merge(cfg, {n: states[n] for n in {owner, *used}}, base, seed=0, check_base=False), used)
    if adamerge is not None:
        record("AdaMerging", adamerge({n: task_vector(s, pre) for n, s in states.items()}), list(partners))
    if repair is not None:
        ta = merge(grid_configs(owner, list(partners), [0.3])["uniform TA λ=0.3"][0], states, pre, check_base=False)
        for steps in repair_steps:
            record(f"repair TA λ=0.3, {steps} steps", repair(ta, steps), list(partners))
    return out


def layer_count(state: State) -> int | None:
    """The number of layers of a state dict's layer stack (``None`` without one)."""
    from lightning_mergeguard.merging.layers import layer_index

    found = [f for f in map(layer_index, state) if f is not None]
    return max(index for _, index in found) + 1 if found else None


def worst_case(grid: dict[str, dict[str, Any]], seen: Sequence[str] = ()) -> tuple[str, float]:
    """The merge giving the owner's task the highest accuracy, over merges with a partner the defense never saw."""
    rows = {k: v for k, v in grid.items() if not k.startswith("repair") and set(v["partners"]) - set(seen)}
    if not rows:
        raise ValueError(f"no merge of the grid has a partner outside {list(seen)}")
    label = max(rows, key=lambda k: rows[k]["owner"])
    return label, rows[label]["owner"]

"""Amplifying symmetries: exact re-parameterisations that make every merge see the partners' updates magnified.

A pre-norm transformer computes the same function after these per-channel rescalings (``s > 0``):

- **norm -> linear**: a norm's weight (and bias) ``* s``, the columns of the linears it feeds ``/ s``
  (LayerNorm / RMSNorm are linear in their affine parameters);
- **Q / K**: a head's query rows ``* s``, its key rows ``/ s`` (``QK^T`` is unchanged; a per-head scalar commutes
  with RoPE);
- **V / O**: a head's value rows ``* s``, the output projection's columns for that head ``/ s``;
- **up / down** (gated MLPs, ``down(act(gate(x)) * up(x))``): an up row ``* s``, the down column ``/ s``.

The owner's model is unchanged, but a merge adds a partner's update ``w * delta`` to the divided tensors, which now
hold weights ``s`` times smaller: the partner's update acts ``s`` times larger, and every coefficient other than
exactly 1 on the owner's task vector leaves the ``* s`` and ``/ s`` halves out of balance. With ``s`` drawn
log-uniformly in ``[1, strength]`` per channel and head, off-the-shelf merges (task arithmetic at any weight, TIES,
DARE, weight averaging, SLERP) stop computing the owner's function.

What it does not resist: a re-parameterisation can be undone. An attacker who holds ``theta_pre`` estimates each
``s`` from norm ratios (:func:`realign`) and recovers the weights underneath exactly, so this layer sits *on top
of* a stage-2 perturbation, which is what remains after re-alignment. Other costs, documented for users: the divided
tensors have channels up to ``strength`` times smaller, which per-row weight quantization (int8/int4) and further
fine-tuning with a fixed learning rate handle badly; fp16 storage loses precision on them below ``6e-5``.

Example:
    >>> from torch import nn
    >>> block = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    >>> [g.kind for g in find_symmetries(block)]  # an nn.Sequential is not a recognised block
    []
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Factor",
    "SymmetryGroup",
    "amplify_module_",
    "amplify_state",
    "apply_scales",
    "draw_scales",
    "estimate_scales",
    "find_symmetries",
    "realign",
]


@dataclass(frozen=True)
class Factor:
    """One tensor's share of a symmetry.

    ``tensor[offset : offset + size * repeat]`` along ``dim`` is multiplied by ``scale.repeat_interleave(repeat) **
    power``.

    Attributes:
        name: The parameter's name (as in ``module.named_parameters()`` / the state dict).
        dim: The axis the channels run along (0: rows / a 1-D tensor, 1: columns).
        power: ``+1`` (multiplied by the scale) or ``-1`` (divided).
        offset: First index along ``dim`` (a packed ``in_proj_weight`` holds Q, K and V one after the other).
        repeat: Consecutive entries that share one scale (a head's ``head_dim`` rows).
    """

    name: str
    dim: int
    power: int
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class SymmetryGroup:
    """``size`` scales and the tensors they act on; applying any positive scales leaves the function unchanged."""

    kind: str
    size: int
    factors: tuple[Factor, ...]


# ---------------------------------------------------------------------------------------------- pure maths
def _slice(t: Tensor, f: Factor, size: int) -> Tensor:
    return t.narrow(f.dim, f.offset, size * f.repeat)


def _expand(scale: Tensor, f: Factor, t: Tensor) -> Tensor:
    s = scale.repeat_interleave(f.repeat) ** f.power
    return s if t.dim() == 1 or f.dim == t.dim() - 1 else s.reshape(-1, *([1] * (t.dim() - 1 - f.dim)))


def apply_scales(
    state: Mapping[str, Tensor], groups: Sequence[SymmetryGroup], scales: Sequence[Tensor]
) -> dict[str, Tensor]:
    """A new state dict with each group's scales applied (float64 maths, each tensor's dtype kept).

    Args:
        state: Parameter name -> tensor (not changed).
        groups: The symmetries (:func:`find_symmetries`).
        scales: One positive tensor of ``group.size`` entries per group.

    Returns:
        The rescaled state; tensors no group touches are the same objects.

    Example:
        >>> g = SymmetryGroup("v/o", 2, (Factor("v", 0, 1), Factor("o", 1, -1)))
        >>> out = apply_scales({"v": torch.ones(2, 3), "o": torch.ones(3, 2)}, [g], [torch.tensor([2.0, 4.0])])
        >>> out["o"][0].tolist()
        [0.5, 0.25]
    """
    if len(scales) != len(groups):
        raise ValueError(f"{len(groups)} symmetry groups but {len(scales)} scale tensors")
    out = dict(state)
    work: dict[str, Tensor] = {}
    for group, scale in zip(groups, scales, strict=True):
        if scale.shape != (group.size,) or not bool(torch.all(scale > 0)) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{group.kind} symmetry needs {group.size} finite positive scales, got {scale}")
        for f in group.factors:
            if f.name not in state:
                raise KeyError(f"symmetry names parameter {f.name!r}, which the state does not hold")
            t = work.setdefault(f.name, state[f.name].double().clone())
            view = _slice(t, f, group.size)
            view.mul_(_expand(scale.to(device=t.device, dtype=torch.float64), f, view))
    for name, t in work.items():
        out[name] = t.to(state[name].dtype)
    return out


def draw_scales(groups: Sequence[SymmetryGroup], strength: float, seed: int = 0) -> list[Tensor]:
    """Scales drawn log-uniformly in ``[1, strength]`` (float64, CPU), one tensor per group, reproducibly.

    Example:
        >>> g = SymmetryGroup("v/o", 3, ())
        >>> s = draw_scales([g], 100.0)[0]
        >>> bool(((s >= 1) & (s <= 100)).all())
        True
    """
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 1):
        raise ValueError(f"strength must be a finite number > 1, got {strength!r}")
    gen = torch.Generator().manual_seed(seed)
    return [torch.exp(torch.rand(g.size, generator=gen, dtype=torch.float64) * math.log(strength)) for g in groups]


def amplify_state(
    state: Mapping[str, Tensor], groups: Sequence[SymmetryGroup], strength: float = 100.0, seed: int = 0
) -> dict[str, Tensor]:
    """:func:`apply_scales` with :func:`draw_scales`: the same function, merge-amplifying weights.

    Example:
        >>> g = SymmetryGroup("v/o", 1, (Factor("v", 0, 1), Factor("o", 1, -1)))
        >>> out = amplify_state({"v": torch.ones(1, 1), "o": torch.ones(1, 1)}, [g], strength=10.0)
        >>> float(out["v"] @ out["o"])
        1.0
    """
    return apply_scales(state, groups, draw_scales(groups, strength, seed))


def _norm_ratios(state: Mapping[str, Tensor], anchor: Mapping[str, Tensor], g: SymmetryGroup) -> Tensor:
    """Per-channel ``log`` scale of one group from norm ratios (mean over its factors), others taken as 1."""
    logs = []
    for f in g.factors:
        a, b = _slice(state[f.name].double(), f, g.size), _slice(anchor[f.name].double(), f, g.size)
        if a.dim() == 2 and f.dim == 1:
            a, b = a.T, b.T
        ratio = a.reshape(g.size, -1).norm(dim=1) / b.reshape(g.size, -1).norm(dim=1).clamp_min(1e-30)
        logs.append(f.power * ratio.clamp_min(1e-30).log())
    return torch.stack(logs).mean(0).cpu()


def estimate_scales(
    state: Mapping[str, Tensor], anchor: Mapping[str, Tensor], groups: Sequence[SymmetryGroup], rounds: int = 30
) -> list[Tensor]:
    """The scales that map ``anchor`` onto ``state``, from per-channel norm ratios.

    Groups overlap (a tensor's rows belong to one symmetry and its columns to another), so the estimate alternates:
    each round estimates every group with the others' current estimates divided out. This is the anchor
    re-alignment attack on :func:`amplify_state`: with ``anchor = theta_pre`` and a fine-tune that stayed near it,
    the estimate is close to the scales drawn.

    Example:
        >>> g = SymmetryGroup("v/o", 1, (Factor("v", 0, 1), Factor("o", 1, -1)))
        >>> base = {"v": torch.ones(1, 2), "o": torch.ones(2, 1)}
        >>> float(estimate_scales(amplify_state(base, [g], 50.0), base, [g])[0]) > 1
        True
    """
    logs = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    current = dict(state)
    for _ in range(rounds):
        for i, g in enumerate(groups):
            step = _norm_ratios(current, anchor, g)
            logs[i] += step
            current = apply_scales(current, [g], [torch.exp(-step)])
    return [x.exp() for x in logs]


def realign(
    state: Mapping[str, Tensor], anchor: Mapping[str, Tensor], groups: Sequence[SymmetryGroup]
) -> dict[str, Tensor]:
    """Undo the scales :func:`estimate_scales` finds against ``anchor``: the attack an informed free-rider runs.

    Example:
        >>> g = SymmetryGroup("v/o", 1, (Factor("v", 0, 1), Factor("o", 1, -1)))
        >>> base = {"v": torch.tensor([[1.0, 2.0]]), "o": torch.tensor([[3.0], [1.0]])}
        >>> back = realign(amplify_state(base, [g], 50.0), base, [g])
        >>> torch.allclose(back["o"], base["o"])
        True
    """
    return apply_scales(state, groups, [1.0 / s for s in estimate_scales(state, anchor, groups)])


# ---------------------------------------------------------------------------------------------- finding them
def _affine_is_linear(norm: nn.Module) -> bool:
    """Whether the norm's output scales with its weight (and bias): ``norm_{c w, c b}(x) == c * norm_{w, b}(x)``.

    True for LayerNorm and Llama-style RMSNorm; false for Gemma's ``(1 + w)`` norms and norms without a weight.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.is_meta:
        return False
    bias = getattr(norm, "bias", None)
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        y = norm(x).double()
        saved = [(p, p.detach().clone()) for p in (weight, bias) if isinstance(p, Tensor)]
        try:
            for p, v in saved:
                p.copy_(v * 2)
            y2 = norm(x).double()
        finally:
            for p, v in saved:
                p.copy_(v)
    return bool(torch.allclose(y2, 2 * y, rtol=1e-2, atol=1e-3 * float(y.abs().max()) + 1e-6))


def _norm_group(prefix: str, norm: str, bias: bool, consumers: Sequence[str], width: int) -> SymmetryGroup:
    factors = [Factor(f"{prefix}{norm}.weight", 0, 1)]
    if bias:
        factors.append(Factor(f"{prefix}{norm}.bias", 0, 1))
    factors += [Factor(f"{prefix}{c}", 1, -1) for c in consumers]
    return SymmetryGroup("norm->linear", width, tuple(factors))


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), Tensor)


def _llama_block(prefix: str, layer: nn.Module) -> list[SymmetryGroup]:
    attn, mlp = layer.self_attn, layer.mlp
    projections = [getattr(attn, f"{x}_proj", None) for x in "qkvo"] + [
        getattr(mlp, f"{x}_proj", None) for x in ("gate", "up", "down")
    ]
    if not all(isinstance(m, nn.Linear) for m in projections):
        return []
    if any(hasattr(layer, extra) for extra in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
        return []  # sandwich norms (Gemma 2/3): post_attention_layernorm is not the MLP's input norm
    q, k, v, _, gate, up, _ = projections
    head_dim = getattr(attn, "head_dim", None) or getattr(getattr(attn, "config", None), "head_dim", None)
    if not head_dim or q.out_features % head_dim or k.out_features % head_dim:
        return []
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv_heads or v.out_features != k.out_features:
        return []
    rep = heads // kv_heads
    a = f"{prefix}self_attn."
    m = f"{prefix}mlp."
    groups = []
    if _affine_is_linear(layer.input_layernorm):
        groups.append(
            _norm_group(
                prefix,
                "input_layernorm",
                _has_bias(layer.input_layernorm),
                [f"self_attn.{x}_proj.weight" for x in "qkv"],
                q.in_features,
            )
        )
    if _affine_is_linear(layer.post_attention_layernorm):
        groups.append(
            _norm_group(
                prefix,
                "post_attention_layernorm",
                _has_bias(layer.post_attention_layernorm),
                ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                gate.in_features,
            )
        )
    if not any(hasattr(attn, n) for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")):
        qk = [Factor(f"{a}q_proj.weight", 0, 1, repeat=rep * head_dim), Factor(f"{a}k_proj.weight", 0, -1, 0, head_dim)]
        if _has_bias(q):
            qk.append(Factor(f"{a}q_proj.bias", 0, 1, repeat=rep * head_dim))
        if _has_bias(k):
            qk.append(Factor(f"{a}k_proj.bias", 0, -1, repeat=head_dim))
        groups.append(SymmetryGroup("q/k", kv_heads, tuple(qk)))
    # V / O (an output bias is added after O and is unaffected)
    vo = [Factor(f"{a}v_proj.weight", 0, 1, repeat=head_dim), Factor(f"{a}o_proj.weight", 1, -1, repeat=rep * head_dim)]
    if _has_bias(v):
        vo.append(Factor(f"{a}v_proj.bias", 0, 1, repeat=head_dim))
    groups.append(SymmetryGroup("v/o", kv_heads, tuple(vo)))
    if type(mlp).__name__.endswith("MLP"):  # a gated MLP: down(act(gate(x)) * up(x)); down's bias is unaffected
        ud = [Factor(f"{m}up_proj.weight", 0, 1), Factor(f"{m}down_proj.weight", 1, -1)]
        if _has_bias(up):
            ud.append(Factor(f"{m}up_proj.bias", 0, 1))
        groups.append(SymmetryGroup("up/down", up.out_features, tuple(ud)))
    return groups


def _open_clip_block(prefix: str, block: nn.Module) -> list[SymmetryGroup]:
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        return []
    if attn.bias_k is not None or attn.bias_v is not None:
        return []
    if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
        return []  # a norm between attention and out_proj (scale_attn) breaks the V/O symmetry
    fc = getattr(block.mlp, "c_fc", None)
    width, heads = attn.embed_dim, attn.num_heads
    head_dim = width // heads
    a = f"{prefix}attn."
    groups = []
    if _affine_is_linear(block.ln_1):
        groups.append(_norm_group(prefix, "ln_1", _has_bias(block.ln_1), ["attn.in_proj_weight"], width))
    if isinstance(fc, nn.Linear) and _affine_is_linear(block.ln_2):
        groups.append(_norm_group(prefix, "ln_2", _has_bias(block.ln_2), ["mlp.c_fc.weight"], fc.in_features))
    packed = attn.in_proj_bias is not None
    qk = [Factor(f"{a}in_proj_weight", 0, 1, 0, head_dim), Factor(f"{a}in_proj_weight", 0, -1, width, head_dim)]
    vo = [Factor(f"{a}in_proj_weight", 0, 1, 2 * width, head_dim), Factor(f"{a}out_proj.weight", 1, -1, 0, head_dim)]
    if packed:
        qk += [Factor(f"{a}in_proj_bias", 0, 1, 0, head_dim), Factor(f"{a}in_proj_bias", 0, -1, width, head_dim)]
        vo.append(Factor(f"{a}in_proj_bias", 0, 1, 2 * width, head_dim))
    groups += [SymmetryGroup("q/k", heads, tuple(qk)), SymmetryGroup("v/o", heads, tuple(vo))]
    return groups


def find_symmetries(module: nn.Module) -> list[SymmetryGroup]:
    """The amplifying symmetries of ``module``'s recognised blocks, named as in ``module.named_parameters()``.

    Recognised: Hugging Face Llama-style decoder layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``: Llama, Mistral, Qwen2, SmolLM...) and open_clip
    ``ResidualAttentionBlock`` (``ln_1``, ``nn.MultiheadAttention``, ``ln_2``, ``mlp.c_fc``). Norms whose output is
    not linear in their weight (Gemma's ``1 + w``), Q/K with per-head norms, sandwich norms and packed projections
    that do not match are left out, so every group returned is an exact symmetry. Blocks wrapped by PEFT (LoRA) or
    sharded (DTensor) are not recognised.

    Example:
        >>> find_symmetries(nn.Linear(2, 2))
        []
    """
    groups: list[SymmetryGroup] = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if all(hasattr(sub, x) for x in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            groups += _llama_block(prefix, sub)
        elif all(hasattr(sub, x) for x in ("ln_1", "attn", "ln_2", "mlp")):
            groups += _open_clip_block(prefix, sub)
    params = dict(module.named_parameters())
    return [g for g in groups if all(f.name in params for f in g.factors)]


def amplify_module_(
    module: nn.Module, strength: float = 100.0, seed: int = 0, names: Collection[str] | None = None
) -> dict[str, Any]:
    """Apply :func:`amplify_state` to ``module``'s parameters in place; return what was done.

    Args:
        module: The model (any device; parameters are rewritten in their dtype).
        strength: Largest scale; scales are log-uniform in ``[1, strength]``.
        seed: Seed of the draw.
        names: Only symmetries whose every tensor is among these parameter names (e.g. the ones a callback
            protects); ``None``: all.

    Returns:
        ``{"strength", "seed", "groups": {kind: count}, "channels", "parameters"}``.

    Raises:
        ValueError: No recognised block, or sharded (DTensor) parameters.

    Example:
        >>> amplify_module_(nn.Linear(2, 2))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: amplify found no block it can rescale exactly ...
    """
    params = dict(module.named_parameters())
    if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params.values()):
        raise ValueError("amplify does not support sharded (DTensor) parameters; amplify the saved full weights")
    groups = find_symmetries(module)
    if names is not None:
        allowed = set(names)
        groups = [g for g in groups if all(f.name in allowed for f in g.factors)]
    if not groups:
        raise ValueError(
            f"amplify found no block it can rescale exactly in {type(module).__name__} (it knows Hugging Face "
            "Llama-style decoder layers and open_clip ResidualAttentionBlock, without LoRA wrappers)"
        )
    names = sorted({f.name for g in groups for f in g.factors})
    new = amplify_state({n: params[n].detach() for n in names}, groups, strength, seed)
    with torch.no_grad():
        for n in names:
            params[n].copy_(new[n])
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    return {
        "strength": float(strength),
        "seed": seed,
        "groups": kinds,
        "channels": sum(g.size for g in groups),
        "parameters": len(names),
    }

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
exactly 1 on the owner's task vector leaves the ``* s`` and ``/ s`` halves out of balance. With ``s`` a power of
two drawn log-uniformly in ``[1, strength]`` per channel and head, off-the-shelf merges (task arithmetic at any
weight, TIES, DARE, weight averaging, SLERP) stop computing the owner's function, while the owner's model computes
bit for bit what it did (multiplying by a power of two rounds nowhere, in fp32 or bf16).

A block can look like a known one and not be (a parallel residual, a norm between V and O): given one forward pass
on a real batch, :func:`amplify_module_` checks each kind of symmetry against the blocks' outputs
(:func:`symmetry_errors`) and leaves out the kinds that change them.

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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.evaluation import eval_mode, rng_kept
from lightning_mergeguard.models.blocks import transformer_blocks
from lightning_mergeguard.validation import is_number

__all__ = [
    "AmplifyWarning",
    "Factor",
    "SymmetryGroup",
    "amplify_module_",
    "amplify_state",
    "apply_scales",
    "check_strength",
    "draw_scales",
    "estimate_scales",
    "find_symmetries",
    "realign",
    "symmetry_errors",
    "warn_amplify",
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
    block: str = ""
    """The module (as in ``named_modules()``) whose output the symmetry keeps; ``""``: the whole model."""


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
    out = dict(state)
    for name, shares in _shares(state, groups, scales).items():
        out[name] = _scaled(state[name], shares)
    return out


def _apply_scales_(params: Mapping[str, Tensor], groups: Sequence[SymmetryGroup], scales: Sequence[Tensor]) -> None:
    """:func:`apply_scales` in place on live parameters, one tensor at a time (one float64 copy at most)."""
    with torch.no_grad():
        for name, shares in _shares(params, groups, scales).items():
            params[name].copy_(_scaled(params[name].detach(), shares))


def _shares(
    state: Mapping[str, Tensor], groups: Sequence[SymmetryGroup], scales: Sequence[Tensor]
) -> dict[str, list[tuple[Factor, int, Tensor]]]:
    """Checked scales, grouped by the tensor they act on: name -> [(factor, group size, scale)]."""
    if len(scales) != len(groups):
        raise ValueError(f"{len(groups)} symmetry groups but {len(scales)} scale tensors")
    shares: dict[str, list[tuple[Factor, int, Tensor]]] = {}
    for group, scale in zip(groups, scales, strict=True):
        if scale.shape != (group.size,) or not bool(torch.all(scale > 0)) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{group.kind} symmetry needs {group.size} finite positive scales, got {scale}")
        for f in group.factors:
            if f.name not in state:
                raise KeyError(f"symmetry names parameter {f.name!r}, which the state does not hold")
            shares.setdefault(f.name, []).append((f, group.size, scale))
    return shares


def _scaled(t: Tensor, shares: Sequence[tuple[Factor, int, Tensor]]) -> Tensor:
    """``t`` with its shares of the scales applied (float64 maths, ``t``'s dtype kept)."""
    work = t.double().clone()
    for f, size, scale in shares:
        view = _slice(work, f, size)
        view.mul_(_expand(scale.to(device=work.device, dtype=torch.float64), f, view))
    return work.to(t.dtype)


class AmplifyWarning(UserWarning):
    """``amplify`` was asked for: what it costs the owner's users, and who undoes it."""


def warn_amplify(strength: float, who: str) -> None:
    """Warn, where ``amplify`` is used, what it costs and what undoes it (measured: benchmarks/results/deployment.md).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_amplify(2.0**20, "MergeGuardCallback")
        >>> "not a recommended setting" in str(seen[0].message)
        True
    """
    import warnings

    warnings.warn(
        f"{who}: amplify={strength:g} is not a recommended setting. It is undone without theta_pre: any other "
        "fine-tune of the same base serves as the anchor (scales from norm ratios, a permuted stream from the "
        "embeddings), so it stops only merges run blindly. And amplified releases do not survive deployment: on "
        "SmolLM2, amplify=16 scores 0% under every 4-bit format, and 2**20 scores 0% in float16, int8 and after 50 "
        "fine-tuning steps (benchmarks/results/deployment.md)",
        AmplifyWarning,
        stacklevel=3,
    )


def check_strength(value: Any, name: str = "strength") -> float:
    """``value`` as a float if it is a finite number >= 2, else a ``ValueError`` naming ``name``.

    Example:
        >>> check_strength(1000)
        1000.0
    """
    if not (is_number(value) and value >= 2):
        raise ValueError(
            f"{name} must be a finite number >= 2 (the largest scale; scales are powers of two), got {value!r}"
        )
    return float(value)


def draw_scales(groups: Sequence[SymmetryGroup], strength: float, seed: int = 0) -> list[Tensor]:
    """Powers of two, log-uniform in ``[1, strength]`` (float64, CPU), one tensor per group, reproducibly.

    Powers of two make the re-parameterisation exact in every floating-point format: ``w * 2**k`` and ``w / 2**k``
    round nowhere (short of overflow or subnormals), so a bf16 model computes bit for bit what it did.

    Example:
        >>> g = SymmetryGroup("v/o", 3, ())
        >>> s = draw_scales([g], 100.0)[0]
        >>> bool(((s >= 1) & (s <= 100)).all()), bool((s.log2() == s.log2().round()).all())
        (True, True)
    """
    top = math.floor(math.log2(check_strength(strength)) + 1e-9)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, top + 1, (g.size,), generator=gen).double().exp2() for g in groups]


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


def _channel_norms(t: Tensor, f: Factor, size: int) -> Tensor:
    """The norm of each of the ``size`` channels factor ``f`` scales in ``t`` (float64; no copy of ``t``)."""
    a = _slice(t, f, size)
    other = [d for d in range(a.dim()) if d != f.dim]
    per_index = torch.linalg.vector_norm(a, dim=other) if other else a.abs()
    return per_index.double().reshape(size, f.repeat).norm(dim=1)


def _log_ratios(norms: Sequence[Tensor], anchor_norms: Sequence[Tensor], g: SymmetryGroup) -> Tensor:
    """Per-channel ``log`` scale of one group from norm ratios (mean over its factors)."""
    logs = []
    for f, na, nb in zip(g.factors, norms, anchor_norms, strict=True):
        # a channel that is zero on either side (a bias initialised at zero) says nothing about its scale
        ratio = torch.where((na > 0) & (nb > 0), na / nb.clamp_min(1e-30), torch.nan)
        logs.append(f.power * ratio.log())
    return torch.stack(logs).nanmean(0).nan_to_num(0.0).cpu()


def estimate_scales(
    state: Mapping[str, Tensor],
    anchor: Mapping[str, Tensor],
    groups: Sequence[SymmetryGroup],
    rounds: int = 30,
    tol: float = 1e-4,
) -> list[Tensor]:
    """The scales that map ``anchor`` onto ``state``, from per-channel norm ratios.

    Groups overlap (a tensor's rows belong to one symmetry and its columns to another), so the estimate alternates:
    each round estimates every group with the others' current estimates divided out, until no scale moves by more
    than a factor ``exp(tol)`` in a round (or ``rounds`` rounds). This is the anchor re-alignment attack on
    :func:`amplify_state`: with ``anchor = theta_pre`` and a fine-tune that stayed near it, the estimate is close to
    the scales drawn.

    One working copy of the tensors the groups touch is held (float32, or the state's dtype if wider), rescaled in
    place; the anchor's channel norms are computed once.

    Example:
        >>> g = SymmetryGroup("v/o", 1, (Factor("v", 0, 1), Factor("o", 1, -1)))
        >>> base = {"v": torch.ones(1, 2), "o": torch.ones(2, 1)}
        >>> float(estimate_scales(amplify_state(base, [g], 50.0), base, [g])[0]) > 1
        True
    """
    for g in groups:
        for f in g.factors:
            if f.name not in state or f.name not in anchor:
                raise KeyError(f"symmetry names parameter {f.name!r}, which the state or the anchor does not hold")
    work = {}
    for g in groups:
        for f in g.factors:
            if f.name not in work:
                t = state[f.name].detach()
                work[f.name] = t.to(torch.promote_types(t.dtype, torch.float32), copy=True)
    anchor_norms = [[_channel_norms(anchor[f.name], f, g.size) for f in g.factors] for g in groups]
    logs = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    for _ in range(rounds):
        moved = 0.0
        for i, g in enumerate(groups):
            step = _log_ratios([_channel_norms(work[f.name], f, g.size) for f in g.factors], anchor_norms[i], g)
            logs[i] += step
            moved = max(moved, float(step.abs().max())) if step.numel() else moved
            for f in g.factors:
                view = _slice(work[f.name], f, g.size)
                view.mul_(_expand(torch.exp(-step).to(device=view.device, dtype=view.dtype), f, view))
        if moved <= tol:
            break
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


def find_symmetries(module: nn.Module, names: Collection[str] | None = None) -> list[SymmetryGroup]:
    """The amplifying symmetries of ``module``'s recognised blocks, named as in ``module.named_parameters()``.

    Recognised: Hugging Face Llama-style decoder layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``: Llama, Mistral, Qwen2, SmolLM...) and open_clip
    ``ResidualAttentionBlock`` (``ln_1``, ``nn.MultiheadAttention``, ``ln_2``, ``mlp.c_fc``). Norms whose output is
    not linear in their weight (Gemma's ``1 + w``), Q/K with per-head norms, sandwich norms and packed projections
    that do not match are left out, so every group returned is an exact symmetry. Blocks wrapped by PEFT (LoRA) or
    sharded (DTensor) are not recognised. ``names``: keep only the groups whose every tensor is among these
    parameter names (e.g. the ones a callback protects); ``None``: all.

    Example:
        >>> find_symmetries(nn.Linear(2, 2))
        []
    """
    groups: list[SymmetryGroup] = []
    for name, prefix, sub, kind in transformer_blocks(module):
        found = _llama_block(prefix, sub) if kind == "llama" else _open_clip_block(prefix, sub)
        groups += [replace(g, block=name) for g in found]
    allowed = set(dict(module.named_parameters()) if names is None else names)
    return [g for g in groups if all(f.name in allowed for f in g.factors)]


def _first_float(out: Any) -> Tensor | None:
    """The first floating-point tensor in a module's output (a tensor, tuple, dict or ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return out if out.is_floating_point() else None
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for item in items:
        found = _first_float(item)
        if found is not None:
            return found
    return None


def _block_outputs(module: nn.Module, blocks: Sequence[str], forward: Callable[[], Any], samples: int) -> list[Tensor]:
    """Every call's output of each block during one seeded, eval-mode, no-grad ``forward()``, subsampled to float32."""
    subs = dict(module.named_modules())
    seen: list[Tensor] = []

    def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        t = _first_float(out)
        if t is not None:
            flat = t.detach().reshape(-1)
            seen.append(flat[:: max(1, -(-flat.numel() // samples))].float().clone())

    handles = [subs[b].register_forward_hook(hook) for b in blocks]
    try:
        with eval_mode(module), torch.no_grad(), rng_kept(module):
            torch.manual_seed(0)
            forward()
    finally:
        for h in handles:
            h.remove()
    return seen


def symmetry_errors(
    module: nn.Module,
    groups: Sequence[SymmetryGroup],
    scales: Sequence[Tensor],
    forward: Callable[[], Any],
    samples: int = 65536,
) -> dict[str, float]:
    """How much each kind of symmetry, applied alone with ``scales``, changes the blocks' outputs on ``forward()``.

    The check that a block is what it looks like: ``forward`` (one pass of the model on a real batch, e.g.
    ``lambda: loss_fn(model, batch)``) runs seeded, in eval mode and without gradients, with hooks on every
    block a group names. Each kind's groups are applied in place, the pass repeated, and the weights restored.
    With power-of-two scales (:func:`draw_scales`) an exact symmetry changes nothing beyond kernel noise in any
    dtype; a block that only looks like a known one (a norm between V and O, a parallel residual) changes by
    order one. The ``"repeat"`` entry is the change between two passes with nothing applied (a forward that is
    not deterministic cannot be checked).

    Returns:
        ``{"repeat": e, kind: e, ...}``, each ``e`` the largest relative change (``||a - b|| / ||b||``) over the
        blocks' outputs; ``inf`` where a pass left no output to compare or produced non-finite values.

    Example:
        >>> symmetry_errors(nn.Linear(2, 2), [], [], lambda: None)
        {'repeat': inf}
    """
    if len(scales) != len(groups):
        raise ValueError(f"{len(groups)} symmetry groups but {len(scales)} scale tensors")
    blocks = sorted({g.block for g in groups}) or [""]
    params = dict(module.named_parameters())
    want = _block_outputs(module, blocks, forward, samples)

    def change(got: list[Tensor]) -> float:
        if not want or len(got) != len(want):
            return math.inf
        worst = 0.0
        for a, b in zip(got, want, strict=True):
            if a.shape != b.shape or not bool(torch.isfinite(a).all()):
                return math.inf
            worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
        return worst

    errors = {"repeat": change(_block_outputs(module, blocks, forward, samples))}
    for kind in dict.fromkeys(g.kind for g in groups):
        chosen = [(g, s) for g, s in zip(groups, scales, strict=True) if g.kind == kind]
        names = sorted({f.name for g, _ in chosen for f in g.factors})
        saved = {n: params[n].detach().to("cpu", copy=True) for n in names}  # off the accelerator
        try:
            _apply_scales_(params, [g for g, _ in chosen], [s for _, s in chosen])
            errors[kind] = change(_block_outputs(module, blocks, forward, samples))
        finally:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(saved[n])
    return errors


def _width(block: nn.Module) -> int | None:
    """The residual width a block reads: the size of its first 1-d parameter (its first norm's weight)."""
    for p in block.parameters():
        if p.dim() == 1:
            return p.shape[0]
    return None


def self_check_forward(module: nn.Module, groups: Sequence[SymmetryGroup]) -> Callable[[], Any]:
    """A forward pass that exercises every block ``groups`` name, for a check with no real batch at hand.

    Each block is called alone on seeded random input of its width (``(2, 5, width)``); a block that cannot be
    called so (a Hugging Face decoder layer needs its rotary embeddings) is exercised by a pass of the enclosing
    Hugging Face model on random token ids instead.

    Raises:
        ValueError: Naming the block when neither works.
    """
    subs = dict(module.named_modules())
    blocks = sorted({g.block for g in groups})
    param = next(module.parameters())
    calls: list[Callable[[], Any]] = []
    needs_model = []
    for name in blocks:
        width = _width(subs[name])
        x = torch.randn(2, 5, width or 1, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
        try:
            with torch.no_grad(), eval_mode(subs[name]):
                subs[name](x)
        except Exception:  # any failure means: check it through the whole model instead
            needs_model.append(name)
            continue
        calls.append(lambda block=subs[name], x=x: block(x))
    if needs_model:
        hf = next((m for m in module.modules() if hasattr(m, "get_input_embeddings") and hasattr(m, "config")), None)
        vocab = getattr(getattr(hf, "config", None), "vocab_size", None)
        if hf is None or not vocab:
            raise ValueError(
                f"amplify cannot check block {needs_model[0]!r} of {type(module).__name__} on its own: pass "
                "forward= (one forward pass of the model on a real batch)"
            )
        ids = torch.randint(0, int(vocab), (2, 9), generator=torch.Generator().manual_seed(0)).to(param.device)
        calls.append(lambda: hf(input_ids=ids))
    return lambda: [call() for call in calls]


def amplify_module_(
    module: nn.Module,
    strength: float = 100.0,
    seed: int = 0,
    groups: Sequence[SymmetryGroup] | None = None,
    forward: Callable[[], Any] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    tolerance: float = 1e-5,
) -> dict[str, Any]:
    """Apply :func:`amplify_state` to ``module``'s parameters in place; return what was done.

    Args:
        module: The model (any device; parameters are rewritten in their dtype).
        strength: Largest scale; scales are powers of two, log-uniform in ``[1, strength]``.
        seed: Seed of the draw.
        groups: The symmetries to apply (default: :func:`find_symmetries` of ``module``).
        forward: One forward pass of the model on a real batch. Every kind of symmetry is checked first with
            :func:`symmetry_errors`, and kinds that change the blocks' outputs by more than ``tolerance``
            (relative) are left out: the model is never silently changed. ``None``: the check runs on
            :func:`self_check_forward` (each block on random input, or the Hugging Face model on random tokens),
            since a block can carry the known names and compute something else (a post-norm block, say).
        reduce: Mean across processes of a tensor (DDP), so that every rank drops the same kinds.
        tolerance: Largest relative change of a block's output a kept kind may cause (exact symmetries with
            power-of-two scales cause none).

    Returns:
        ``{"strength", "seed", "groups": {kind: count}, "channels", "parameters"}``, and with ``forward``,
        ``"checked"`` (each kind's relative change, and ``"repeat"``) and ``"dropped"`` (the kinds left out).

    Raises:
        ValueError: No recognised block, no kind passes the check, a forward that cannot be checked (two seeded
            passes differ), or sharded (DTensor) parameters.

    Example:
        >>> amplify_module_(nn.Linear(2, 2))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: amplify found no block it can rescale exactly ...
    """
    from lightning_mergeguard.sharding import any_sharded

    params = dict(module.named_parameters())
    if any_sharded(params):
        raise ValueError("amplify does not support sharded (DTensor) parameters; amplify the saved full weights")
    groups = list(find_symmetries(module) if groups is None else groups)
    if not groups:
        raise ValueError(
            f"amplify found no block it can rescale exactly in {type(module).__name__} (it knows Hugging Face "
            "Llama-style decoder layers and open_clip ResidualAttentionBlock, without LoRA wrappers)"
        )
    scales = draw_scales(groups, strength, seed)
    extra: dict[str, Any] = {}
    if forward is None:
        forward = self_check_forward(module, groups)
    checked = symmetry_errors(module, groups, scales, forward)
    if reduce is not None:  # one decision on every process
        device = next(iter(params.values())).device
        mean = reduce(torch.tensor(list(checked.values()), dtype=torch.float64, device=device))
        checked = dict(zip(checked, mean.tolist(), strict=True))
    if not checked["repeat"] <= tolerance:
        raise ValueError(
            "amplify cannot check the symmetries on this model: two seeded forward passes with the same weights "
            f"differ by {checked['repeat']:.3g} (relative), or the blocks' outputs were never seen"
        )
    dropped = sorted(k for k, e in checked.items() if k != "repeat" and not e <= tolerance)
    kept = [i for i, g in enumerate(groups) if g.kind not in dropped]
    if not kept:
        fp16 = any(params[f.name].dtype == torch.float16 for g in groups for f in g.factors)
        raise ValueError(
            f"amplify found no exact symmetry in {type(module).__name__}: each kind changed the blocks' outputs "
            f"({', '.join(f'{k}: {checked[k]:.3g}' for k in dropped)} relative), so "
            + (
                "the rescaled float16 weights lost precision (below 6.1e-5 float16 is subnormal) or overflowed: "
                "amplify a float32 or bfloat16 copy, or lower the strength"
                if fp16
                else "its blocks are not the ones they look like"
            )
        )
    groups, scales = [groups[i] for i in kept], [scales[i] for i in kept]
    extra = {"checked": checked, "dropped": dropped}
    names = sorted({f.name for g in groups for f in g.factors})
    _apply_scales_(params, groups, scales)
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    return {
        "strength": float(strength),
        "seed": seed,
        "groups": kinds,
        "channels": sum(g.size for g in groups),
        "parameters": len(names),
        **extra,
    }

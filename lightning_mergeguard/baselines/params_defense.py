"""A PaRaMS-style defense (arXiv 2503.07661): exactly function-preserving re-parameterisation.

Two symmetries of a transformer leave its function unchanged but move its weights far from the base model, so
that merges (which average weights *position by position*) combine mismatched units:

- **MLP permutation**: permuting the hidden units of an MLP (rows of the input projections, columns of the output
  projection) changes nothing for elementwise activations. The permutation is chosen to be maximally mismatched
  with the base model (a linear assignment that *minimises* the similarity of each new unit to the base unit at
  its position).
- **Attention rescaling**: ``Q * a, K / a`` per key-value group leaves ``QK^T`` (and RoPE, which is linear)
  unchanged, and ``V * g, O / g`` leaves the head's output unchanged; ``a, g ~ U(low, high)``.

These are pure functions of state dicts. Being re-parameterisations, they can be undone by an attacker who aligns
the weights back to the base model (see the protection benchmark's anchor-alignment attack).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "aligned_permutation",
    "mismatched_permutation",
    "params_llama",
    "params_mlp_chain",
    "params_open_clip",
    "realign_llama",
    "realign_open_clip",
]


def _assignment(units: Tensor, base_units: Tensor, maximize: bool) -> Tensor:
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(units.double(), dim=1)
    b = torch.nn.functional.normalize(base_units.double(), dim=1)
    sim = (b @ a.T).numpy()  # sim[i, j]: base unit i vs unit j placed at position i
    _, cols = linear_sum_assignment(sim, maximize=maximize)
    return torch.as_tensor(cols, dtype=torch.long)


def mismatched_permutation(units: Tensor, base_units: Tensor) -> Tensor:
    """A permutation ``perm`` such that ``units[perm]`` is as dissimilar as possible to ``base_units`` row by row.

    Args:
        units: ``[n, d]`` features of the fine-tuned model's units (one row per unit).
        base_units: ``[n, d]`` features of the base model's units.

    Returns:
        A ``LongTensor`` permutation of ``range(n)``.

    Example:
        >>> base = torch.eye(3)
        >>> mismatched_permutation(base.clone(), base).tolist() != [0, 1, 2]
        True
    """
    return _assignment(units, base_units, maximize=False)


def aligned_permutation(units: Tensor, base_units: Tensor) -> Tensor:
    """The permutation ``perm`` that makes ``units[perm]`` most similar to ``base_units`` (the attacker's inverse).

    Example:
        >>> base = torch.eye(3)
        >>> aligned_permutation(base[[2, 0, 1]], base).tolist()
        [1, 2, 0]
    """
    return _assignment(units, base_units, maximize=True)


def _permute_mlp(
    out: dict[str, Tensor], base: Mapping[str, Tensor], rows: Sequence[str], cols: Sequence[str], chooser
) -> None:
    """Permute hidden units: rows of the ``rows`` tensors (weights and biases), columns of the ``cols`` weights."""
    feats = torch.cat([out[k][:, None] if out[k].dim() == 1 else out[k] for k in rows] + [out[k].T for k in cols], 1)
    base_feats = torch.cat(
        [base[k][:, None] if base[k].dim() == 1 else base[k] for k in rows] + [base[k].T for k in cols], 1
    )
    perm = chooser(feats, base_feats)
    for k in rows:
        out[k] = out[k][perm]
    for k in cols:
        out[k] = out[k][:, perm]


def params_mlp_chain(
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    layers: Sequence[str],
) -> dict[str, Tensor]:
    """Permute the hidden units between consecutive ``nn.Linear`` layers of an MLP with elementwise activations.

    Args:
        state: The fine-tuned state dict.
        base: The base state dict (same keys).
        layers: Module names of the Linear layers in order (``["backbone.0", "backbone.2", ...]``); the hidden
            units after every layer but the last are permuted.

    Returns:
        A new state dict computing the same function.
    """
    out = {k: v.clone() for k, v in state.items()}
    for first, second in itertools.pairwise(layers):
        rows = [k for k in (f"{first}.weight", f"{first}.bias") if k in out]
        _permute_mlp(out, base, rows, [f"{second}.weight"], mismatched_permutation)
    return out


# ---------------------------------------------------------------- attention (Q/K and V/O per-head scales)
class _Attention:
    """Read and write the Q, K, V (weights, optional biases) and O weights of one attention layer."""

    def __init__(self, arch: str, prefix: str) -> None:
        self.arch, self.p = arch, prefix

    def get(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        if self.arch == "open_clip":
            w = sd[f"{self.p}.attn.in_proj_weight"]
            b = sd.get(f"{self.p}.attn.in_proj_bias")
            q, k, v = w.chunk(3, dim=0)
            qb, kb, vb = b.chunk(3) if b is not None else (None, None, None)
            return {"q": q, "k": k, "v": v, "o": sd[f"{self.p}.attn.out_proj.weight"], "qb": qb, "kb": kb, "vb": vb}
        parts: dict[str, Tensor | None] = {}
        for x in "qkvo":
            parts[x] = sd[f"{self.p}.self_attn.{x}_proj.weight"]
        for x in "qkv":
            parts[x + "b"] = sd.get(f"{self.p}.self_attn.{x}_proj.bias")
        return parts

    def set(self, sd: dict[str, Tensor], parts: Mapping[str, Tensor | None]) -> None:
        if self.arch == "open_clip":
            sd[f"{self.p}.attn.in_proj_weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
            if parts["qb"] is not None:
                sd[f"{self.p}.attn.in_proj_bias"] = torch.cat([parts["qb"], parts["kb"], parts["vb"]])
            sd[f"{self.p}.attn.out_proj.weight"] = parts["o"]
            return
        for x in "qkvo":
            sd[f"{self.p}.self_attn.{x}_proj.weight"] = parts[x]
        for x in "qkv":
            if parts[x + "b"] is not None:
                sd[f"{self.p}.self_attn.{x}_proj.bias"] = parts[x + "b"]


def _rescale(parts: dict[str, Tensor | None], a: Tensor, g: Tensor, per_group: int) -> dict[str, Tensor | None]:
    """``Q * a, K / a`` and ``V * g, O / g`` per key-value head: ``softmax(QK^T)`` and the output are unchanged.

    ``per_group`` query heads share each key-value head's ``a`` and ``g``.
    """
    q, k = parts["q"], parts["k"]
    assert q is not None and k is not None
    kv_heads = a.numel()
    head_dim = k.shape[0] // kv_heads
    rows_q = a.repeat_interleave(per_group * head_dim).to(q.dtype)
    rows_kv_a = a.repeat_interleave(head_dim).to(q.dtype)
    rows_kv_g = g.repeat_interleave(head_dim).to(q.dtype)
    cols_o = g.repeat_interleave(per_group * head_dim).to(q.dtype)
    out = dict(parts)
    for key, scale, op in (("q", rows_q, 1), ("k", rows_kv_a, -1), ("v", rows_kv_g, 1)):
        for name, t in ((key, parts[key]), (key + "b", parts[key + "b"])):
            if t is not None:
                s = scale if t.dim() == 1 else scale[:, None]
                out[name] = t * s if op > 0 else t / s
    o = parts["o"]
    assert o is not None
    out["o"] = o / cols_o[None, :]
    return out


def _head_norms(w: Tensor, heads: int, dim: int = 0) -> Tensor:
    w = w.double() if dim == 0 else w.double().T
    return w.reshape(heads, -1).norm(dim=1)


def _estimate_scales(parts, base_parts, kv_heads: int, num_heads: int) -> tuple[Tensor, Tensor]:
    """Per-group ``a`` and ``g`` that a PaRaMS-style rescaling applied, estimated against the base (anchor)."""
    r_q = _head_norms(parts["q"], kv_heads) / _head_norms(base_parts["q"], kv_heads)
    r_k = _head_norms(parts["k"], kv_heads) / _head_norms(base_parts["k"], kv_heads)
    r_v = _head_norms(parts["v"], kv_heads) / _head_norms(base_parts["v"], kv_heads)
    r_o = _head_norms(parts["o"], kv_heads, dim=1) / _head_norms(base_parts["o"], kv_heads, dim=1)
    return (r_q / r_k).sqrt(), (r_v / r_o).sqrt()


def _transform_layers(
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    blocks: Sequence[tuple[_Attention, Sequence[str], Sequence[str]]],
    attention: Callable[[dict, dict], dict],
    chooser: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    for attn, rows, cols in blocks:
        _permute_mlp(out, base, rows, cols, chooser)
        attn.set(out, attention(attn.get(out), attn.get(base)))
    return out


def _llama_blocks(num_layers: int, prefix: str) -> list[tuple[_Attention, list[str], list[str]]]:
    return [
        (
            _Attention("llama", f"{prefix}.{i}"),
            [f"{prefix}.{i}.mlp.gate_proj.weight", f"{prefix}.{i}.mlp.up_proj.weight"],
            [f"{prefix}.{i}.mlp.down_proj.weight"],
        )
        for i in range(num_layers)
    ]


def _open_clip_blocks(num_layers: int, prefix: str) -> list[tuple[_Attention, list[str], list[str]]]:
    return [
        (
            _Attention("open_clip", f"{prefix}.{i}"),
            [f"{prefix}.{i}.mlp.c_fc.weight", f"{prefix}.{i}.mlp.c_fc.bias"],
            [f"{prefix}.{i}.mlp.c_proj.weight"],
        )
        for i in range(num_layers)
    ]


def _random_scales(scale_range: tuple[float, float], seed: int, kv_heads: int, per_group: int):
    low, high = scale_range
    if not 0 < low < high:
        raise ValueError(f"scale_range must satisfy 0 < low < high, got {scale_range}")
    g = torch.Generator().manual_seed(seed)

    def attention(parts: dict, _base_parts: dict) -> dict:
        a = low + (high - low) * torch.rand(kv_heads, generator=g, dtype=torch.float64)
        gam = low + (high - low) * torch.rand(kv_heads, generator=g, dtype=torch.float64)
        return _rescale(parts, a, gam, per_group)

    return attention


def _undo_scales(kv_heads: int, num_heads: int, per_group: int):
    def attention(parts: dict, base_parts: dict) -> dict:
        a, g = _estimate_scales(parts, base_parts, kv_heads, num_heads)
        return _rescale(parts, 1.0 / a, 1.0 / g, per_group)

    return attention


def _check_heads(num_heads: int, num_kv_heads: int) -> int:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return num_heads // num_kv_heads


def params_llama(
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    prefix: str = "model.layers",
    scale_range: tuple[float, float] = (0.05, 20.0),
    seed: int = 0,
) -> dict[str, Tensor]:
    """PaRaMS for Llama-style decoder layers (``q/k/v/o_proj``, ``gate/up/down_proj``), exactly function-preserving.

    Args:
        state: The fine-tuned state dict (Hugging Face names).
        base: The base state dict.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key-value heads (grouped-query attention shares one scale per group).
        prefix: Name prefix of the decoder layers.
        scale_range: ``a`` and ``g`` are drawn uniformly from this range.
        seed: Seed of the scale draws.

    Returns:
        A new state dict computing the same function.
    """
    per_group = _check_heads(num_heads, num_kv_heads)
    return _transform_layers(
        state,
        base,
        _llama_blocks(num_layers, prefix),
        _random_scales(scale_range, seed, num_kv_heads, per_group),
        mismatched_permutation,
    )


def params_open_clip(
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    *,
    num_layers: int,
    num_heads: int,
    prefix: str = "transformer.resblocks",
    scale_range: tuple[float, float] = (0.05, 20.0),
    seed: int = 0,
) -> dict[str, Tensor]:
    """PaRaMS for an open_clip transformer (``attn.in_proj_*``, ``attn.out_proj``, ``mlp.c_fc``/``c_proj``).

    Args:
        state: The fine-tuned state dict of the tower (``clip.visual``).
        base: The base state dict.
        num_layers: Residual blocks.
        num_heads: Attention heads.
        prefix: Name prefix of the blocks.
        scale_range: ``a`` and ``g`` are drawn uniformly from this range.
        seed: Seed of the scale draws.

    Returns:
        A new state dict computing the same function.
    """
    return _transform_layers(
        state,
        base,
        _open_clip_blocks(num_layers, prefix),
        _random_scales(scale_range, seed, num_heads, 1),
        mismatched_permutation,
    )


def realign_llama(
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    prefix: str = "model.layers",
) -> dict[str, Tensor]:
    """The anchor-based attack on function-preserving defenses: align a model back to ``theta_pre``.

    MLP units are permuted to match the base's units (maximum-similarity linear assignment) and the per-head
    Q/K and V/O scales are estimated from head norms relative to the base and divided out. The result computes
    the same function as ``state``; applied to a PaRaMS-protected model it restores mergeability.
    """
    per_group = _check_heads(num_heads, num_kv_heads)
    return _transform_layers(
        state,
        base,
        _llama_blocks(num_layers, prefix),
        _undo_scales(num_kv_heads, num_heads, per_group),
        aligned_permutation,
    )


def realign_open_clip(
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    *,
    num_layers: int,
    num_heads: int,
    prefix: str = "transformer.resblocks",
) -> dict[str, Tensor]:
    """:func:`realign_llama` for open_clip transformers."""
    return _transform_layers(
        state, base, _open_clip_blocks(num_layers, prefix), _undo_scales(num_heads, num_heads, 1), aligned_permutation
    )

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
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["mismatched_permutation", "params_llama", "params_mlp_chain"]


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
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(units.double(), dim=1)
    b = torch.nn.functional.normalize(base_units.double(), dim=1)
    sim = (b @ a.T).numpy()  # sim[i, j]: base unit i vs fine-tuned unit j placed at position i
    _, cols = linear_sum_assignment(sim)  # minimise the total similarity
    return torch.as_tensor(cols, dtype=torch.long)


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
        w, b = out[f"{first}.weight"], out.get(f"{first}.bias")
        feats = torch.cat([w, b[:, None] if b is not None else w[:, :0], out[f"{second}.weight"].T], dim=1)
        bw, bb = base[f"{first}.weight"], base.get(f"{first}.bias")
        base_feats = torch.cat([bw, bb[:, None] if bb is not None else bw[:, :0], base[f"{second}.weight"].T], dim=1)
        perm = mismatched_permutation(feats, base_feats)
        out[f"{first}.weight"] = w[perm]
        if b is not None:
            out[f"{first}.bias"] = b[perm]
        out[f"{second}.weight"] = out[f"{second}.weight"][:, perm]
    return out


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
    low, high = scale_range
    if not 0 < low < high:
        raise ValueError(f"scale_range must satisfy 0 < low < high, got {scale_range}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    per_group = num_heads // num_kv_heads
    for i in range(num_layers):
        p = f"{prefix}.{i}"
        # MLP: permute intermediate units (rows of gate/up, columns of down).
        gate, up, down = (out[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        feats = torch.cat([gate, up, down.T], dim=1)
        base_feats = torch.cat(
            [base[f"{p}.mlp.gate_proj.weight"], base[f"{p}.mlp.up_proj.weight"], base[f"{p}.mlp.down_proj.weight"].T],
            dim=1,
        )
        perm = mismatched_permutation(feats, base_feats)
        out[f"{p}.mlp.gate_proj.weight"] = gate[perm]
        out[f"{p}.mlp.up_proj.weight"] = up[perm]
        out[f"{p}.mlp.down_proj.weight"] = down[:, perm]
        # Attention: Q*a / K/a per kv group, V*g / O/g per kv group.
        q, k, v, o = (out[f"{p}.self_attn.{n}_proj.weight"] for n in ("q", "k", "v", "o"))
        head_dim = q.shape[0] // num_heads
        a = low + (high - low) * torch.rand(num_kv_heads, generator=g, dtype=torch.float64)
        gam = low + (high - low) * torch.rand(num_kv_heads, generator=g, dtype=torch.float64)
        q_scale = a.repeat_interleave(per_group * head_dim).to(q.dtype)
        kv_scale_a = a.repeat_interleave(head_dim).to(k.dtype)
        kv_scale_g = gam.repeat_interleave(head_dim).to(v.dtype)
        o_scale = gam.repeat_interleave(per_group * head_dim).to(o.dtype)
        out[f"{p}.self_attn.q_proj.weight"] = q * q_scale[:, None]
        out[f"{p}.self_attn.k_proj.weight"] = k / kv_scale_a[:, None]
        out[f"{p}.self_attn.v_proj.weight"] = v * kv_scale_g[:, None]
        out[f"{p}.self_attn.o_proj.weight"] = o / o_scale[None, :]
        for name, scale, op in (("q", q_scale, "mul"), ("k", kv_scale_a, "div"), ("v", kv_scale_g, "mul")):
            key = f"{p}.self_attn.{name}_proj.bias"
            if key in out:
                out[key] = out[key] * scale if op == "mul" else out[key] / scale
    return out

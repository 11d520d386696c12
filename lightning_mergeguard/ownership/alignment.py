"""Align a suspect to ``theta_pre`` before the white-box test, so output-preserving re-parameterisations do not hide it.

A free-rider can publish a merge in another coordinate system without changing a single output: permute the
residual stream, the MLP's hidden units or the attention heads, or rescale the channels that a norm, an attention
head or a gated MLP lets rescale. :func:`align_to_base` undoes each of those against ``theta_pre`` (fine-tuning
moves weights little, so every unit is matched to the base unit it resembles most, by a linear assignment on
scale-free similarities), in that order: stream, units, scales. It only uses the suspect and ``theta_pre``, so it
does not touch the tests' validity (their null distributions come from the owner's secret alone).

Not undone: rotations of the residual stream of RMSNorm models after folding the norm weights (QuaRot-style) and
permutations inside a head (the Q/K dimensions of a rotary model, V/O dimensions); see the ownership guide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["UnitGroup", "align_to_base", "find_unit_groups", "permute_units"]


@dataclass(frozen=True)
class UnitGroup:
    """``units`` interchangeable units (MLP hidden units, attention heads) and the tensor slices each one owns.

    Unit ``u`` of member ``(name, dim, offset, block)`` is ``tensor[offset + u * block : offset + (u + 1) * block]``
    along ``dim``; permuting the units of every member together leaves the model's outputs unchanged.
    """

    kind: str
    units: int
    members: tuple[tuple[str, int, int, int], ...]


def _has_bias(m: nn.Module) -> bool:
    return isinstance(getattr(m, "bias", None), Tensor)


def _open_clip_units(prefix: str, block: nn.Module) -> list[UnitGroup]:
    groups = []
    fc, proj = getattr(block.mlp, "c_fc", None), getattr(block.mlp, "c_proj", None)
    if isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear):
        m = [(f"{prefix}mlp.c_fc.weight", 0, 0, 1), (f"{prefix}mlp.c_proj.weight", 1, 0, 1)]
        if _has_bias(fc):
            m.append((f"{prefix}mlp.c_fc.bias", 0, 0, 1))
        groups.append(UnitGroup("mlp", fc.out_features, tuple(m)))
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.bias_k is None:
        width, heads = attn.embed_dim, attn.num_heads
        hd = width // heads
        a = f"{prefix}attn."
        m = [(f"{a}in_proj_weight", 0, i * width, hd) for i in range(3)] + [(f"{a}out_proj.weight", 1, 0, hd)]
        if attn.in_proj_bias is not None:
            m += [(f"{a}in_proj_bias", 0, i * width, hd) for i in range(3)]
        groups.append(UnitGroup("heads", heads, tuple(m)))
    return groups


def _llama_units(prefix: str, layer: nn.Module) -> list[UnitGroup]:
    groups = []
    mlp, attn = layer.mlp, layer.self_attn
    proj = [getattr(mlp, f"{x}_proj", None) for x in ("gate", "up", "down")]
    if all(isinstance(p, nn.Linear) for p in proj):
        m = [(f"{prefix}mlp.gate_proj.weight", 0, 0, 1), (f"{prefix}mlp.up_proj.weight", 0, 0, 1)]
        m.append((f"{prefix}mlp.down_proj.weight", 1, 0, 1))
        m += [(f"{prefix}mlp.{x}_proj.bias", 0, 0, 1) for x, p in zip(("gate", "up"), proj) if _has_bias(p)]
        groups.append(UnitGroup("mlp", proj[0].out_features, tuple(m)))
    q, k, v, o = (getattr(attn, f"{x}_proj", None) for x in "qkvo")
    head_dim = getattr(attn, "head_dim", None)
    if all(isinstance(p, nn.Linear) for p in (q, k, v, o)) and head_dim and k.out_features % head_dim == 0:
        kv = k.out_features // head_dim
        if q.out_features % (kv * head_dim) == 0 and not any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            qb = q.out_features // kv  # a key/value head and the query heads that share it move together
            a = f"{prefix}self_attn."
            blocks = {"q": qb, "k": head_dim, "v": head_dim}
            m = [(f"{a}{x}_proj.weight", 0, 0, b) for x, b in blocks.items()] + [(f"{a}o_proj.weight", 1, 0, qb)]
            m += [(f"{a}{x}_proj.bias", 0, 0, b) for (x, b), p in zip(blocks.items(), (q, k, v)) if _has_bias(p)]
            groups.append(UnitGroup("heads", kv, tuple(m)))
    return groups


def find_unit_groups(module: nn.Module) -> list[UnitGroup]:
    """The permutable units of ``module``'s recognised blocks (open_clip residual blocks, Llama-style layers).

    Example:
        >>> find_unit_groups(nn.Linear(2, 2))
        []
    """
    from lightning_mergeguard.models.blocks import transformer_blocks

    groups: list[UnitGroup] = []
    for _, prefix, sub, kind in transformer_blocks(module):
        groups += _llama_units(prefix, sub) if kind == "llama" else _open_clip_units(prefix, sub)
    params = dict(module.named_parameters())
    return [g for g in groups if all(m[0] in params for m in g.members)]


def _units(t: Tensor, member: tuple[str, int, int, int], n: int) -> Tensor:
    """``[n, -1]``: each unit's slice of ``t``, flattened, normalised (so a rescaled unit still matches)."""
    _, dim, offset, block = member
    x = t.double().narrow(dim, offset, n * block).movedim(dim, 0).reshape(n, block, -1).reshape(n, -1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _match(state: Mapping[str, Tensor], anchor: Mapping[str, Tensor], g: UnitGroup) -> Tensor:
    """``perm`` with ``state``'s unit ``perm[u]`` matching ``anchor``'s unit ``u``."""
    sim = sum(_units(state[m[0]], m, g.units).cpu() @ _units(anchor[m[0]], m, g.units).cpu().T for m in g.members)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - SciPy comes with scikit-learn here
        return sim.argmax(dim=0)
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    perm = torch.empty(g.units, dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm


def permute_units(state: Mapping[str, Tensor], g: UnitGroup, perm: Tensor) -> dict[str, Tensor]:
    """A new state dict whose unit ``u`` is the old unit ``perm[u]`` in every member of ``g``.

    Example:
        >>> g = UnitGroup("mlp", 2, (("fc", 0, 0, 1), ("proj", 1, 0, 1)))
        >>> s = permute_units({"fc": torch.tensor([[1.0], [2.0]]), "proj": torch.tensor([[1.0, 2.0]])}, g,
        ...                   torch.tensor([1, 0]))
        >>> s["fc"].flatten().tolist(), s["proj"].flatten().tolist()
        ([2.0, 1.0], [2.0, 1.0])
    """
    out = dict(state)
    for name, dim, offset, block in g.members:
        t = out[name]
        index = torch.arange(t.shape[dim])
        span = (perm.view(-1, 1) * block + torch.arange(block)).flatten() + offset
        index[offset : offset + g.units * block] = span
        out[name] = t.index_select(dim, index.to(t.device))
    return out


@torch.no_grad()
def align_to_base(state: Mapping[str, Tensor], base: Mapping[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """``state`` expressed in ``base``'s coordinates: stream permutation, unit permutations and scales undone.

    Args:
        state: The suspect's state dict, names as in ``module.named_parameters()``.
        base: ``theta_pre`` (same names).
        module: A model of the architecture (its structure is read, not its weights).

    Returns:
        The aligned state dict (tensors nothing moved are the input's objects). Architectures with no recognised
        blocks come back unchanged.

    Raises:
        KeyError: If ``state`` or ``base`` lacks a tensor the architecture's symmetries name.

    Example:
        >>> align_to_base({"weight": torch.ones(2, 2)}, {"weight": torch.ones(2, 2)}, nn.Linear(2, 2))["weight"].sum()
        tensor(4.)
    """
    from lightning_mergeguard.protection.release.residual import (
        estimate_permutation,
        find_residual_stream,
        permute_residual,
    )
    from lightning_mergeguard.protection.release.symmetry import find_symmetries, realign

    out = dict(state)
    stream = find_residual_stream(module)
    if stream is not None:
        perm = estimate_permutation(out, base, stream)
        if not torch.equal(perm, torch.arange(stream.width)):
            out = permute_residual(out, stream, torch.argsort(perm))
    for g in find_unit_groups(module):
        perm = _match(out, base, g)
        if not torch.equal(perm, torch.arange(g.units)):
            out = permute_units(out, g, perm)
    groups = find_symmetries(module)
    return realign(out, base, groups) if groups else out

"""Which parameters a defense touches, and how they group into "layers"."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_STAGE2_EXCLUDE",
    "group_layers",
    "load_matching",
    "match_names",
    "select_parameters",
    "snapshot",
    "write_scaled_",
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

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|resblocks|block)\.\d+)\.")


def select_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    *,
    trainable_only: bool = True,
) -> dict[str, nn.Parameter]:
    """Named floating-point parameters whose name matches any ``include`` regex and no ``exclude`` regex.

    Args:
        module: The module.
        include: Regexes (``re.search``); ``None`` selects everything.
        exclude: Regexes to drop.
        trainable_only: Skip parameters with ``requires_grad=False``.

    Returns:
        Name -> parameter, in module order.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> list(select_parameters(net, exclude=[r"bias"]))
        ['0.weight', '1.weight']
    """
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in exclude]
    out = {}
    for name, p in module.named_parameters():
        if not p.is_floating_point() or (trainable_only and not p.requires_grad):
            continue
        if inc is not None and not any(r.search(name) for r in inc):
            continue
        if any(r.search(name) for r in exc):
            continue
        out[name] = p
    return out


def group_layers(names: Iterable[str], granularity: str = "block") -> dict[str, list[str]]:
    """Group parameter names into layers.

    ``"tensor"``: every tensor is a layer. ``"module"``: parameters of one module (``x.weight``, ``x.bias``) form a
    layer. ``"block"``: transformer blocks (``...layers.3.``, ``...resblocks.3.``, ``...h.3.``) form one layer each;
    parameters outside blocks fall back to their module.

    Example:
        >>> group_layers(["model.layers.0.mlp.w", "model.layers.0.attn.q", "lm_head.weight"])
        {'model.layers.0': ['model.layers.0.mlp.w', 'model.layers.0.attn.q'], 'lm_head': ['lm_head.weight']}
    """
    if granularity not in {"tensor", "module", "block"}:
        raise ValueError(f"granularity must be 'tensor', 'module' or 'block', got {granularity!r}")
    groups: dict[str, list[str]] = {}
    for name in names:
        if granularity == "tensor":
            key = name
        else:
            m = _BLOCK.match(name) if granularity == "block" else None
            key = m.group(1) if m else (name.rsplit(".", 1)[0] if "." in name else name)
        groups.setdefault(key, []).append(name)
    return groups


def snapshot(params: dict[str, Tensor], device: str | None = None) -> dict[str, Tensor]:
    """Detached copies of parameters (optionally on another device)."""
    return {n: p.detach().to(device or p.device, copy=True) for n, p in params.items()}


def match_names(names: Iterable[str], available: Iterable[str], what: str = "source") -> dict[str, str]:
    """Map module parameter names to keys of another state dict, stripping leading components as needed.

    A LightningModule's ``backbone.0.weight`` matches ``backbone.0.weight`` or ``0.weight`` in a checkpoint of the
    bare network (a ``model.`` or ``backbone.`` prefix is the usual difference).

    Raises:
        ValueError: Naming the first parameter that has no counterpart.

    Example:
        >>> match_names(["backbone.0.weight"], ["0.weight", "0.bias"])
        {'backbone.0.weight': '0.weight'}
    """
    keys = set(available)
    out = {}
    for name in names:
        parts = name.split(".")
        match = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in keys), None)
        if match is None:
            raise ValueError(f"{what} has no tensor for parameter {name!r}")
        out[name] = match
    return out


def load_matching(path: str | os.PathLike[str], names: Iterable[str], what: str) -> dict[str, Tensor]:
    """Load the tensors of a checkpoint (any form :func:`open_source` reads) that match parameter ``names``.

    Names are matched with :func:`match_names`, so a checkpoint of the bare network serves a LightningModule.

    Raises:
        ValueError: Naming the first parameter that has no counterpart.
    """
    from lightning_mergeguard.merging.sources import open_source

    src = open_source(path, name=what)
    return {name: src.get(key) for name, key in match_names(names, src.keys(), what=f"{what} {path}").items()}


@torch.no_grad()
def write_scaled_(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    live: Mapping[str, Tensor],
    scale: float,
    mask: Mapping[str, Tensor] | None = None,
) -> None:
    """In place: ``p = reference + scale * (live - reference)``, the scaled task vector every merge applies.

    ``scale=1`` (without a mask) restores ``live`` exactly. With ``mask``, the task vector is multiplied by it
    elementwise first (a DARE-style copy when the mask is a random keep mask and ``scale`` includes ``1/density``).

    Example:
        >>> p = {"w": torch.zeros(2)}
        >>> write_scaled_(p, {"w": torch.ones(2)}, {"w": torch.tensor([3.0, 5.0])}, 0.5)
        >>> p["w"]
        tensor([2., 3.])
        >>> keep = {"w": torch.tensor([1.0, 0.0])}
        >>> write_scaled_(p, {"w": torch.ones(2)}, {"w": torch.tensor([3.0, 5.0])}, 2.0, keep)
        >>> p["w"]
        tensor([5., 1.])
    """
    for n, p in params.items():
        if mask is not None:
            p.copy_(reference[n] + scale * mask[n] * (live[n] - reference[n]))
        elif scale == 1:
            p.copy_(live[n])
        else:
            p.copy_(reference[n] + scale * (live[n] - reference[n]))

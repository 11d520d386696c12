"""Which parameters a callback touches, and how they group into "layers"."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["group_layers", "select_parameters"]

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

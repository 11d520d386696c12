"""Where a tensor sits in its model's layer stack: the ``t`` at which mergekit evaluates gradient parameters.

mergekit lets a parameter be a *gradient*, a list of values interpolated across the layers
(``t: [0, 0.5, 0.3, 0.7, 1]`` in its SLERP example). It evaluates a tensor of layer ``i`` of ``L`` at
``t = i / (L - 1)`` (``t = 1`` when ``L == 1``), and the tensors outside the layers (embeddings, final norm, heads)
at ``t = 0``. mergekit knows the layers from each architecture's definition; this engine reads them from the tensor
names: the first ``<stack>.<index>.`` component whose stack is one of :data:`LAYER_STACKS` (``model.layers.3.``
in Llama/Mistral/Qwen, ``transformer.h.3.`` in GPT-2, ``encoder.layer.3.`` in BERT, ``transformer.resblocks.3.``
in open_clip). Each stack (prefix) counts its own layers, as mergekit's multi-module architectures do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["LAYER_STACKS", "group_layers", "layer_fractions", "layer_index"]

LAYER_STACKS = ("layers", "layer", "h", "blocks", "block", "resblocks")
"""Names of the module lists that hold a model's layers."""

_LAYER = re.compile(rf"^((?:.*?\.)?(?:{'|'.join(LAYER_STACKS)}))\.(\d+)\.")


def layer_index(name: str) -> tuple[str, int] | None:
    """The layer stack (its name prefix) and index of a tensor, or ``None`` outside the layers.

    Example:
        >>> layer_index("transformer.h.11.attn.c_attn.weight"), layer_index("lm_head.weight")
        (('transformer.h', 11), None)
    """
    m = _LAYER.match(name)
    return None if m is None else (m.group(1), int(m.group(2)))


def layer_fractions(names: Iterable[str]) -> dict[str, float]:
    """Mergekit's ``t`` of every tensor name: ``index / (layers - 1)`` in its stack, 0 outside the layers.

    Args:
        names: Every tensor name of the model (the layer count of each stack is its largest index + 1).

    Returns:
        Name -> ``t`` in ``[0, 1]``.

    Example:
        >>> names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
        ...          "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight", "lm_head.weight"]
        >>> layer_fractions(names)
        {'model.embed_tokens.weight': 0.0, 'model.layers.0.mlp.up_proj.weight': 0.0,
         'model.layers.1.mlp.up_proj.weight': 0.5, 'model.layers.2.mlp.up_proj.weight': 1.0, 'lm_head.weight': 0.0}
    """
    names = list(names)
    where: dict[str, tuple[str, int]] = {}
    depth: dict[str, int] = {}
    for name in names:
        found = layer_index(name)
        if found is not None:
            stack, index = where[name] = found
            depth[stack] = max(depth.get(stack, 0), index + 1)
    out = {}
    for name in names:
        if name not in where:
            out[name] = 0.0
            continue
        stack, index = where[name]
        layers = depth[stack]
        out[name] = index / (layers - 1) if layers > 1 else 1.0
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
            found = layer_index(name) if granularity == "block" else None
            key = f"{found[0]}.{found[1]}" if found else (name.rsplit(".", 1)[0] if "." in name else name)
        groups.setdefault(key, []).append(name)
    return groups

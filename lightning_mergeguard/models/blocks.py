"""The transformer blocks the library recognises by their attributes.

Llama-style decoder layers and open_clip residual attention blocks: what the symmetry, permutation and alignment
code knows how to transform.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from torch import nn

__all__ = ["transformer_blocks"]

_LLAMA = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_OPEN_CLIP = ("ln_1", "attn", "ln_2", "mlp")


def transformer_blocks(module: nn.Module) -> Iterator[tuple[str, str, nn.Module, Literal["llama", "open_clip"]]]:
    """``(name, prefix, block, kind)`` of every recognised block in ``module``, in ``named_modules`` order.

    Args:
        module: Any model.

    Returns:
        An iterator; ``prefix`` is ``name + "."`` (empty for the module itself).

    Example:
        >>> list(transformer_blocks(nn.Linear(2, 2)))
        []
    """
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if all(hasattr(sub, x) for x in _LLAMA):
            yield name, prefix, sub, "llama"
        elif all(hasattr(sub, x) for x in _OPEN_CLIP):
            yield name, prefix, sub, "open_clip"

"""What a merge method declares: its parameters with mergekit's names and defaults, and its per-tensor function."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["REQUIRED", "MethodSpec", "TensorContext"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Marks a model parameter without a default (for example ``weight``)."""


@dataclass(frozen=True)
class TensorContext:
    """Per-tensor facts a method may need besides the tensors themselves.

    Attributes:
        key: The tensor's name in the state dict.
        seed: Seed of a randomized merge (DARE); ``None`` draws from torch's global generator.
        model_thresholds: Per-model magnitude thresholds for whole-model trimming (TIES ``trim_scope="model"``).
    """

    key: str = ""
    seed: int | None = None
    model_thresholds: Sequence[float] | None = None

    def generator(self, model_index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded from ``(seed, model_index, key)``, independent of the order tensors are merged in."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(zlib.crc32(f"{self.seed}:{model_index}:{self.key}".encode()))
        return g


MergeTensorFn = Callable[
    [Tensor | None, Sequence[Tensor], Sequence[Mapping[str, Any]], Mapping[str, Any], TensorContext], Tensor
]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as the engine and the config reader see it.

    Attributes:
        name: mergekit's ``merge_method`` name.
        merge_tensor: ``f(base, tensors, model_params, shared_params, ctx) -> merged tensor``.
        shared_params: Method-level parameters (``parameters:`` in YAML) and their defaults.
        model_params: Per-model parameters (``models[].parameters``) and defaults (``REQUIRED`` for none).
        needs_base: Whether ``base_model`` is required.
        min_models: Fewest models (not counting the base).
        max_models: Most models, or ``None``.
        randomized: Whether the result depends on a seed.
        extensions: Shared parameters this engine adds beyond mergekit (not written to mergekit YAML at default).
        description: One line for ``--help`` and error messages.
    """

    name: str
    merge_tensor: MergeTensorFn
    shared_params: Mapping[str, Any] = field(default_factory=dict)
    model_params: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    extensions: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def all_shared_params(self) -> dict[str, Any]:
        """Shared parameters including this engine's extensions."""
        return {**self.shared_params, **self.extensions}

"""What a merge method declares: its parameters (name, default, type, range) and its per-tensor function.

A method is data: a :class:`MethodSpec` with :class:`Param` declarations that the config reader validates against
(no table of parameter names elsewhere), a ``merge_tensor`` function, and an optional ``prepare`` hook for work over
the whole model before the per-tensor pass (TIES's whole-model trim threshold).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["REQUIRED", "CheckFn", "MethodSpec", "Param", "TensorContext"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Marks a model parameter without a default (for example ``weight``)."""


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its default, its type and its allowed values.

    Attributes:
        default: The value when the config does not set it (:data:`REQUIRED` for none).
        kind: ``"number"`` (a finite int or float), ``"int"`` (a whole number), ``"bool"`` or ``"choice"`` (one of
            ``choices``).
        low: Smallest allowed number (``None``: unbounded).
        high: Largest allowed number.
        low_open: Whether ``low`` itself is excluded.
        high_open: Whether ``high`` itself is excluded.
        choices: Allowed strings for ``kind="choice"``.

    Example:
        >>> Param(1.0, low=0.0, high=1.0, low_open=True).check("models[0]", "density", 0.0)
        Traceback (most recent call last):
        ...
        lightning_mergeguard.errors.ConfigError: models[0]: density must be in (0, 1], got 0.0
    """

    default: Any = REQUIRED
    kind: str = "number"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def check(self, where: str, name: str, value: Any) -> None:
        """Raise :class:`~lightning_mergeguard.errors.ConfigError` naming ``where`` if ``value`` is not allowed."""
        from lightning_mergeguard.errors import ConfigError

        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: parameter {name!r} must be true or false, got {value!r}")
            return
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(
                    f"{where}: parameter {name!r} must be one of {', '.join(self.choices)}, got {value!r}"
                )
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: parameter {name!r} must be a number, got {value!r}")
        if self.kind == "int" and not float(value).is_integer():
            raise ConfigError(f"{where}: parameter {name!r} must be a whole number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: parameter {name!r} must be finite, got {value!r}")
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if too_low or too_high:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            interval = f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
            raise ConfigError(f"{where}: {name} must be in {interval}, got {value}")


WEIGHT = Param(REQUIRED)
DENSITY = Param(1.0, low=0.0, high=1.0, low_open=True)
GAMMA = Param(0.01, low=0.0, high=1.0, high_open=True)
LAMBDA = Param(1.0)
INT8_MASK = Param(False, kind="bool")
"""mergekit's ``int8_mask`` holds the TIES sign mask in int8 instead of the compute dtype, to save memory; this
engine's mask is always a 1-byte bool tensor, so both settings give identical results and memory."""


def flag(default: bool) -> Param:
    """A boolean parameter with this default."""
    return Param(default, kind="bool")


@dataclass(frozen=True)
class TensorContext:
    """Per-tensor facts a method may need besides the tensors themselves.

    Attributes:
        key: The tensor's name in the state dict.
        seed: Seed of a randomized merge (DARE); ``None`` draws from torch's global generator.
        prepared: What the method's ``prepare`` hook computed over the whole model (``None`` without one), e.g.
            TIES's per-model magnitude thresholds for ``trim_scope="model"``.
    """

    key: str = ""
    seed: int | None = None
    prepared: Any = None

    def generator(self, model_index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded from ``(seed, model_index, key)``, independent of the order tensors are merged in.

        Args:
            model_index: The donor's index in the config.
            device: Where the generator draws.

        Returns:
            The generator, or ``None`` when the config has no seed.
        """
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(zlib.crc32(f"{self.seed}:{model_index}:{self.key}".encode()))
        return g


MergeTensorFn = Callable[
    [Tensor | None, Sequence[Tensor], Sequence[Mapping[str, Any]], Mapping[str, Any], TensorContext], Tensor
]
CheckFn = Callable[[str, Mapping[str, Any]], None]
"""``check(where, params)``: raise :class:`~lightning_mergeguard.errors.ConfigError` naming ``where`` if one
model's parameters do not go together (DELLA's ``density +/- epsilon``)."""
PrepareFn = Callable[[Any, Any, Sequence[Any], torch.device], Any]
"""``prepare(config, base_source, donor_sources, device)``: whole-model work before the per-tensor pass."""


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as the engine and the config reader see it.

    Attributes:
        name: mergekit's ``merge_method`` name.
        merge_tensor: ``f(base, tensors, model_params, shared_params, ctx) -> merged tensor``.
        shared_params: Method-level parameters (``parameters:`` in YAML), declared as :class:`Param`.
        model_params: Per-model parameters (``models[].parameters``), declared as :class:`Param`.
        needs_base: Whether ``base_model`` is required.
        min_models: Fewest models (not counting the base).
        max_models: Most models, or ``None``.
        randomized: Whether the result depends on a seed.
        extensions: Shared parameters this engine adds beyond mergekit (not written to mergekit YAML at default).
        description: One line for ``--help`` and error messages.
        prepare: Optional whole-model hook run once before the per-tensor pass; its result reaches
            ``merge_tensor`` as ``ctx.prepared``.
        check_params: Optional check of one model's parameters taken together (each is checked alone against its
            :class:`Param` already); run by the config reader on scalar settings and by ``merge_tensor`` per tensor.
        elementwise: Whether ``merge_tensor`` acts on each entry on its own (a weighted sum: linear, task
            arithmetic), so that merging slices of the flattened tensors gives the same bytes. The engine then merges
            large tensors in cache-sized chunks, reusing its buffers.
        base_is_model: Whether a ``base_model``, when the config names one, is merged as one more model with its
            own ``models[]`` parameters, as mergekit gathers the base's tensors with the others' (``linear``):
            ``merge_tensor`` then gets the base's parameters first, ``[base, *donors]``.
    """

    name: str
    merge_tensor: MergeTensorFn
    shared_params: Mapping[str, Param] = field(default_factory=dict)
    model_params: Mapping[str, Param] = field(default_factory=dict)
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    extensions: Mapping[str, Param] = field(default_factory=dict)
    description: str = ""
    prepare: PrepareFn | None = None
    check_params: CheckFn | None = None
    elementwise: bool = False
    base_is_model: bool = False

    @property
    def all_shared_params(self) -> dict[str, Param]:
        """Shared parameters including this engine's extensions."""
        return {**self.shared_params, **self.extensions}

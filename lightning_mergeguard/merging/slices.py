"""Plan a mergekit ``slices`` merge: which input tensor each output tensor is merged from, slice by slice.

mergekit's ``slices`` list the output's layers slice after slice; each slice merges layers ``[start, end)`` of
each of its sources (the same count each) into its layers. Output layer ``k`` of a slice that starts at output
layer ``o`` is merged from layer ``start + (k - o)`` of every source, so a slice can cut a model, stack layers of
several models (``passthrough`` frankenmerges), or merge different layer ranges. The tensors outside the layers
come, as mergekit's architecture files list them, from the first slice's sources (embeddings: names with ``emb``,
``wte``, ``wpe``, ``conv1``, ``ln_pre``...) or the last's (everything else: the final norm, the LM head).

:func:`plan_slices` turns a sliced config into :class:`SlicePart` s, each an ordinary whole-model merge of renamed
views of the sources (:class:`RenamedSource`), so every method, check and streaming path of the engine applies
unchanged. Gradient parameters interpolate within each slice, as mergekit evaluates them: layer ``i`` of a slice
of ``n`` at ``t = i / (n - 1)`` (``t = 1`` for a one-layer slice), tensors outside the layers at ``t = 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_mergeguard.errors import ConfigError, IncompatibleModelsError
from lightning_mergeguard.merging.config import MergeConfig
from lightning_mergeguard.merging.layers import layer_index
from lightning_mergeguard.merging.sources import RenamedSource, WeightSource
from lightning_mergeguard.validation import is_int

__all__ = ["LAYER_COUNT_KEYS", "SlicePart", "output_model_config", "plan_slices"]

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
"""``config.json`` keys that hold the layer count, which a slices merge sets to the output's."""
_PRE_NAMES = frozenset({"wte", "wpe", "shared", "conv1", "conv2", "ln_pre", "layernorm_pre", "patch_conv"})


def is_pre_weight(name: str) -> bool:
    """Whether a tensor outside the layers comes before them (embeddings), as mergekit's architectures list them.

    Example:
        >>> is_pre_weight("model.embed_tokens.weight"), is_pre_weight("model.norm.weight")
        (True, False)
        >>> is_pre_weight("gpt_neox.embed_out.weight"), is_pre_weight("transformer.wte.weight")
        (False, True)
    """
    parts = name.split(".")
    return any(p in _PRE_NAMES or ("emb" in p and p != "embed_out") for p in parts)


@dataclass
class SlicePart:
    """One whole-model merge of a slices merge: a slice's layers, or the tensors before or after the layers.

    Attributes:
        config: The slice as a ``models:`` config (:meth:`MergeConfig.slice_config`).
        base: The base's view (``None`` when the slice has no base among its sources).
        donors: The other sources' views, aligned with ``config.donors``.
        keys: Output tensor names, in order.
        positions: Each output name's ``t`` for gradient parameters.
        aligned: Whether every source gives the same layers (the same-base check compares like with like).
    """

    config: MergeConfig
    base: WeightSource | None
    donors: list[WeightSource]
    keys: list[str]
    positions: dict[str, float]
    aligned: bool = True


@dataclass
class _Layers:
    stack: str
    count: int
    suffixes: dict[int, list[str]]  # layer -> its tensor names after '<stack>.<index>.'
    outside: list[str]  # names outside the layers, in order


def _layers(src: WeightSource) -> _Layers:
    stacks: dict[str, dict[int, list[str]]] = {}
    outside = []
    for name in src.keys():
        found = layer_index(name)
        if found is None:
            outside.append(name)
            continue
        stack, index = found
        stacks.setdefault(stack, {}).setdefault(index, []).append(name[len(f"{stack}.{index}.") :])
    if len(stacks) != 1:
        what = f"{len(stacks)} layer stacks ({', '.join(sorted(stacks))})" if stacks else "no layer stack"
        raise IncompatibleModelsError(
            f"slices need models with one stack of numbered layers ('model.layers.N.', 'transformer.h.N.'...); "
            f"model {src.name!r} has {what}: list whole models under 'models' instead"
        )
    ((stack, layers),) = stacks.items()
    count = max(layers) + 1
    gaps = [i for i in range(count) if i not in layers]
    if gaps:
        raise IncompatibleModelsError(f"model {src.name!r} has no tensors for layer(s) {gaps} of {stack!r}")
    return _Layers(stack, count, layers, outside)


def plan_slices(cfg: MergeConfig, sources: Mapping[str, WeightSource]) -> list[SlicePart]:
    """The whole-model merges a sliced config is made of, in output order.

    Args:
        cfg: A config with ``slices``.
        sources: Every model the slices name (and the base), by the config's reference.

    Raises:
        ConfigError: A layer range past a model's layers.
        IncompatibleModelsError: Models without one layer stack, or a slice whose sources' layers hold different
            tensors.
    """
    if not cfg.slices:
        raise ValueError("plan_slices needs a config with slices")
    layers = {name: _layers(sources[name]) for name in dict.fromkeys(m.model for m in cfg.models)}
    stacks = {info.stack for info in layers.values()}
    if len(stacks) > 1:
        raise IncompatibleModelsError(f"the models' layers are in different stacks: {', '.join(sorted(stacks))}")
    stack = stacks.pop()
    layer_parts: list[SlicePart] = []
    out_layer = 0
    for i, out in enumerate(cfg.slices):
        sub = cfg.slice_config(i)
        for j, src in enumerate(out.sources):
            have = layers[src.model].count
            if src.layer_range[1] > have:
                raise ConfigError(
                    f"slices[{i}].sources[{j}]: layer_range {list(src.layer_range)} but model {src.model!r} has "
                    f"{have} layers (0..{have - 1})"
                )
        n = out.sources[0].num_layers
        names: dict[str, dict[str, str]] = {src.model: {} for src in out.sources}
        positions = {}
        for offset in range(n):
            first = out.sources[0]
            suffixes = layers[first.model].suffixes[first.layer_range[0] + offset]
            for src in out.sources:
                index = src.layer_range[0] + offset
                theirs = layers[src.model].suffixes[index]
                if set(theirs) != set(suffixes):
                    missing = sorted(set(suffixes) - set(theirs)) or sorted(set(theirs) - set(suffixes))
                    raise IncompatibleModelsError(
                        f"slices[{i}]: layer {index} of model {src.model!r} and layer "
                        f"{first.layer_range[0] + offset} of {first.model!r} hold different tensors ({missing[0]!r} "
                        "in one only)"
                    )
                for suffix in suffixes:
                    names[src.model][f"{stack}.{out_layer}.{suffix}"] = f"{stack}.{index}.{suffix}"
            for suffix in suffixes:
                positions[f"{stack}.{out_layer}.{suffix}"] = offset / (n - 1) if n > 1 else 1.0
            out_layer += 1
        aligned = len({src.layer_range for src in out.sources}) == 1
        layer_parts.append(_part(sub, sources, names, list(positions), positions, aligned))
    pre, post = _outside(cfg, layers, sources)
    return [part for part in (pre, *layer_parts, post) if part.keys]


def _outside(
    cfg: MergeConfig, layers: Mapping[str, _Layers], sources: Mapping[str, WeightSource]
) -> tuple[SlicePart, SlicePart]:
    """The tensors before the layers (from the first slice's sources) and after them (from the last slice's)."""
    assert cfg.slices is not None
    out = []
    for index, before in ((0, True), (len(cfg.slices) - 1, False)):
        models = [src.model for src in cfg.slices[index].sources]
        keys = [k for k in layers[models[0]].outside if is_pre_weight(k) == before]
        names = {m: {k: k for k in keys if k in set(sources[m].keys())} for m in models}
        out.append(_part(cfg.slice_config(index), sources, names, keys, dict.fromkeys(keys, 0.0), True))
    return out[0], out[1]


def _part(
    sub: MergeConfig,
    sources: Mapping[str, WeightSource],
    names: Mapping[str, Mapping[str, str]],
    keys: list[str],
    positions: dict[str, float],
    aligned: bool,
) -> SlicePart:
    views = {m: RenamedSource(sources[m], names[m], drop_config=LAYER_COUNT_KEYS) for m in names}
    base = views[sub.base_model] if sub.base_model is not None else None
    return SlicePart(sub, base, [views[m.model] for m in sub.donors], keys, positions, aligned)


def output_model_config(
    cfg: MergeConfig, reference: dict[str, Any], sources: Mapping[str, WeightSource]
) -> dict[str, Any]:
    """The output's ``config.json``: the reference's, with the output's layer count and per-layer settings.

    ``layer_types`` (sliding or full attention, per layer) is taken, layer by layer, from the config of the model
    each output layer comes from (the slice's first source), since a layer's weights were trained for its type.

    Raises:
        ConfigError: When a per-layer ``layer_types`` cannot be built from the sources' configs.
    """
    assert cfg.slices is not None
    out = dict(reference)
    total = sum(s.sources[0].num_layers for s in cfg.slices)
    for key in LAYER_COUNT_KEYS:
        if is_int(out.get(key)):
            out[key] = total
    if isinstance(reference.get("layer_types"), list):
        types = []
        for i, s in enumerate(cfg.slices):
            first = s.sources[0]
            theirs = (sources[first.model].config or {}).get("layer_types")
            if not isinstance(theirs, list) or len(theirs) < first.layer_range[1]:
                raise ConfigError(
                    f"slices[{i}]: the output config needs each layer's layer_types, and model {first.model!r} gives "
                    f"none for layers {list(first.layer_range)}"
                )
            types.extend(theirs[first.layer_range[0] : first.layer_range[1]])
        out["layer_types"] = types
    return out

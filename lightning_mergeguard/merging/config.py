"""Merge configurations, read from and written to mergekit's YAML.

A :class:`MergeConfig` holds exactly what a mergekit YAML holds for the methods this engine runs
(``merge_method``, ``base_model``, ``models[].parameters`` or ``slices``, ``parameters``, ``dtype``, ``out_dtype``),
plus an optional ``seed`` for randomized methods. Parameters are scalars, mergekit's gradients (``[0, 0.5, 1]``,
interpolated across the layers: :mod:`~lightning_mergeguard.merging.layers`) or its filtered lists
(``[{filter: self_attn, value: 0.5}, {value: 0.3}]``, whose values may be gradients); validation names the
offending key.
"""

from __future__ import annotations

import copy
import difflib
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.merging.registry import get_method
from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, Param
from lightning_mergeguard.validation import is_int

__all__ = ["DTYPES", "MergeConfig", "ModelEntry", "OutputSlice", "SliceSource", "resolve_param"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_TOP_LEVEL = {
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "seed",
    "name",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
_PASSTHROUGH = ("name", "tokenizer_source", "tokenizer", "chat_template")


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
"""A merge config larger than this many values once YAML aliases are expanded is refused (a real one has <1000)."""


def _check_size(data: Any, limit: int = MAX_CONFIG_NODES) -> None:
    """Count the values of ``data`` as if every alias were expanded, stopping at ``limit`` (so this is O(limit)).

    YAML anchors and aliases let a 1 KB file describe billions of values ("billion laughs"); every later walk of
    the config would pay for them.
    """
    count = 0
    stack = [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(
                f"merge config expands to more than {limit} values (nested YAML anchors/aliases?); refusing to read it"
            )
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unweighted(spec: MethodSpec, name: str) -> str:
    if name != "weight" or "weight" in spec.model_params:
        return ""
    return f" ({spec.name} does not weight its models; mergekit ignores the setting silently, so remove it)"


def _is_gradient(value: Any) -> bool:
    """A mergekit gradient: a non-empty list of plain values (not ``{filter, value}`` entries)."""
    return isinstance(value, list) and bool(value) and all(not isinstance(v, Mapping) for v in value)


def _interpolate(values: list[Any], t: float) -> Any:
    """Mergekit's gradient evaluation at ``t``: numbers interpolate linearly, booleans and strings are picked."""
    if not all(is_int(v) or isinstance(v, float) for v in values):  # numbers, not bools
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_param(value: Any, tensor_name: str, t: float = 0.0) -> Any:
    """Evaluate a parameter setting for one tensor: a scalar, a gradient, or a mergekit filtered list.

    The first entry whose ``filter`` is missing, ``"*"``, or a substring of ``tensor_name`` wins. A gradient (a list
    of values) is interpolated at ``t``, the tensor's place in the layer stack
    (:func:`~lightning_mergeguard.merging.layers.layer_fractions`), exactly as mergekit does.

    Example:
        >>> resolve_param([{"filter": "mlp", "value": 0.2}, {"value": 0.7}], "layers.0.mlp.up_proj.weight")
        0.2
        >>> resolve_param([0.0, 0.5, 0.3, 0.7, 1.0], "layers.5.self_attn.q_proj.weight", t=0.625)
        0.5
    """
    if isinstance(value, Mapping):
        value = [value]
    if _is_gradient(value):
        return _interpolate(value, t)
    if isinstance(value, list):
        for cond in value:
            filt = cond.get("filter")
            if filt is None or filt == "*" or filt in tensor_name:
                return resolve_param(cond["value"], tensor_name, t)
        return None
    return value


def _check_setting(where: str, name: str, value: Any, param: Param) -> None:
    """Check a setting (a scalar, a gradient, or a mergekit list of ``{filter, value}`` entries) against its Param."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: parameter {name!r} is an empty list")
        if _is_gradient(value):
            if param.kind == "int":
                raise ConfigError(
                    f"{where}: parameter {name!r} takes a whole number, not a gradient list {value}: interpolated "
                    "values would not be whole"
                )
            for v in value:  # numbers interpolate between these, so every value in between is allowed too
                param.check(where, name, v)
            if len({type(v) is bool for v in value}) > 1:
                raise ConfigError(f"{where}: parameter {name!r} mixes booleans and numbers in a gradient {value}")
            return
        for cond in value:
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise ConfigError(
                    f"{where}: parameter {name!r} mixes {{filter, value}} entries with plain values; use one or the "
                    "other"
                )
            extra = set(cond) - {"filter", "value"}
            if extra:
                raise ConfigError(f"{where}: parameter {name!r} entry has unknown keys {sorted(extra)}")
            _check_setting(where, name, cond["value"], param)
        return
    param.check(where, name, value)


def _has_gradient(value: Any) -> bool:
    if isinstance(value, Mapping):
        return _has_gradient(value.get("value"))
    if _is_gradient(value):
        return True
    return isinstance(value, list) and any(_has_gradient(v) for v in value)


def _looks_like_a_path(text: str) -> bool:
    """A one-line config source that is a file name rather than YAML text (a mapping has a ``:``)."""
    return text.endswith((".yml", ".yaml", ".json")) or ((os.sep in text or "/" in text) and ": " not in text)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """A config's ``parameters`` block as a dict (``None`` is empty); anything else is a typo, named."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of name: value, got {type(value).__name__} {value!r:.80}")
    return dict(value)


def _model_path(value: Any, where: str) -> str:
    """A model reference: a path or Hub id, optionally ``BASE+ADAPTER`` (mergekit's nested form is not read)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, os.PathLike)):
        raise ConfigError(
            f"{where} must be a path or Hub id (or 'BASE+LORA'), got {type(value).__name__} {value!r:.80}; "
            "mergekit's nested model references are not supported"
        )
    return str(value)


@dataclass
class ModelEntry:
    """One ``models:`` entry: a model reference (path or name) and its parameters.

    Attributes:
        model: The model's path or name, as the config lists it.
        parameters: Its parameters (``weight``, ``density``...), as the config gives them.
    """

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One source of a mergekit output slice: layers ``[start, end)`` of a model, and that model's parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_range = tuple(self.layer_range)  # type: ignore[assignment]

    @property
    def num_layers(self) -> int:
        """How many layers the source gives the slice."""
        return self.layer_range[1] - self.layer_range[0]


@dataclass
class OutputSlice:
    """One mergekit output slice: its sources (the same number of layers each), merged layer by layer.

    Attributes:
        sources: The models and layer ranges merged into this slice's layers.
        base_model: This slice's base model (default: the config's).
        parameters: Parameters for this slice, between the sources' own and the config's in precedence.
    """

    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SliceSource) else SliceSource(**s) for s in self.sources]


def _chain(first: Mapping[str, Any], then: Mapping[str, Any]) -> dict[str, Any]:
    """``first``'s settings over ``then``'s, falling back per tensor as mergekit does.

    A filtered list in ``first`` that no entry of matches a tensor leaves that tensor to ``then``'s setting, so the
    two become one filtered list: ``first``'s entries, then ``then``'s.
    """
    out = dict(then)
    for name, value in first.items():
        if name in then and isinstance(value, (list, Mapping)) and not _is_gradient(value):
            rest = then[name]
            if isinstance(rest, Mapping):
                rest = [rest]
            tail = rest if isinstance(rest, list) and not _is_gradient(rest) else [{"value": rest}]
            value = [*(value if isinstance(value, list) else [value]), *tail]
        out[name] = copy.deepcopy(value)
    return out


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok and all(is_int(v) for v in value) and 0 <= value[0] < value[1]:
        return int(value[0]), int(value[1])
    raise ConfigError(
        f"{where}: layer_range must be [start, end] with 0 <= start < end (layers start..end-1), got {value!r}"
    )


def _read_slices(entries: Any) -> list[OutputSlice]:
    """The ``slices:`` list of a mergekit config, checked key by key."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence) or not entries:
        raise ConfigError(
            "'slices' must be a non-empty list of output slices ('- sources: [{model: PATH, layer_range: [0, N]}]')"
        )
    out = []
    for i, entry in enumerate(entries):
        where = f"slices[{i}]"
        if not isinstance(entry, Mapping) or "sources" not in entry:
            raise ConfigError(f"{where} must be a mapping with a 'sources' list, got {entry!r:.80}")
        if "residual_weight" in entry:
            raise ConfigError(f"{where}: residual_weight is read by mergekit but never used in a merge; remove it")
        bad = set(entry) - {"sources", "base_model", "parameters"}
        if bad:
            name = sorted(bad)[0]
            raise ConfigError(
                f"{where} has unknown key {name!r}{_suggest(name, ['sources', 'base_model', 'parameters'])}"
            )
        raw = entry["sources"]
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence) or not raw:
            raise ConfigError(f"{where}.sources must be a non-empty list of {{model, layer_range}} entries")
        sources = []
        for j, src in enumerate(raw):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{at} must be a mapping with 'model' and 'layer_range', got {src!r:.80}")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(f"{at} has unknown keys {sorted(extra)}")
            path = _model_path(src["model"], f"{at}.model")
            sources.append(
                SliceSource(
                    path,
                    _layer_range(src["layer_range"], at),
                    _mapping(src.get("parameters"), f"{at} ({path}): parameters"),
                )
            )
        base = entry.get("base_model")
        out.append(
            OutputSlice(
                sources,
                None if base is None else _model_path(base, f"{where}.base_model"),
                _mapping(entry.get("parameters"), f"{where}: parameters"),
            )
        )
    return out


def _slice_dict(out: OutputSlice, drop: Sequence[str] = ()) -> dict[str, Any]:
    """One output slice as mergekit's YAML writes it, without the parameters named in ``drop``."""

    def params(settings: Mapping[str, Any]) -> dict[str, Any]:
        kept = {k: copy.deepcopy(v) for k, v in settings.items() if k not in drop}
        return {"parameters": kept} if kept else {}

    sources = [
        {"model": src.model, "layer_range": list(src.layer_range), **params(src.parameters)} for src in out.sources
    ]
    return {
        "sources": sources,
        **({"base_model": out.base_model} if out.base_model is not None else {}),
        **params(out.parameters),
    }


@dataclass
class MergeConfig:
    """A merge, as mergekit's YAML describes it.

    Attributes:
        merge_method: mergekit method name (``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``,
            ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``slerp``, ``passthrough``...).
        models: Models to merge. An entry whose ``model`` equals ``base_model`` is the base, not a donor. With
            ``slices``, every model the slices name, without parameters (the slices hold them).
        base_model: Reference of the base model (required by all methods but ``linear``).
        parameters: Method-level parameters (``normalize``, ``lambda``, ``rescale``, ``t``...).
        dtype: Compute dtype; ``None`` (not in the YAML): ``float32`` here, and each tensor is written in the
            dtype it is stored in, as mergekit writes it (bfloat16 models merge into a bfloat16 model; mergekit also
            computes in that dtype, so the two differ by that dtype's rounding).
        out_dtype: Output dtype (default: ``dtype``, else each tensor's stored dtype).
        seed: Seed for randomized methods (DARE); not part of mergekit's YAML (mergekit takes
            ``--random-seed`` on its command line).
        extra: Keys kept for a faithful round trip (``tokenizer_source``, ``chat_template``...).
        slices: mergekit's ``slices`` instead of ``models``: the output's layers, slice after slice, each merged
            from its sources' layer ranges (:meth:`slice_config` gives each slice as a whole-model config).

    Example:
        >>> cfg = MergeConfig.from_yaml('''
        ... merge_method: ties
        ... base_model: base
        ... models:
        ...   - model: a
        ...     parameters: {weight: 0.6, density: 0.4}
        ...   - model: b
        ...     parameters: {weight: 0.4, density: 0.4}
        ... parameters: {normalize: true}
        ... ''')
        >>> cfg.shared_params()["lambda"], [m.model for m in cfg.donors]
        (1.0, ['a', 'b'])
    """

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    slices: list[OutputSlice] | None = None

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelEntry) else ModelEntry(**m) for m in self.models]
        if self.slices is not None:
            self.slices = [s if isinstance(s, OutputSlice) else OutputSlice(**s) for s in self.slices]
            if self.models:
                raise ConfigError("give either 'models' or 'slices', not both (mergekit takes exactly one)")
            self.models = [ModelEntry(m) for m in dict.fromkeys(src.model for s in self.slices for src in s.sources)]
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeConfig:
        """Build from a parsed mergekit YAML mapping, rejecting keys this engine does not understand."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a merge config must be a mapping, got {type(data).__name__}")
        _check_size(data)
        if "modules" in data:
            raise NotImplementedError(
                "mergekit 'modules' (per-module slices of multi-module models) are not supported; list whole models "
                "under 'models', or one layer stack's layers under 'slices'"
            )
        if "slices" in data and "models" in data:
            raise ConfigError("give either 'models' or 'slices', not both (mergekit takes exactly one)")
        unknown = set(data) - _TOP_LEVEL
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(f"unknown merge config key {name!r}{_suggest(name, sorted(_TOP_LEVEL))}")
        if "merge_method" not in data:
            raise ConfigError("merge config has no 'merge_method'")
        entries = data.get("models") or []
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
            raise ConfigError(
                f"'models' must be a list of entries ('- model: PATH' with optional 'parameters'), got "
                f"{type(entries).__name__} {entries!r:.80}"
            )
        models = []
        for i, m in enumerate(entries):
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, Mapping) or "model" not in m:
                raise ConfigError(f"models[{i}] must be a mapping with a 'model' key, got {m!r}")
            bad = set(m) - {"model", "parameters"}
            if bad:
                raise ConfigError(f"models[{i}] has unknown keys {sorted(bad)}")
            path = _model_path(m["model"], f"models[{i}].model")
            models.append(ModelEntry(path, _mapping(m.get("parameters"), f"models[{i}] ({path}): parameters")))
        return cls(
            merge_method=str(data["merge_method"]),
            models=models,
            base_model=None if data.get("base_model") is None else _model_path(data["base_model"], "base_model"),
            parameters=_mapping(data.get("parameters"), "parameters"),
            dtype=None if data.get("dtype") is None else str(data["dtype"]),
            out_dtype=None if data.get("out_dtype") is None else str(data["out_dtype"]),
            seed=data.get("seed"),
            extra={k: copy.deepcopy(data[k]) for k in _PASSTHROUGH if k in data},
            slices=_read_slices(data["slices"]) if "slices" in data else None,
        )

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> MergeConfig:
        """Read a mergekit YAML file (a path) or YAML text."""
        text = str(source)
        where = "merge config"
        if "\n" not in text and not Path(text).is_file() and _looks_like_a_path(text):
            # One line that names a file: YAML would read it as a string ("must be a mapping, got str").
            what = "is a directory, not a YAML file" if Path(text).is_dir() else "not found"
            raise FileNotFoundError(errno.ENOENT, f"merge config {what}", text)
        if isinstance(source, os.PathLike) or ("\n" not in text and Path(text).is_file()):
            path = Path(source)
            where = f"merge config {path}"
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes; refusing to read it")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where} is not UTF-8 text: {err}") from err
        try:
            data = yaml.safe_load(text)
        except yaml.composer.ComposerError as err:
            if "expected a single document" not in str(err):
                raise ConfigError(f"{where} is not valid YAML: {err}") from err
            raise ConfigError(
                f"{where} holds several YAML documents (a mergekit-multi file?): this engine runs one merge per "
                "config; write each stage to its own file and run them in order, each stage's output given as a "
                "model of the next"
            ) from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{where} is not valid YAML: {err}") from err
        except RecursionError as err:
            raise ConfigError(f"{where} nests too deeply to read") from err
        if data is None:
            raise ConfigError(f"{where} is empty")
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where} must be a mapping (merge_method:, models:, ...), got a YAML {type(data).__name__}"
            )
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str]) -> MergeConfig:
        """Accept a config object, a mapping, a YAML path or YAML text."""
        if isinstance(config, MergeConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        return cls.from_yaml(config)

    # ------------------------------------------------------------------ validation and lookup
    @property
    def method(self) -> MethodSpec:
        """The method's spec."""
        return get_method(self.merge_method)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype tensors are merged in: ``dtype``, else ``float32``."""
        return DTYPES[self.dtype or "float32"]

    def output_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a floating tensor stored as ``stored`` (in the base, or the first model) is written in.

        ``out_dtype``, else ``dtype``, else ``stored`` as mergekit keeps it, except a storage-only dtype (float8),
        which is written in the compute dtype.

        Args:
            stored: The dtype the tensor is stored in.

        Returns:
            ``out_dtype`` if set, else ``dtype`` if set, else ``stored``.
        """
        name = self.out_dtype or self.dtype
        if name is not None:
            return DTYPES[name]
        return stored if stored in DTYPES.values() else self.compute_dtype

    @property
    def donors(self) -> list[ModelEntry]:
        """The models merged into the base (entries equal to ``base_model`` excluded)."""
        return [m for m in self.models if m.model != self.base_model]

    @property
    def weighted_entries(self) -> list[ModelEntry]:
        """The entries whose parameters ``merge_tensor`` gets, in order.

        The base's first for a method that merges the base as one more model (``linear``; its ``models[]`` entry, or
        an empty one), then the donors'.
        """
        if not (self.method.base_is_model and self.base_model):
            return self.donors
        base = next((m for m in self.models if m.model == self.base_model), ModelEntry(self.base_model))
        return [base, *self.donors]

    def validate(self) -> MethodSpec:
        """Check method, parameter names and values, and model counts; raise a ``ValueError`` naming the problem.

        Returns:
            The method's :class:`~lightning_mergeguard.merging.MethodSpec`.

        Raises:
            ConfigError: An unknown method, parameter, dtype or model, a bad value or count (the message names it and
                suggests the closest known name for a typo).
        """
        spec = self.method
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.out_dtype is not None and self.out_dtype not in DTYPES:
            raise ConfigError(f"unknown out_dtype {self.out_dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.slices is not None:
            self._validate_slices(spec)
            return spec
        if spec.needs_base and not self.base_model:
            raise ConfigError(f"merge_method {spec.name!r} needs a base_model")
        shared = spec.all_shared_params
        for name, value in self.parameters.items():
            if name not in shared:
                if name in spec.model_params:  # mergekit allows model parameters at the top level as defaults
                    _check_setting("parameters", name, value, spec.model_params[name])
                    continue
                known = ", ".join(sorted(set(shared) | set(spec.model_params))) or "none"
                raise ConfigError(
                    f"unknown parameter {name!r} for merge_method {spec.name!r}{_suggest(name, list(shared))}; "
                    f"known: {known}{_unweighted(spec, name)}"
                )
            _check_setting("parameters", name, value, shared[name])
        for name, param in shared.items():
            if param.default is REQUIRED and name not in self.parameters:
                raise ConfigError(f"merge_method {spec.name!r} needs parameter {name!r}")
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.model in seen:
                raise ConfigError(
                    f"models[{i}] ({m.model}) repeats models[{seen[m.model]}]: mergekit keys models by path and would "
                    "apply only one entry's parameters; list each model once (to count a model more, raise its weight)"
                )
            seen[m.model] = i
        donors = self.donors
        # A method that merges the base as one more model (linear, passthrough) counts it as one of its inputs.
        counted = len(donors) + (1 if spec.base_is_model and self.base_model else 0)
        besides = "" if spec.base_is_model else " besides the base"
        if counted < spec.min_models:
            raise ConfigError(f"merge_method {spec.name!r} needs at least {spec.min_models} model(s){besides}")
        if spec.max_models is not None and counted > spec.max_models:
            counts = " (base_model counts: mergekit merges it as one of the models)" if spec.base_is_model else ""
            raise ConfigError(
                f"merge_method {spec.name!r} takes at most {spec.max_models} model(s){besides}, got {counted}{counts}"
            )
        for i, m in enumerate(self.models):
            for name, value in m.parameters.items():
                if name not in spec.model_params:
                    raise ConfigError(
                        f"models[{i}] ({m.model}): unknown parameter {name!r} for {spec.name!r}"
                        f"{_suggest(name, list(spec.model_params))}; known: {', '.join(spec.model_params) or 'none'}"
                        f"{_unweighted(spec, name)}"
                    )
                _check_setting(f"models[{i}] ({m.model})", name, value, spec.model_params[name])
            if m.model == self.base_model and not spec.base_is_model:
                continue
            for name, param in spec.model_params.items():
                if param.default is REQUIRED and name not in m.parameters and name not in self.parameters:
                    raise ConfigError(f"models[{i}] ({m.model}): parameter {name!r} is required by {spec.name!r}")
            if spec.check_params is not None:
                settings = {
                    n: m.parameters.get(n, self.parameters.get(n, p.default)) for n, p in spec.model_params.items()
                }
                if not any(isinstance(v, (list, Mapping)) for v in settings.values()):  # filtered: checked per tensor
                    spec.check_params(f"models[{i}] ({m.model})", settings)
        if spec.base_is_model and self.base_model and all(m.model != self.base_model for m in self.models):
            for name, param in spec.model_params.items():
                if param.default is REQUIRED and name not in self.parameters:
                    raise ConfigError(
                        f"merge_method {spec.name!r} averages base_model {self.base_model!r} with the models, as "
                        f"mergekit does, and needs its {name!r}: list it under models with one (or give a top-level "
                        f"{name!r}), or drop base_model to merge the models alone"
                    )
        return spec

    def _validate_slices(self, spec: MethodSpec) -> None:
        """Each slice must be a valid whole-model merge of its sources, as mergekit plans it."""
        if not self.slices:
            raise ConfigError("'slices' is empty: list at least one output slice")
        for i, out in enumerate(self.slices):
            if not out.sources:
                raise ConfigError(f"slices[{i}] has no sources")
            if len({src.num_layers for src in out.sources}) > 1:
                ranges = ", ".join(f"{src.model} {list(src.layer_range)}" for src in out.sources)
                raise ConfigError(f"slices[{i}]: every source must give the same number of layers, got {ranges}")
            seen = [src.model for src in out.sources]
            twice = sorted({m for m in seen if seen.count(m) > 1})
            if twice:
                raise ConfigError(
                    f"slices[{i}] lists model {twice[0]!r} more than once: mergekit keys a slice's inputs by model "
                    "and would merge only one of them"
                )
            sub = self.slice_config(i)
            if spec.prepare is not None and sub.shared_params().get("trim_scope") == "model":
                raise ConfigError(
                    "trim_scope: model trims each model's whole task vector, and a slice holds part of a model; use "
                    "trim_scope: tensor with slices, or list whole models under 'models'"
                )

    def slice_config(self, index: int) -> MergeConfig:
        """Output slice ``index`` as a whole-model config of its sources, as mergekit merges each of its layers.

        Its models are the slice's sources with their own parameters; its parameters are the slice's over the
        config's (a filtered list that matches no tensor falls back to the next, as mergekit resolves them). Unlike
        the ``models:`` form, mergekit adds no base model to a slice: the base (the slice's, else the config's) is
        merged only where it is one of the sources, and a method that needs one refuses a slice without it.

        Raises:
            ConfigError: Naming the slice, for a slice that is not a valid merge.

        Args:
            index: The output slice.

        Returns:
            A whole-model config of that slice's sources.

        Raises:
            ValueError: If this config lists whole models, not slices.
            ConfigError: If the slice is malformed.

        Example:
            >>> cfg = MergeConfig.from_dict({
            ...     "merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
            ...     "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]},
            ...                             {"model": "b", "layer_range": [0, 4]}],
            ...                 "parameters": {"t": 0.3}}]})
            >>> sub = cfg.slice_config(0)
            >>> [m.model for m in sub.models], sub.base_model, sub.shared_params()["t"]
            (['a', 'b'], 'a', 0.3)
        """
        if self.slices is None:
            raise ValueError("this config lists whole models, not slices")
        out = self.slices[index]
        names = [src.model for src in out.sources]
        base = out.base_model or self.base_model
        spec = self.method
        if base is not None and base not in names:
            if spec.needs_base:
                raise ConfigError(
                    f"slices[{index}]: merge_method {spec.name!r} needs base model {base!r} among the slice's sources "
                    f"(mergekit merges only a slice's sources and adds no base to them); the slice has "
                    f"{', '.join(names)}"
                )
            base = None
        try:
            return MergeConfig(
                merge_method=self.merge_method,
                models=[ModelEntry(src.model, copy.deepcopy(src.parameters)) for src in out.sources],
                base_model=base,
                parameters=_chain(out.parameters, self.parameters),
                dtype=self.dtype,
                out_dtype=self.out_dtype,
                seed=self.seed,
            )
        except ConfigError as err:
            raise ConfigError(f"slices[{index}]: {err}") from err

    @property
    def has_gradients(self) -> bool:
        """Whether a parameter anywhere is a gradient list (its value then depends on each tensor's layer)."""
        settings = [*self.parameters.values(), *(v for m in self.models for v in m.parameters.values())]
        for out in self.slices or ():
            settings += [*out.parameters.values(), *(v for src in out.sources for v in src.parameters.values())]
        return any(_has_gradient(v) for v in settings)

    def shared_params(self, tensor_name: str = "", t: float = 0.0) -> dict[str, Any]:
        """Method-level parameters for one tensor at layer position ``t``, defaults filled in.

        Args:
            tensor_name: The tensor being merged (for per-tensor filters).
            t: Its layer position in ``[0, 1]`` (for gradients).

        Returns:
            ``parameter -> value``.
        """
        spec = self.method
        out = {}
        for name, param in spec.all_shared_params.items():
            value = resolve_param(self.parameters[name], tensor_name, t) if name in self.parameters else None
            out[name] = param.default if value is None else value
        return out

    def model_params(self, entry: ModelEntry, tensor_name: str = "", t: float = 0.0) -> dict[str, Any]:
        """One donor's parameters for one tensor at layer position ``t`` (own, else top-level, else default).

        Args:
            entry: The donor.
            tensor_name: The tensor being merged (for per-tensor filters).
            t: Its layer position in ``[0, 1]`` (for gradients).

        Returns:
            ``parameter -> value``.

        Raises:
            ConfigError: If a required parameter has no value for this tensor.
        """
        spec = self.method
        out = {}
        for name, param in spec.model_params.items():
            value = None
            if name in entry.parameters:
                value = resolve_param(entry.parameters[name], tensor_name, t)
            if value is None and name in self.parameters:
                value = resolve_param(self.parameters[name], tensor_name, t)
            if value is None:
                if param.default is REQUIRED:
                    raise ConfigError(f"model {entry.model!r}: no {name!r} applies to tensor {tensor_name!r}")
                value = param.default
            out[name] = value
        return out

    def _changed_extensions(self) -> list[tuple[str, Any]]:
        """This engine's extensions set away from their defaults, in the config, its slices and their sources."""
        scopes = [self.parameters]
        for out in self.slices or ():
            scopes += [out.parameters, *(src.parameters for src in out.sources)]
        extensions = self.method.extensions
        return [(k, v) for scope in scopes for k, v in scope.items() if k in extensions and v != extensions[k].default]

    @property
    def uses_extensions(self) -> bool:
        """Whether the config sets an extension of this engine away from its default (mergekit cannot replay it)."""
        return bool(self._changed_extensions())

    # ------------------------------------------------------------------ writing
    def to_dict(self, *, mergekit: bool = True) -> dict[str, Any]:
        """A plain mapping. With ``mergekit=True`` it is a config ``mergekit-yaml`` accepts.

        Raises:
            ValueError: If ``mergekit=True`` and the config sets an extension mergekit cannot replay.

        Args:
            mergekit: Refuse this engine's extensions, so that ``mergekit-yaml`` accepts the result.

        Returns:
            The config as plain dicts and lists.

        Raises:
            ConfigError: With ``mergekit=True``, a parameter mergekit does not have.
        """
        spec = self.method
        changed = self._changed_extensions() if mergekit else []
        if changed:
            name, value = changed[0]
            raise ConfigError(f"parameter {name}={value!r} is an extension of this engine; mergekit cannot replay it")
        params = {k: v for k, v in self.parameters.items() if not (mergekit and k in spec.extensions)}
        out: dict[str, Any] = {"merge_method": spec.name}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.slices is None:
            out["models"] = [
                {"model": m.model, **({"parameters": copy.deepcopy(m.parameters)} if m.parameters else {})}
                for m in self.models
            ]
        else:
            out["slices"] = [_slice_dict(s, list(spec.extensions) if mergekit else []) for s in self.slices]
        if params:
            out["parameters"] = copy.deepcopy(params)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        if self.seed is not None and not mergekit:
            out["seed"] = self.seed
        out.update(copy.deepcopy(self.extra))
        return out

    def to_yaml(self, path: str | os.PathLike[str] | None = None, *, mergekit: bool = True) -> str:
        """Serialise to YAML; write it atomically to ``path`` if given. A seed is kept as a comment for mergekit.

        Args:
            path: Where to write it (atomically); ``None``: only return it.
            mergekit: As :meth:`to_dict`.

        Returns:
            The YAML text.
        """
        text = yaml.safe_dump(self.to_dict(mergekit=mergekit), sort_keys=False)
        if mergekit and self.seed is not None:
            text = f"# replay with: mergekit-yaml THIS_FILE OUT --random-seed {self.seed}\n" + text
        if path is not None:
            from lightning_mergeguard.io import atomic_write_text

            atomic_write_text(path, text)
        return text

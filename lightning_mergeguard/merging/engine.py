"""The merge engine: resolve sources, validate them against the base, and merge tensor by tensor.

Peak extra memory is about one tensor per model (plus one output tensor): tensors are read lazily from their
sources (memory-mapped safetensors stream from disk), merged, written or stored, and freed before the next name.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_mergeguard.errors import (
    ConfigError,
    IncompatibleModelsError,
    MergeGuardError,
    NonFiniteError,
    OutputError,
)
from lightning_mergeguard.io import (
    ShardedSafetensorsWriter,
    StreamingSafetensorsWriter,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    clean_orphaned_temps,
    parse_size,
)
from lightning_mergeguard.merging.base_check import check_same_base, compare, tensors_to_compare
from lightning_mergeguard.merging.card import model_card_text
from lightning_mergeguard.merging.config import MergeConfig
from lightning_mergeguard.merging.layers import LAYER_STACKS, layer_fractions, layer_index
from lightning_mergeguard.merging.slices import output_model_config, plan_slices
from lightning_mergeguard.merging.sources import SafetensorsSource, WeightSource, count_nonfinite, read_checked
from lightning_mergeguard.merging.sources import open_source as _open
from lightning_mergeguard.merging.spec import TensorContext
from lightning_mergeguard.merging.tied import reconcile_tied_heads
from lightning_mergeguard.merging.tokenizer import chat_template_text, tokenizer_directory, write_chat_template

__all__ = ["check_compatible", "check_same_base_sources", "iter_merge", "merge"]

DEFAULT_PREFETCH_BYTES = 512 << 20
"""Inputs of the next tensor read ahead while this one merges, when they take at most this much (compute dtype)."""
_CHECK_ENTRIES = 1 << 20  # entries per tensor the same-base check compares
CHECK_BASE_SWITCH = "check_base=False (mergeguard-merge --no-base-check)"
"""How the engine's refusals name the switch that turns the same-base check off."""
CHUNK = 1 << 20
"""Entries per slice when an elementwise method (linear, task arithmetic) merges a large tensor on the CPU."""
DEFAULT_SHARD_SIZE = "5B"
"""Output shard size, as mergekit's ``--out-shard-size`` default (five billion bytes)."""

_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
_ARCH_NAMES = ("model_type", "architectures")

_MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
_COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)
_TOKENIZER_FILES = frozenset(_COPY_FILES) - set(_MODEL_CONFIG_FILES)


def _list_keys(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _prefix_hint(missing: Sequence[str], extra: Sequence[str], model: str, base: str) -> str | None:
    """A hint when one side's names are the other's with a prefix (a LightningModule's or DDP's checkpoint)."""
    for longer, shorter, who in ((extra, missing, model), (missing, extra, base)):
        if not longer or len(longer) != len(shorter):
            continue
        first = sorted(shorter)[0]
        candidates = [k[: -len(first)] for k in longer if k.endswith("." + first)]
        for prefix in candidates:
            if {prefix + k for k in shorter} == set(longer):
                return (
                    f"Every name of {who!r} is the other's with the prefix {prefix!r} (the state dict of a wrapper, "
                    "such as a LightningModule's checkpoint or a DDP model's): save the bare network's weights "
                    "(save_pretrained, or the wrapped module's state_dict()) and merge those."
                )
    return None


def check_compatible(reference: WeightSource, others: Sequence[WeightSource], *, allow_crimes: bool = False) -> None:
    """Check that every source has the reference's tensor names, shapes and architecture.

    ``allow_crimes`` (mergekit's ``--allow-crimes``): models of different architectures (``model_type``,
    ``architectures``) whose tensors match by name and shape may be merged.

    Raises:
        IncompatibleModelsError: Naming the model and the first mismatching keys, shapes or config fields.

    Args:
        reference: The base (or first) model.
        others: The other sources.
        allow_crimes: Accept different architectures (mergekit's ``--allow-crimes``).
    """
    ref_keys = reference.keys()
    ref_set = set(ref_keys)
    for src in others:
        keys = set(src.keys())
        missing = [k for k in ref_keys if k not in keys]
        extra = sorted(keys - ref_set)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s): {_list_keys(missing)}")
            if extra:
                parts.append(f"{len(extra)} unexpected tensor(s): {_list_keys(extra)}")
            raise IncompatibleModelsError(
                f"model {src.name!r} does not match base {reference.name!r}: {'; '.join(parts)}. "
                + (
                    _prefix_hint(missing, extra, src.name, reference.name)
                    or "Is it a fine-tune of the same base model?"
                )
            )
        for k in ref_keys:
            (rs, rd), (s, d) = reference.meta(k), src.meta(k)
            if rs != s:
                raise IncompatibleModelsError(
                    f"tensor {k!r}: shape {s} in model {src.name!r} but {rs} in base {reference.name!r}; "
                    "the models do not share the base's architecture"
                )
            if rd.is_floating_point != d.is_floating_point:
                raise IncompatibleModelsError(
                    f"tensor {k!r}: dtype {d} in model {src.name!r} but {rd} in base {reference.name!r}"
                )
        if reference.config and src.config:
            for field in _ARCH_KEYS:
                if allow_crimes and field in _ARCH_NAMES:
                    continue
                a, b = reference.config.get(field), src.config.get(field)
                if a is not None and b is not None and a != b:
                    crimes = (
                        " (to merge models of different architectures whose tensors match, pass allow_crimes=True; "
                        "CLI: --allow-crimes, as mergekit)"
                        if field in _ARCH_NAMES
                        else ""
                    )
                    raise IncompatibleModelsError(
                        f"model {src.name!r} has {field}={b!r} but base {reference.name!r} has {field}={a!r}{crimes}"
                    )


def check_same_base_sources(
    base: WeightSource,
    donors: Sequence[WeightSource],
    *,
    device: torch.device | str = "cpu",
    sample: int = 16,
    refuse: bool = True,
    switch: str = CHECK_BASE_SWITCH,
) -> dict[str, float]:
    """Refuse donors that are not fine-tunes of ``base``, before any tensor is merged.

    Compares up to ``sample`` weight matrices spread over the model, the first 2**20 entries of each, by their
    cosine with the base's (see :mod:`~lightning_mergeguard.merging.base_check`); a LoRA donor's declared base is
    checked against the base it is applied to
    (:meth:`~lightning_mergeguard.merging.lora.LoraSource.check_declared_base`).

    Args:
        base: The base (or, for a merge with no base, the first model: then pass ``refuse=False``).
        donors: The models to check.
        device: Where to compute the cosines.
        sample: Matrices compared per donor.
        refuse: ``False`` warns instead of refusing (a comparison with a stand-in for the base).
        switch: The option that turns the check off, named in the refusal.

    Returns:
        Each donor's median cosine with the base.

    Raises:
        ForeignBaseError: Naming the donor, its median cosine, the least similar tensor and ``switch``.
    """
    from lightning_mergeguard.merging.lora import LoraSource

    for src in (base, *donors):
        if isinstance(src, LoraSource):
            src.check_declared_base(switch=switch)
    shared = set(base.keys()).intersection(*(src.keys() for src in donors))  # a donor may hold only a sub-model
    names = tensors_to_compare({k: base.meta(k) for k in base.keys() if k in shared}, limit=sample)
    dev = torch.device(device)

    def head(src: WeightSource, key: str) -> Tensor:
        # The first entries of a large matrix point the way the whole does (a foreign model is ~0 everywhere),
        # for a fixed cost per tensor at any model size.
        shape, dtype = src.meta(key)
        buf = torch.empty(min(math.prod(shape), _CHECK_ENTRIES), dtype=dtype)
        src.read_flat(key, 0, buf)
        return buf.to(dev)

    base_heads = {k: head(base, k) for k in names}
    out = {}
    for src in donors:
        cosines = [compare(k, head(src, k), base_heads[k]) for k in names]
        out[src.name] = check_same_base(
            cosines, donor=src.name, base=f"base {base.name!r}", switch=switch, refuse=refuse
        )
    return out


def _resolve(
    cfg: MergeConfig, models: Any, base: Any, drop_pages: bool = False
) -> tuple[WeightSource | None, list[WeightSource]]:
    donors = cfg.donors

    def open_source(obj: Any, name: str | None = None) -> WeightSource:
        return _open(obj, name, drop_pages=drop_pages)

    if models is None:
        sources = [open_source(m.model) for m in donors]
    elif isinstance(models, Mapping):
        unknown = [k for k in models if k not in {m.model for m in cfg.models} | {cfg.base_model}]
        if unknown:
            raise ValueError(f"models given for {unknown} are not in the merge config's models")
        absent = [m.model for m in donors if m.model not in models]
        if absent:
            raise ValueError(f"no weights given for model(s) {absent} of the merge config")
        sources = [open_source(models[m.model], name=m.model) for m in donors]
    else:
        models = list(models)
        if len(models) != len(donors):
            raise ValueError(f"merge config lists {len(donors)} model(s) besides the base, got {len(models)}")
        sources = [open_source(obj, name=m.model) for obj, m in zip(models, donors)]
    base_src = None
    if base is not None and isinstance(models, Mapping) and cfg.base_model in models:
        raise ValueError(
            f"base_model {cfg.base_model!r} names one of the models given, and base= was passed too: the merge would "
            f"take base= as {cfg.base_model!r}'s weights; pass one or the other"
        )
    if base is not None:
        base_src = open_source(base, name=cfg.base_model or "base")
    elif cfg.base_model is not None:
        if isinstance(models, Mapping) and cfg.base_model in models:
            base_src = open_source(models[cfg.base_model], name=cfg.base_model)
        else:
            base_src = open_source(cfg.base_model)
    # A tied LM head saved by one model and not by another (see merging.tied) is the same architecture.
    if base_src is not None:
        sources = reconcile_tied_heads(base_src, sources)
    elif sources:
        sources = [sources[0], *reconcile_tied_heads(sources[0], sources[1:])]
    return base_src, sources


def iter_merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str],
    models: Mapping[str, Any] | Sequence[Any] | None = None,
    base: Any = None,
    *,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    progress: bool = False,
    keys: Sequence[str] | None = None,
    check_base: bool = True,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    layer_names: Iterable[str] | None = None,
    allow_crimes: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, merged tensor)`` one tensor at a time; see :func:`merge` for the arguments.

    ``prefetch_bytes``: read the next tensor while this one merges when its inputs (in the compute dtype) take at
    most this many bytes; 0 reads strictly in turn. ``layer_names``: every tensor name of the whole model, which
    sets the layer count that gradient parameters interpolate over (default: the sources' names; pass it when the
    sources hold a subset, as a probe's ``include`` selects; a config with ``slices`` interpolates within each
    slice and ignores it).

    Args:
        config: As :func:`merge`.
        models: As :func:`merge`.
        base: As :func:`merge`.
        device: As :func:`merge`.
        seed: As :func:`merge`.
        progress: As :func:`merge`.
        keys: Only these output tensors (default: all).
        check_base: As :func:`merge`.
        prefetch_bytes: See above.
        layer_names: See above.
        allow_crimes: As :func:`merge`.
    """
    cfg = MergeConfig.coerce(config)
    base_src, donors = _resolve(cfg, models, base)
    options = {
        "device": device,
        "seed": cfg.seed if seed is None else seed,
        "prefetch_bytes": prefetch_bytes,
        "allow_crimes": allow_crimes,
    }
    if cfg.slices is not None:
        wanted = None if keys is None else set(keys)
        parts = plan_slices(cfg, _by_reference(cfg, base_src, donors))
        total = sum(len(p.keys) if wanted is None else len(wanted.intersection(p.keys)) for p in parts)
        streams = (
            _merge_sources(
                part.config,
                part.base,
                part.donors,
                keys=part.keys if wanted is None else [k for k in part.keys if k in wanted],
                check_base=check_base and part.aligned,
                positions=part.positions,
                **options,
            )
            for part in parts
        )
        stream = itertools.chain.from_iterable(streams)
    else:
        reference = base_src if base_src is not None else donors[0]
        names = list(keys) if keys is not None else reference.keys()
        positions = _layer_positions(cfg, reference.keys() if layer_names is None else layer_names)
        stream = _merge_sources(
            cfg, base_src, donors, keys=names, check_base=check_base, positions=positions, **options
        )
        total = len(names)
    desc = f"merge ({cfg.method.name})"
    yield from tqdm(stream, total=total, desc=desc, unit="tensor", disable=not progress, leave=False)


def _by_reference(
    cfg: MergeConfig, base_src: WeightSource | None, donors: Sequence[WeightSource]
) -> dict[str, WeightSource]:
    """The opened sources by the config's model references."""
    out = dict(zip([m.model for m in cfg.donors], donors))
    if base_src is not None and cfg.base_model is not None:
        out[cfg.base_model] = base_src
    return out


def _output_tensors(
    cfg: MergeConfig, base_src: WeightSource | None, donors: Sequence[WeightSource], allow_crimes: bool
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every output tensor's name, shape and stored dtype (the reference's), in output order."""
    if cfg.slices is None:
        reference = base_src if base_src is not None else donors[0]
        return [(k, *reference.meta(k)) for k in reference.keys()]
    out = []
    for part in plan_slices(cfg, _by_reference(cfg, base_src, donors)):
        reference = part.base if part.base is not None else part.donors[0]
        check_compatible(
            reference, part.donors if part.base is not None else part.donors[1:], allow_crimes=allow_crimes
        )
        out.extend((k, *reference.meta(k)) for k in part.keys)
    return out


def _merge_sources(
    cfg: MergeConfig,
    base_src: WeightSource | None,
    donors: Sequence[WeightSource],
    *,
    keys: Sequence[str],
    device: torch.device | str,
    seed: int | None,
    check_base: bool,
    prefetch_bytes: int,
    positions: Mapping[str, float],
    allow_crimes: bool,
) -> Iterator[tuple[str, Tensor]]:
    """Merge ``keys`` of opened sources with a whole-model config; ``positions``: each name's gradient ``t``."""
    spec = cfg.method
    reference = base_src if base_src is not None else donors[0]
    check_compatible(reference, donors if base_src is not None else donors[1:], allow_crimes=allow_crimes)
    if check_base:  # a merge with no base compares its models with the first one, and only warns
        check_same_base_sources(
            reference, donors if base_src is not None else donors[1:], device=device, refuse=base_src is not None
        )
    compute = cfg.compute_dtype
    dev = torch.device(device)
    prepared = spec.prepare(cfg, base_src, donors, dev) if spec.prepare is not None else None
    names = list(keys)
    others = donors if base_src is not None else donors[1:]
    entries = cfg.weighted_entries  # whose parameters merge_tensor gets: linear's base first, then the donors
    # ... and the sources they belong to: a model's parameters are resolved with its own tensor names (a slice's
    # filters match the source layer's name), as mergekit resolves them
    merged_base = base_src is not None and spec.base_is_model and cfg.base_model is not None
    entry_sources = [*([base_src] if merged_base else []), *donors]

    def chunked(key: str) -> bool:
        if not spec.elementwise or dev.type != "cpu":
            return False
        shape, dt = reference.meta(key)
        return dt.is_floating_point and math.prod(shape) > CHUNK

    def load(key: str) -> tuple[Tensor, list[Tensor]] | None:
        if chunked(key):
            return None  # streamed slice by slice in the loop below
        ref_t = read_checked(reference, key, compute, dev)
        if not ref_t.is_floating_point():
            if key.rpartition(".")[2] == "num_batches_tracked":
                return ref_t, []  # BatchNorm's step counter: every fine-tune's differs, and no output depends on it
            for src in others:
                if not torch.equal(src.get(key).to(dev), ref_t):
                    raise ValueError(f"non-floating tensor {key!r} differs between {reference.name!r} and {src.name!r}")
            return ref_t, []
        return ref_t, [read_checked(src, key, compute, dev) for src in others]

    def nbytes(key: str) -> int:
        shape, _ = reference.meta(key)
        return 0 if chunked(key) else math.prod(shape) * compute.itemsize * (1 + len(others))

    scratch = _Scratch()
    if not any(isinstance(src, SafetensorsSource) for src in (reference, *others)):
        prefetch_bytes = 0  # tensors already in memory: nothing to read ahead
    for key, loaded in _prefetched(names, load, nbytes, prefetch_bytes):
        t = positions.get(key, 0.0)
        out_dtype = cfg.output_dtype(reference.meta(key)[1])
        params = [cfg.model_params(m, src.source_key(key), t) for m, src in zip(entries, entry_sources)]
        ctx = TensorContext(key=key, seed=seed, prepared=prepared)
        shared = cfg.shared_params(key, t)

        def merge_one(parts: list[Tensor], params=params, shared=shared, ctx=ctx) -> Tensor:
            if base_src is None:
                return spec.merge_tensor(None, parts, params, shared, ctx)
            if spec.base_is_model and not cfg.base_model:  # base= given only as the reference (base checks)
                return spec.merge_tensor(None, parts[1:], params, shared, ctx)
            return spec.merge_tensor(parts[0], parts[1:], params, shared, ctx)

        if loaded is None:
            merged, bad = _merge_chunked(key, [reference, *others], merge_one, compute, out_dtype, scratch)
        else:
            ref_t, tensors = loaded
            del loaded
            if not ref_t.is_floating_point():
                yield key, ref_t
                continue
            merged = merge_one([ref_t, *tensors]).to(out_dtype)
            del tensors, ref_t
            bad = count_nonfinite(merged)
        if bad:
            raise NonFiniteError(
                f"the merge produced {bad} NaN/Inf value(s) in tensor {key!r} (finite inputs: do the weights or "
                f"lambda overflow {out_dtype}?); nothing was written"
            )
        yield key, merged
        del merged


def _layer_positions(cfg: MergeConfig, names: Iterable[str]) -> dict[str, float]:
    """Each tensor's place ``t`` in its layer stack when the config has gradient parameters (else nothing)."""
    if not cfg.has_gradients:
        return {}
    names = list(names)
    if not any(layer_index(n) is not None for n in names):
        raise ConfigError(
            "the merge config has gradient parameters (lists interpolated across layers), but no tensor name has a "
            f"layer index (e.g. 'model.layers.3.'; stacks recognised: {', '.join(LAYER_STACKS)}), so every tensor "
            "would take the first value; use scalars or {filter, value} entries"
        )
    return layer_fractions(names)


class _Scratch:
    """Buffers reused by every chunked merge of one pass: one per slot and dtype, ``CHUNK`` entries each."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, torch.dtype], Tensor] = {}

    def get(self, slot: Any, dtype: torch.dtype, n: int) -> Tensor:
        buf = self._buffers.get((slot, dtype))
        if buf is None:
            buf = self._buffers[(slot, dtype)] = torch.empty(CHUNK, dtype=dtype)
        return buf[:n]


def _merge_chunked(
    key: str,
    sources: Sequence[WeightSource],
    merge_one: Callable[[list[Tensor]], Tensor],
    compute: torch.dtype,
    out_dtype: torch.dtype,
    scratch: _Scratch,
) -> tuple[Tensor, int]:
    """Merge one large tensor of an elementwise method slice by slice (CPU); return it and its NaN/Inf count.

    Each slice of every input is read straight from its file into a reused buffer and converted into another, so
    the working set stays in cache and no model-sized buffer is allocated but the output. Gives the same bytes as
    merging the whole tensor. The NaN/Inf check is fused: an elementwise weighted sum turns any NaN/Inf input into
    a NaN/Inf output (``0 * inf`` is NaN too), so only the output slices are checked, in the output dtype; when one
    is bad, the inputs are checked to name the model at fault.
    """
    shape, _ = sources[0].meta(key)
    n = math.prod(shape)
    out = torch.empty(n, dtype=out_dtype)
    bad = 0
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        parts = []
        for i, src in enumerate(sources):
            raw = scratch.get(("raw", i), src.meta(key)[1], m)
            src.read_flat(key, start, raw)  # reading ahead on a thread was measured slower on 2 cores
            if raw.dtype != compute:
                raw = scratch.get(("compute", i), compute, m).copy_(raw)
            parts.append(raw)
        piece = out[start : start + m]
        piece.copy_(merge_one(parts))
        bad += count_nonfinite(piece)
    if bad:
        for src in sources:
            read_checked(src, key, compute, torch.device("cpu"))  # raises NonFiniteError naming the model
    return out.reshape(shape), bad


_Loaded = TypeVar("_Loaded")


def _prefetched(
    names: Sequence[str], load: Callable[[str], _Loaded], nbytes: Callable[[str], int], budget: int
) -> Iterator[tuple[str, _Loaded]]:
    """Yield ``(name, load(name))``, loading the next tensor on a reader thread while this one is merged.

    Reads (``pread``) and the dtype conversion release the GIL, so reading overlaps computing. The next tensor is
    prefetched only when its inputs fit in ``budget`` bytes: the few huge tensors (embeddings) are read in turn, so
    peak memory stays a small, fixed multiple of the largest tensor. ``budget=0`` never prefetches.
    """
    if budget <= 0 or len(names) < 2:
        for name in names:
            yield name, load(name)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeguard-reader") as pool:
        ahead: Future[_Loaded] | None = None
        try:
            for i, name in enumerate(names):
                current = ahead.result() if ahead is not None else load(name)
                ahead = None
                if i + 1 < len(names) and nbytes(names[i + 1]) <= budget:
                    ahead = pool.submit(load, names[i + 1])
                yield name, current
                del current
        finally:
            if ahead is not None:
                ahead.cancel()


def _write_overlapped(
    writer: ShardedSafetensorsWriter | StreamingSafetensorsWriter, stream: Iterator[tuple[str, Tensor]], depth: int = 1
) -> None:
    """Write tensors on a background thread while the next ones are merged (both release the GIL).

    The queue holds at most ``depth`` tensors, so memory stays bounded; an error on either side stops both.
    """
    q: queue.Queue[tuple[str, Tensor] | None] = queue.Queue(maxsize=depth)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            while (item := q.get()) is not None:
                writer.write(*item)
        except BaseException as err:  # re-raised on the main thread
            failure.append(err)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    thread = threading.Thread(target=work, name="mergeguard-writer", daemon=True)
    thread.start()
    try:
        for item in stream:
            if failure:
                break
            q.put(item)
    finally:
        q.put(None)
        thread.join()
    if failure:
        raise failure[0]


_WEIGHT_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def _stale_weight_files(directory: Path, keep: Sequence[Path]) -> list[Path]:
    """Weight files and shard indexes in ``directory`` other than ``keep`` (what a reader could take instead)."""
    found = {f for pattern in _WEIGHT_PATTERNS for f in directory.glob(pattern) if f.is_file()}
    return sorted(found - set(keep))


def _is_output_error(err: OSError, target: Path) -> bool:
    """Whether an OSError concerns the output (a full disk names no file) rather than an input file."""
    if err.filename is None:
        return True
    try:
        return Path(err.filename).resolve().is_relative_to(target.parent.resolve())
    except (OSError, ValueError):
        return False


def _prepare_output(out: Path, existing: str) -> tuple[Path, bool]:
    """Validate the output path; return the weights file to write and whether the directory was created here."""
    if existing not in ("replace", "refuse"):
        raise ValueError(f"existing must be 'replace' or 'refuse', got {existing!r}")
    if out.suffix == ".safetensors":
        if out.is_dir():
            raise OutputError(f"output {out} is a directory; a path ending in .safetensors must name a file")
        if out.exists() and existing == "refuse":
            raise OutputError(f"output {out} exists; pass existing='replace' (CLI: drop --no-overwrite) to replace it")
        return out, False
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory (a model directory, or a *.safetensors path)")
    target = out / "model.safetensors"
    created = not out.exists()
    if not created:
        clean_orphaned_temps(out)
        stale = [*([target] if target.exists() else []), *_stale_weight_files(out, [target])]
        if stale and existing == "refuse":
            raise OutputError(
                f"output directory {out} already holds model weights ({', '.join(f.name for f in stale[:4])}); "
                "pass existing='replace' (CLI: drop --no-overwrite) or choose an empty directory"
            )
    return target, created


def _refuse_writing_over_inputs(out: Path, target: Path, sources: Sequence[WeightSource]) -> None:
    """Refuse an output that would replace or remove a file the merge reads.

    A model directory's weight files are replaced, and other weight files in it removed as stale, so no input
    weight file may live in it; a ``.safetensors`` output may not be an input file. Checked before anything is
    written.
    """
    one_file = out.suffix == ".safetensors"
    here = (target if one_file else out).resolve()
    for src in sources:
        for f in src.files:
            r = f.resolve()
            if r == here if one_file else r.parent == here and any(r.match(p) for p in _WEIGHT_PATTERNS):
                raise OutputError(
                    f"output {out} would write over {src.name!r}, an input of this merge ({f}); choose another output"
                )


def merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str],
    models: Mapping[str, Any] | Sequence[Any] | None = None,
    base: Any = None,
    *,
    out: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    progress: bool = False,
    check_base: bool = True,
    existing: str = "replace",
    out_shard_size: int | str | None = None,
    low_memory: bool = False,
    allow_crimes: bool = False,
    copy_tokenizer: bool = True,
    model_card: bool = False,
) -> dict[str, Tensor] | Path:
    """Run a merge described by a mergekit-style config.

    Args:
        config: A :class:`MergeConfig`, a mapping, a YAML path or YAML text.
        models: The donors' weights: ``None`` (open the paths named in the config), a mapping from the config's
            model names to state dicts / modules / paths, or a sequence aligned with the config's non-base models
            (with ``slices``: the models they name, in order of first appearance, less the base).
        base: The base model's weights (``None``: the config's ``base_model`` path, or ``models[base_model]``).
        out: Where to write. ``None`` returns a state dict; a path ending in ``.safetensors`` writes that file;
            any other path is a model directory (``model.safetensors`` plus the base's ``config.json`` and tokenizer
            files when the base is a directory, and the config as ``mergekit_config.yml``). Files appear atomically.
            The merge owns a model directory: weight files and shard indexes it did not write are removed once the
            new weights are in place, so no reader can take stale weights; temp files of killed merges are removed;
            a directory created for a merge that fails is removed again.
        device: Where to compute (``"cuda"`` works when available).
        seed: Seed for randomized methods (overrides the config's).
        progress: Show a progress bar.
        check_base: Refuse donors that are not fine-tunes of the base (a per-matrix cosine test on up to 16
            tensors, before anything is merged; see :mod:`~lightning_mergeguard.merging.base_check`), and LoRA
            adapters declared for another base. Merges with no base (``linear``, ``karcher``, ``nuslerp`` and
            ``multislerp`` without ``base_model``) compare the models with the first one and only warn, as mergekit
            runs them. Turn it off for models re-parameterised on purpose (a permuted PaRaMS copy looks like
            another model).
        existing: ``"replace"`` (default) an existing model at ``out``, or ``"refuse"`` to write over one.
        out_shard_size: Largest output shard of a model directory (bytes, or ``"500M"``, ``"5B"``, ``"2GB"``;
            default ``"5B"`` as mergekit). A model that needs several shards is written as
            ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``; one is ``model.safetensors``.
        low_memory: Read strictly one tensor at a time (no read-ahead), queue one output tensor, and drop input
            pages from the page cache once read: the least memory, at some speed.
        allow_crimes: Merge models of different architectures (``model_type``, ``architectures``) whose tensors
            match by name and shape, as mergekit's ``--allow-crimes``; names and shapes are still checked.
        copy_tokenizer: Copy the tokenizer (of ``tokenizer_source``, default the base's) into a model directory,
            as mergekit does by default; ``False`` leaves the directory's tokenizer files as they are.
        model_card: Write a ``README.md`` model card (the models, the method and the config) into a model
            directory, as mergekit does by default (``mergeguard-merge`` writes one unless
            ``--no-write-model-card``).

    Returns:
        The merged state dict, or the path written.

    Raises:
        ConfigError: A malformed or misspelled config.
        WeightsFileError: An input file that cannot be read.
        IncompatibleModelsError: Models that do not fit together (ForeignBaseError: another base model).
        NonFiniteError: NaN/Inf in an input, or produced by the merge.
        OutputError: The output cannot be written (read-only, full disk, wrong kind of path, existing model).

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2)}
        >>> cfg = {"merge_method": "task_arithmetic", "base_model": "base",
        ...        "models": [{"model": "a", "parameters": {"weight": 0.5}}]}
        >>> merge(cfg, {"a": {"w": torch.ones(2)}}, base, check_base=False)["w"]
        tensor([0.5000, 0.5000])
    """
    cfg = MergeConfig.coerce(config)
    if out is None:
        stream = iter_merge(
            cfg,
            models,
            base,
            device=device,
            seed=seed,
            progress=progress,
            check_base=check_base,
            allow_crimes=allow_crimes,
        )
        return dict(stream)
    out = Path(out)
    shard_bytes = parse_size(DEFAULT_SHARD_SIZE if out_shard_size is None else out_shard_size)
    target, created = _prepare_output(out, existing)
    base_src, donors = _resolve(cfg, models, base, drop_pages=low_memory)
    _refuse_writing_over_inputs(out, target, [*([base_src] if base_src is not None else []), *donors])
    reference = base_src if base_src is not None else donors[0]
    model_dirs = {m.model: src.directory for m, src in zip(cfg.donors, donors)}
    if base_src is not None and cfg.base_model is not None:
        model_dirs[cfg.base_model] = base_src.directory
    # Checked before anything is written: settings that would need embedding rows re-mapped are refused.
    tokenizer_dir = tokenizer_directory(cfg.extra, reference.directory, model_dirs)
    template = chat_template_text(cfg.extra)
    specs = [
        (k, cfg.output_dtype(dt) if dt.is_floating_point else dt, shape)
        for k, shape, dt in _output_tensors(cfg, base_src, donors, allow_crimes)
    ]
    model_config = None
    if cfg.slices is not None and reference.config is not None:  # the output's layer count, per-layer settings
        model_config = output_model_config(cfg, reference.config, _by_reference(cfg, base_src, donors))
    metadata = {"format": "pt", "merge_method": cfg.merge_method}
    writer: ShardedSafetensorsWriter | StreamingSafetensorsWriter
    if out.suffix == ".safetensors":
        writer = StreamingSafetensorsWriter(target, specs, metadata=metadata)
        if out_shard_size is not None and len(ShardedSafetensorsWriter(out.parent, specs, shard_bytes).files) > 1:
            raise OutputError(f"the merge needs more than one shard of {out_shard_size}; write it to a directory")
        written = [target]
    else:
        writer = ShardedSafetensorsWriter(out, specs, shard_bytes, metadata=metadata)
        written = [*writer.files, *([writer.index] if writer.index is not None else [])]
    stream = iter_merge(
        cfg,
        donors,
        base_src,
        device=device,
        seed=seed,
        progress=progress,
        check_base=check_base,
        prefetch_bytes=0 if low_memory else DEFAULT_PREFETCH_BYTES,
        allow_crimes=allow_crimes,
    )
    try:
        with writer as w:
            _write_overlapped(w, stream, depth=1 if low_memory else 2)
        if out.suffix != ".safetensors":
            for stale in _stale_weight_files(out, written):
                stale.unlink(missing_ok=True)
            for name in _COPY_FILES:  # the base's config; the tokenizer of tokenizer_source (default: the base's)
                if name in _TOKENIZER_FILES and not copy_tokenizer:
                    continue
                directory = reference.directory if name in _MODEL_CONFIG_FILES else tokenizer_dir
                src_file = directory / name if directory is not None else None
                if name == "config.json" and model_config is not None:
                    atomic_write_json(out / name, model_config)
                elif src_file is not None and src_file.is_file():
                    with atomic_open(out / name, "wb") as dst, open(src_file, "rb") as src:
                        shutil.copyfileobj(src, dst)
                else:  # a replaced merge's file the new source lacks (a chat template, another vocabulary) goes
                    (out / name).unlink(missing_ok=True)
            if template is not None and copy_tokenizer:
                write_chat_template(out, template)
            replay = cfg.to_yaml(out / "mergekit_config.yml", mergekit=not cfg.uses_extensions)
            if model_card:
                atomic_write_text(out / "README.md", model_card_text(cfg, out.name, replay))
            atomic_write_json(out / "mergeguard_merge.json", cfg.to_dict(mergekit=False))
    except BaseException as err:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, MergeGuardError) and _is_output_error(err, target):
            what = err.strerror or str(err)
            raise OutputError(f"cannot write the merge to {err.filename or out}: {what}") from err
        raise
    return out

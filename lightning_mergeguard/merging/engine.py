"""The merge engine: resolve sources, validate them against the base, and merge tensor by tensor.

Peak extra memory is about one tensor per model (plus one output tensor): tensors are read lazily from their
sources (memory-mapped safetensors stream from disk), merged, written or stored, and freed before the next name.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_mergeguard.io import StreamingSafetensorsWriter, atomic_write_json
from lightning_mergeguard.merging.config import DTYPES, MergeConfig
from lightning_mergeguard.merging.sources import WeightSource, open_source
from lightning_mergeguard.merging.sparsify import select_ranks
from lightning_mergeguard.merging.spec import TensorContext

__all__ = ["check_compatible", "iter_merge", "merge", "model_thresholds"]

_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
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


def _list_keys(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_compatible(reference: WeightSource, others: Sequence[WeightSource]) -> None:
    """Check that every source has the reference's tensor names, shapes and architecture.

    Raises:
        ValueError: Naming the model and the first mismatching keys, shapes or config fields.
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
            raise ValueError(
                f"model {src.name!r} does not match base {reference.name!r}: {'; '.join(parts)}. "
                "Is it a fine-tune of the same base model?"
            )
        for k in ref_keys:
            (rs, rd), (s, d) = reference.meta(k), src.meta(k)
            if rs != s:
                raise ValueError(
                    f"tensor {k!r}: shape {s} in model {src.name!r} but {rs} in base {reference.name!r}; "
                    "the models do not share the base's architecture"
                )
            if rd.is_floating_point != d.is_floating_point:
                raise ValueError(f"tensor {k!r}: dtype {d} in model {src.name!r} but {rd} in base {reference.name!r}")
        if reference.config and src.config:
            for field in _ARCH_KEYS:
                a, b = reference.config.get(field), src.config.get(field)
                if a is not None and b is not None and a != b:
                    raise ValueError(
                        f"model {src.name!r} has {field}={b!r} but base {reference.name!r} has {field}={a!r}"
                    )


def _checked(src: WeightSource, key: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = src.get(key)
    if t.is_floating_point():
        t = t.to(device=device, dtype=dtype)
        # A sum is a cheap reduction that is NaN/Inf whenever an entry is; only then pay for the exact count
        # (a float32 overflow of the sum alone is not an error).
        if not bool(torch.isfinite(t.sum(dtype=torch.float64) if t.dtype != torch.float64 else t.sum())):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"tensor {key!r} of model {src.name!r} has {bad} NaN/Inf value(s)")
    else:
        t = t.to(device)
    return t


def model_thresholds(
    base: WeightSource, donors: Sequence[WeightSource], densities: Sequence[float], device: torch.device | str = "cpu"
) -> list[float]:
    """Per-model magnitude thresholds for whole-model TIES trimming (the TIES reference code's ``top-k%``).

    Each donor's floating-point task-vector magnitudes are gathered into one buffer (one model at a time) and the
    ``density`` quantile is selected exactly.
    """
    out = []
    keys = [k for k in base.keys() if base.meta(k)[1].is_floating_point]
    for src, density in zip(donors, densities):
        if density >= 1:
            out.append(0.0)
            continue
        total = sum(int(torch.Size(base.meta(k)[0]).numel()) for k in keys)
        buf = torch.empty(total, dtype=torch.float32, device=device)
        pos = 0
        for k in keys:
            b = _checked(base, k, torch.float32, torch.device(device))
            t = _checked(src, k, torch.float32, torch.device(device))
            n = b.numel()
            torch.sub(t.reshape(-1), b.reshape(-1), out=buf[pos : pos + n]).abs_()
            pos += n
        kth = max(1, int(density * total))
        out.append(float(select_ranks(buf, total - kth, total - kth)[0]))
        del buf
    return out


def _resolve(cfg: MergeConfig, models: Any, base: Any) -> tuple[WeightSource | None, list[WeightSource]]:
    donors = cfg.donors
    if models is None:
        sources = [open_source(m.model) for m in donors]
    elif isinstance(models, Mapping):
        unknown = [k for k in models if k not in {m.model for m in cfg.models}]
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
    if base is not None:
        base_src = open_source(base, name=cfg.base_model or "base")
    elif cfg.base_model is not None:
        if isinstance(models, Mapping) and cfg.base_model in models:
            base_src = open_source(models[cfg.base_model], name=cfg.base_model)
        else:
            base_src = open_source(cfg.base_model)
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
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, merged tensor)`` one tensor at a time; see :func:`merge` for the arguments."""
    cfg = MergeConfig.coerce(config)
    spec = cfg.method
    base_src, donors = _resolve(cfg, models, base)
    reference = base_src if base_src is not None else donors[0]
    check_compatible(reference, donors if base_src is not None else donors[1:])
    compute = DTYPES[cfg.dtype]
    out_dtype = DTYPES[cfg.out_dtype or cfg.dtype]
    dev = torch.device(device)
    seed = cfg.seed if seed is None else seed
    thresholds = None
    if cfg.shared_params().get("trim_scope", "tensor") == "model":
        assert base_src is not None
        dens = [cfg.model_params(m)["density"] for m in cfg.donors]
        thresholds = model_thresholds(base_src, donors, dens, dev)
    names = list(keys) if keys is not None else reference.keys()
    for key in tqdm(names, desc=f"merge ({spec.name})", unit="tensor", disable=not progress, leave=False):
        ref_t = _checked(reference, key, compute, dev)
        if not ref_t.is_floating_point():
            for src in donors:
                if not torch.equal(src.get(key).to(dev), ref_t):
                    raise ValueError(f"non-floating tensor {key!r} differs between {reference.name!r} and {src.name!r}")
            yield key, ref_t
            continue
        tensors = [ref_t] if base_src is None else []
        tensors += [_checked(src, key, compute, dev) for src in (donors if base_src is not None else donors[1:])]
        params = [cfg.model_params(m, key) for m in cfg.donors]
        ctx = TensorContext(key=key, seed=seed, model_thresholds=thresholds)
        merged = spec.merge_tensor(
            ref_t if base_src is not None else None, tensors, params, cfg.shared_params(key), ctx
        )
        yield key, merged.to(out_dtype)
        del tensors, merged, ref_t


def _write_overlapped(writer: StreamingSafetensorsWriter, stream: Iterator[tuple[str, Tensor]]) -> None:
    """Write tensors on a background thread while the next ones are merged (both release the GIL).

    The queue holds at most two tensors, so memory stays bounded; an error on either side stops both.
    """
    q: queue.Queue[tuple[str, Tensor] | None] = queue.Queue(maxsize=2)
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


def merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str],
    models: Mapping[str, Any] | Sequence[Any] | None = None,
    base: Any = None,
    *,
    out: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor] | Path:
    """Run a merge described by a mergekit-style config.

    Args:
        config: A :class:`MergeConfig`, a mapping, a YAML path or YAML text.
        models: The donors' weights: ``None`` (open the paths named in the config), a mapping from the config's
            model names to state dicts / modules / paths, or a sequence aligned with the config's non-base models.
        base: The base model's weights (``None``: the config's ``base_model`` path, or ``models[base_model]``).
        out: Where to write. ``None`` returns a state dict; a path ending in ``.safetensors`` writes that file;
            any other path is a model directory (``model.safetensors`` plus the base's ``config.json`` and tokenizer
            files when the base is a directory, and the config as ``mergekit_config.yml``). Files appear atomically.
        device: Where to compute (``"cuda"`` works when available).
        seed: Seed for randomized methods (overrides the config's).
        progress: Show a progress bar.

    Returns:
        The merged state dict, or the path written.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2)}
        >>> cfg = {"merge_method": "task_arithmetic", "base_model": "base",
        ...        "models": [{"model": "a", "parameters": {"weight": 0.5}}]}
        >>> merge(cfg, {"a": {"w": torch.ones(2)}}, base)["w"]
        tensor([0.5000, 0.5000])
    """
    cfg = MergeConfig.coerce(config)
    if out is None:
        return dict(iter_merge(cfg, models, base, device=device, seed=seed, progress=progress))
    out = Path(out)
    base_src, donors = _resolve(cfg, models, base)
    reference = base_src if base_src is not None else donors[0]
    out_dtype = DTYPES[cfg.out_dtype or cfg.dtype]
    specs = []
    for k in reference.keys():
        shape, dt = reference.meta(k)
        specs.append((k, out_dtype if dt.is_floating_point else dt, shape))
    target = out if out.suffix == ".safetensors" else out / "model.safetensors"
    stream = iter_merge(cfg, donors, base_src, device=device, seed=seed, progress=progress)
    with StreamingSafetensorsWriter(target, specs, metadata={"format": "pt", "merge_method": cfg.merge_method}) as w:
        _write_overlapped(w, stream)
    if out.suffix != ".safetensors":
        if reference.directory is not None:
            for name in _COPY_FILES:
                src_file = reference.directory / name
                if src_file.is_file():
                    tmp = out / f".{name}.tmp"
                    shutil.copyfile(src_file, tmp)
                    os.replace(tmp, out / name)
        cfg.to_yaml(
            out / "mergekit_config.yml",
            mergekit=not any(k in cfg.parameters and cfg.parameters[k] != v for k, v in cfg.method.extensions.items()),
        )
        atomic_write_json(out / "mergeguard_merge.json", cfg.to_dict(mergekit=False))
    return out

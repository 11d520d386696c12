"""Where weights come from: in-memory state dicts, safetensors files, Hugging Face model directories.

A :class:`WeightSource` gives tensor names, shapes and dtypes without loading data, and loads one tensor at a
time, so a merge can stream. Untrusted pickles are never unpickled: ``.bin``/``.pt``/``.ckpt`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["SafetensorsSource", "StateDictSource", "WeightSource", "open_source"]

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightSource:
    """A named collection of tensors, loaded lazily.

    Attributes:
        name: Human-readable name used in error messages.
        config: The model's Hugging Face ``config.json`` as a dict, when known.
        directory: The directory the weights came from, when they came from one.
    """

    name: str = "model"
    config: dict[str, Any] | None = None
    directory: Path | None = None

    def keys(self) -> list[str]:
        """Tensor names, in storage order."""
        raise NotImplementedError

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one tensor, without loading it."""
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        """Load one tensor (on CPU)."""
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def state_dict(self) -> dict[str, Tensor]:
        """Load everything."""
        return {k: self.get(k) for k in self.keys()}


class StateDictSource(WeightSource):
    """Tensors already in memory (a state dict or a module's parameters and buffers). Nothing is copied.

    Example:
        >>> src = StateDictSource({"w": torch.zeros(2, 3)}, name="mine")
        >>> src.meta("w")
        ((2, 3), torch.float32)
    """

    def __init__(self, tensors: Mapping[str, Tensor] | nn.Module, name: str = "state_dict") -> None:
        if isinstance(tensors, nn.Module):
            tensors = tensors.state_dict()
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"{name}: entry {bad[0]!r} is not a tensor")
        self._tensors = {k: v.detach() for k, v in tensors.items()}
        self.name = name

    @override
    def keys(self) -> list[str]:
        return list(self._tensors)

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[key]
        return tuple(t.shape), t.dtype

    @override
    def get(self, key: str) -> Tensor:
        return self._tensors[key]


class SafetensorsSource(WeightSource):
    """One or more safetensors files (a sharded checkpoint is several), opened lazily with memory mapping."""

    def __init__(self, files: list[Path], name: str | None = None, config: dict[str, Any] | None = None) -> None:
        if not files:
            raise FileNotFoundError("no safetensors files given")
        self.name = name or str(files[0])
        self.config = config
        self._handles = []
        self._where: dict[str, Any] = {}
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"safetensors file not found: {f}")
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{f} is not a readable safetensors file: {err}") from err
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise ValueError(f"{self.name}: tensor {k!r} appears in more than one shard")
                self._where[k] = h

    @override
    def keys(self) -> list[str]:
        return list(self._where)

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._where[key].get_slice(key)
        return tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()]

    @override
    def get(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)


def _load_pickle_weights(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True) (refusing to unpickle arbitrary "
            f"objects): {err}"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _read_config(directory: Path) -> dict[str, Any] | None:
    cfg = directory / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def open_source(obj: Any, name: str | None = None) -> WeightSource:
    """Turn whatever the user passed into a :class:`WeightSource`.

    Args:
        obj: A ``WeightSource``; a state dict or ``nn.Module``; a path to a ``.safetensors`` file, a
            ``.bin``/``.pt``/``.pth``/``.ckpt`` file (loaded with ``weights_only=True``), or a Hugging Face model
            directory (``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``).
        name: Name for error messages (defaults to the path).

    Returns:
        The source.

    Raises:
        FileNotFoundError: If a path does not exist or a directory holds no weights.
        TypeError: For an unsupported object.
    """
    if isinstance(obj, WeightSource):
        return obj
    if isinstance(obj, (Mapping, nn.Module)):
        return StateDictSource(obj, name=name or "state_dict")
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(f"cannot read weights from a {type(obj).__name__}; pass a state dict, module or path")
    path = Path(obj)
    label = name or str(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], name=label, config=_read_config(path.parent))
        return StateDictSource(_load_pickle_weights(path), name=label)
    if not path.is_dir():
        raise FileNotFoundError(f"no model at {path}")
    config = _read_config(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index_name.startswith("model.safetensors"):
                src: WeightSource = SafetensorsSource([path / s for s in shards], name=label, config=config)
            else:
                merged: dict[str, Tensor] = {}
                for s in shards:
                    merged.update(_load_pickle_weights(path / s))
                src = StateDictSource(merged, name=label)
                src.config = config
            src.directory = path
            return src
    single = sorted(path.glob("*.safetensors"))
    if single:
        src = SafetensorsSource(single, name=label, config=config)
    elif (path / "pytorch_model.bin").is_file():
        src = StateDictSource(_load_pickle_weights(path / "pytorch_model.bin"), name=label)
        src.config = config
    else:
        raise FileNotFoundError(f"{path} holds no model weights (*.safetensors or pytorch_model.bin)")
    src.directory = path
    return src

"""Where weights come from: in-memory state dicts, safetensors files, Hugging Face model directories.

A :class:`WeightSource` gives tensor names, shapes and dtypes without loading data, and loads one tensor at a
time, so a merge can stream. Untrusted pickles are never unpickled: ``.bin``/``.pt``/``.ckpt`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_mergeguard.errors import NonFiniteError, WeightsFileError
from lightning_mergeguard.io import SAFETENSORS_DTYPES

__all__ = [
    "RenamedSource",
    "SafetensorsSource",
    "StateDictSource",
    "WeightSource",
    "count_nonfinite",
    "is_hub_id",
    "iter_matching",
    "load_matching",
    "match_names",
    "open_source",
    "read_checked",
    "register_opener",
]

_ST_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class WeightSource:
    """A named collection of tensors, loaded lazily.

    Attributes:
        name: Human-readable name used in error messages.
        config: The model's Hugging Face ``config.json`` as a dict, when known.
        directory: The directory the weights came from, when they came from one.
        files: The files the weights are read from (empty for in-memory weights), so a writer can refuse to write
            over its own inputs.
    """

    name: str = "model"
    config: dict[str, Any] | None = None
    directory: Path | None = None
    files: tuple[Path, ...] = ()

    def keys(self) -> list[str]:
        """Tensor names, in storage order.

        Returns:
            The names.

        Raises:
            NotImplementedError: In the abstract base class.
        """
        raise NotImplementedError

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one tensor, without loading it.

        Args:
            key: A tensor name.

        Returns:
            ``(shape, dtype)``.

        Raises:
            NotImplementedError: In the abstract base class.
        """
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        """Load one tensor (on CPU).

        Args:
            key: A tensor name.

        Returns:
            The tensor.

        Raises:
            NotImplementedError: In the abstract base class.
        """
        raise NotImplementedError

    def read_flat(self, key: str, start: int, out: Tensor) -> None:
        """Copy entries ``[start, start + out.numel())`` of the flattened tensor into ``out``.

        ``out`` is a CPU tensor of the stored dtype: this is how a merge streams one large tensor through small
        reused buffers.

        Args:
            key: A tensor name.
            start: First flat index.
            out: The buffer to fill (its ``numel()`` entries).
        """
        out.copy_(self.get(key).reshape(-1)[start : start + out.numel()])

    def source_key(self, key: str) -> str:
        """The name ``key`` has in the model itself (a view may show a tensor under another name).

        Args:
            key: A tensor name as this source shows it.

        Returns:
            The name in the underlying model.
        """
        return key

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def state_dict(self) -> dict[str, Tensor]:
        """Load everything.

        Returns:
            ``name -> tensor``.
        """
        return {k: self.get(k) for k in self.keys()}


class StateDictSource(WeightSource):
    """Tensors already in memory (a state dict or a module's parameters and buffers). Nothing is copied.

    Args:
        tensors: A state dict, or a module (its ``state_dict()``).
        name: How errors name this source.

    Raises:
        TypeError: An entry that is not a tensor.

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


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class RenamedSource(WeightSource):
    """A source seen under other tensor names (shown name -> the source's own name); only those names are shown.

    ``drop_config``: ``config.json`` keys the view does not share (a slice of a 40-layer model and one of a
    32-layer model may be merged, so a slice's view drops the layer count).

    Example:
        >>> view = RenamedSource(StateDictSource({"layers.3.w": torch.ones(2)}), {"layers.0.w": "layers.3.w"})
        >>> view.keys(), view.source_key("layers.0.w")
        (['layers.0.w'], 'layers.3.w')
    """

    def __init__(self, source: WeightSource, names: Mapping[str, str], drop_config: Sequence[str] = ()) -> None:
        self.source = source
        self.name, self.directory, self.files = source.name, source.directory, source.files
        config = source.config
        self.config = {k: v for k, v in config.items() if k not in drop_config} if config and drop_config else config
        self._names = dict(names)

    @override
    def keys(self) -> list[str]:
        return list(self._names)

    @override
    def source_key(self, key: str) -> str:
        return self.source.source_key(self._names[key])

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.source.meta(self._names[key])

    @override
    def get(self, key: str) -> Tensor:
        return self.source.get(self._names[key])

    @override
    def read_flat(self, key: str, start: int, out: Tensor) -> None:
        self.source.read_flat(self._names[key], start, out)


def _read_exact(fd: int, buf: memoryview, offset: int, lock: threading.Lock | None) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional reads: safe from several threads at once)."""
    done = 0
    while done < len(buf):
        if lock is None:
            n = os.preadv(fd, [buf[done:]], offset + done)
        else:  # no preadv on this platform: seek and read under a lock
            with lock:
                os.lseek(fd, offset + done, os.SEEK_SET)
                n = os.readv(fd, [buf[done:]])
        if n <= 0:
            raise OSError(f"unexpected end of file after {offset + done} bytes")
        done += n


class _SafetensorsFile:
    """One safetensors file: its header, parsed and checked at open, and an fd for positional reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._close = weakref.finalize(self, os.close, self.fd)
        self.lock = None if hasattr(os, "preadv") else threading.Lock()
        try:
            self.entries = self._parse()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._close()

    def _parse(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        size = os.fstat(self.fd).st_size
        head = bytearray(8)
        if size < 8:
            raise WeightsFileError(f"{self.path} is not a readable safetensors file: {size} bytes, no header")
        _read_exact(self.fd, memoryview(head), 0, self.lock)
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise WeightsFileError(
                f"{self.path} is not a readable safetensors file: header of {n} bytes in a file of {size} "
                "(truncated, or not safetensors)"
            )
        raw = bytearray(n)
        _read_exact(self.fd, memoryview(raw), 8, self.lock)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightsFileError(f"{self.path} is not a readable safetensors file: bad header: {err}") from err
        if not isinstance(header, dict):
            raise WeightsFileError(f"{self.path} is not a readable safetensors file: the header is not an object")
        start, data_size = 8 + n, size - 8 - n
        out = {}
        for key, e in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
                ok = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in (*shape, a, b))
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok or not a <= b:
                raise WeightsFileError(f"{self.path}: tensor {key!r} has a malformed header entry {e!r}")
            if b > data_size:
                raise WeightsFileError(
                    f"{self.path}: tensor {key!r} cannot be read: its data ends at byte {start + b} of a "
                    f"{size}-byte file (truncated?)"
                )
            if dtype in _ST_DTYPES:
                want = math.prod(shape) * _ST_DTYPES[dtype].itemsize
                if b - a != want:
                    raise WeightsFileError(
                        f"{self.path}: tensor {key!r} holds {b - a} bytes but {dtype} {list(shape)} needs {want}"
                    )
            out[key] = (dtype, shape, start + a, b - a)
        return dict(sorted(out.items(), key=lambda kv: kv[1][2]))  # storage order: reads go front to back


class SafetensorsSource(WeightSource):
    """One or more safetensors files (a sharded checkpoint is several), read one tensor at a time.

    Tensors are read with positional reads into fresh buffers, not memory-mapped: the process's resident memory
    holds the tensors being merged and no file pages, however large the model. ``drop_pages=True`` also tells the
    kernel to drop each tensor's pages from the page cache once read (a merge reads every byte once).

    Args:
        files: The safetensors files (the shards of one checkpoint).
        name: How errors name this source (default: the first file).
        config: The model's ``config.json`` contents, when known (architecture checks).
        drop_pages: Drop each tensor's pages from the page cache once read.

    Raises:
        FileNotFoundError: No file given.

    Example:
        >>> import tempfile, pathlib
        >>> from lightning_mergeguard.io import save_safetensors
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> save_safetensors(p, {"w": torch.arange(3.0)})
        >>> SafetensorsSource([p]).get("w")
        tensor([0., 1., 2.])
    """

    def __init__(
        self,
        files: list[Path],
        name: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        drop_pages: bool = False,
    ) -> None:
        if not files:
            raise FileNotFoundError("no safetensors files given")
        self.name = name or str(files[0])
        self.config = config
        self.drop_pages = drop_pages and hasattr(os, "posix_fadvise")
        self._files: list[_SafetensorsFile] = []
        self._where: dict[str, _SafetensorsFile] = {}
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"safetensors file not found: {f}")
            h = _SafetensorsFile(Path(f))
            self._files.append(h)
            for k in h.entries:
                if k in self._where:
                    raise WeightsFileError(f"{self.name}: tensor {k!r} appears in more than one shard ({f})")
                self._where[k] = h

    @override
    def keys(self) -> list[str]:
        return list(self._where)

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        h = self._where[key]
        name, shape, _, _ = h.entries[key]
        if name not in _ST_DTYPES:
            raise WeightsFileError(
                f"{h.path}: tensor {key!r} has safetensors dtype {name}, which torch {torch.__version__} "
                f"cannot hold (supported: {', '.join(_ST_DTYPES)})"
            )
        return shape, _ST_DTYPES[name]

    @override
    def get(self, key: str) -> Tensor:
        shape, dtype = self.meta(key)  # a clear error for a dtype torch lacks
        h = self._where[key]
        _, _, offset, nbytes = h.entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            if nbytes:
                _read_exact(h.fd, memoryview(buf.numpy()), offset, h.lock)
        except OSError as err:  # a file truncated or changed after it was opened
            raise WeightsFileError(f"{h.path}: tensor {key!r} cannot be read: {err}") from err
        if self.drop_pages:
            os.posix_fadvise(h.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return buf.view(dtype).reshape(shape)

    @override
    def read_flat(self, key: str, start: int, out: Tensor) -> None:
        _, dtype = self.meta(key)
        h = self._where[key]
        _, _, offset, nbytes = h.entries[key]
        size = dtype.itemsize
        if out.dtype != dtype or not out.is_contiguous() or (start + out.numel()) * size > nbytes:
            raise ValueError(f"read_flat({key!r}): out must be a contiguous {dtype} slice inside the tensor")
        try:
            _read_exact(h.fd, memoryview(out.view(torch.uint8).numpy()), offset + start * size, h.lock)
        except OSError as err:
            raise WeightsFileError(f"{h.path}: tensor {key!r} cannot be read: {err}") from err
        if self.drop_pages:
            os.posix_fadvise(h.fd, offset + start * size, out.numel() * size, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Close the files (also done when the source is garbage-collected)."""
        for h in self._files:
            h.close()


def _unpickle_reason(err: Exception) -> str:
    r"""What torch's weights-only unpickler refused, without its advice to turn the safety off.

    Example:
        >>> _unpickle_reason(RuntimeError("Weights only load failed. Re-running ... False ...\nWeightsUnpickler "
        ...                               "error: Unsupported global: GLOBAL posix.system\n\nCheck the docs."))
        'Unsupported global: GLOBAL posix.system'
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "an unsupported object")
    return next((line for line in lines if "weights_only" not in line), type(err).__name__)


def _load_pickle_weights(path: Path) -> dict[str, Tensor]:
    import zipfile

    # Zip-format checkpoints (torch >= 1.6) are memory-mapped; the legacy format cannot be, and is read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise WeightsFileError(
            f"{path} is not a plain file of tensors and was not unpickled (it may hold code; torch.load with "
            f"weights_only=True refused it: {_unpickle_reason(err)}); save it as safetensors where you trust it"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsFileError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


MAX_JSON_BYTES = 64 << 20
"""Largest JSON file (a model config, an adapter config, a shard index) read: such files are kilobytes."""


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a clear error naming the file if it is not valid JSON, or larger than 64 MiB."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise WeightsFileError(f"{path}: {what} is {size / 2**20:.0f} MiB; a config of more than 64 MiB is refused")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsFileError(f"{path}: {what} is not valid JSON: {err}") from err


def _read_config(directory: Path) -> dict[str, Any] | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    data = read_json(cfg, "the model config")
    if not isinstance(data, dict):
        raise WeightsFileError(f"{cfg}: the model config must be a JSON object, got {type(data).__name__}")
    return data


def _index_shards(index: Path) -> list[Path]:
    """Shard files named by a Hugging Face ``*.index.json``, checked to exist."""
    data = read_json(index, "the shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsFileError(f"{index}: a shard index needs a non-empty 'weight_map' of tensor name -> file")
    bad = [v for v in weight_map.values() if not isinstance(v, str) or "/" in v or "\\" in v or v in ("", ".", "..")]
    if bad:
        raise WeightsFileError(f"{index}: 'weight_map' names invalid shard files {bad[:3]}")
    shards = [index.parent / s for s in sorted(set(weight_map.values()))]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise WeightsFileError(f"{index}: shard file(s) {missing[:3]} named in 'weight_map' do not exist")
    return shards


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja"]


def is_hub_id(reference: str) -> bool:
    """Whether a model reference names a Hugging Face Hub model (``org/name[@revision]``, no such local path).

    Example:
        >>> is_hub_id("HuggingFaceTB/SmolLM2-135M@main"), is_hub_id("./models/base")
        (True, False)
    """
    return bool(_HUB_ID.match(reference)) and not Path(reference).exists()


def hub_directory(reference: str) -> Path | None:
    """The local directory of a Hugging Face Hub model id (``org/name`` or ``org/name@revision``), as mergekit takes.

    The weights (safetensors, else ``.bin``), configs and tokenizer files are fetched with ``huggingface_hub``
    (from its cache when they are there, e.g. with ``HF_HUB_OFFLINE=1``). ``None`` when ``reference`` does not look
    like a Hub id.

    Raises:
        FileNotFoundError: The id could not be fetched (offline and not cached, unknown, gated...), with the reason.

    Example:
        >>> hub_directory("./not/a-hub-id") is None
        True
    """
    if not _HUB_ID.match(reference):
        return None
    repo_id, _, revision = reference.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_FILES))
        if not any(local.glob("*.safetensors")):  # an older repository: the pickled weights
            local = Path(
                snapshot_download(repo_id, revision=revision or None, allow_patterns=[*_HUB_FILES, "*.bin", "*.pt"])
            )
    except Exception as err:  # offline and not cached, not found, gated, no huggingface_hub
        reason = str(err).splitlines()[0] if str(err) else repr(err)
        raise FileNotFoundError(
            f"no model at {reference}, and {reference!r} could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {reason}); pass a local path, or fetch it where the Hub can be reached"
        ) from err
    return local


Opener = Callable[[str, "str | None"], "WeightSource | None"]
_OPENERS: list[Opener] = []


def register_opener(opener: Opener) -> Opener:
    """Let :func:`open_source` try ``opener(reference, name)`` on every path-like reference first.

    An opener returns a source for the references it knows (``None`` for the others) or raises for one it knows
    to be wrong; :mod:`~lightning_mergeguard.merging.lora` registers mergekit's ``BASE+ADAPTER`` this way, so this
    module needs no import of it.
    """
    _OPENERS.append(opener)
    return opener


def open_source(obj: Any, name: str | None = None, *, drop_pages: bool = False) -> WeightSource:
    """Turn whatever the user passed into a :class:`WeightSource`.

    Args:
        obj: A ``WeightSource``; a state dict or ``nn.Module``; a path to a ``.safetensors`` file, a
            ``.bin``/``.pt``/``.pth``/``.ckpt`` file (loaded with ``weights_only=True``), or a Hugging Face model
            directory (``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``); or
            mergekit's ``BASE+ADAPTER`` for a PEFT LoRA adapter applied to its base
            (:class:`~lightning_mergeguard.merging.lora.LoraSource`); or, as in mergekit, a Hugging Face Hub id
            (``org/name``, ``org/name@revision``) where no such path exists (:func:`hub_directory`).
        name: Name for error messages (defaults to the path).
        drop_pages: Safetensors files only: drop each tensor's pages from the page cache once read.

    Returns:
        The source.

    Raises:
        FileNotFoundError: If a path does not exist (and is no Hub id that can be fetched, see
            :func:`hub_directory`) or a directory holds no weights.
        TypeError: For an unsupported object.
    """
    if isinstance(obj, WeightSource):
        return obj
    if isinstance(obj, (Mapping, nn.Module)):
        return StateDictSource(obj, name=name or "state_dict")
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(f"cannot read weights from a {type(obj).__name__}; pass a state dict, module or path")
    for opener in _OPENERS:  # references other modules know how to open (mergekit's BASE+ADAPTER, say)
        opened = opener(str(obj), name)
        if opened is not None:
            return opened
    path = Path(obj)
    label = name or str(path)
    if path.is_file():
        one: WeightSource
        if path.suffix == ".safetensors":
            one = SafetensorsSource([path], name=label, config=_read_config(path.parent), drop_pages=drop_pages)
        else:
            one = StateDictSource(_load_pickle_weights(path), name=label)
        one.files = (path,)
        return one
    if not path.is_dir():
        hub = hub_directory(str(obj))
        if hub is None:
            raise FileNotFoundError(f"no model at {path}")
        path = hub
    config = _read_config(path)
    # The same file transformers would read: model.safetensors, then its index, then the .bin forms.
    src: WeightSource
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
        src = SafetensorsSource(files, name=label, config=config, drop_pages=drop_pages)
    elif (path / "model.safetensors.index.json").is_file():
        files = [*_index_shards(path / "model.safetensors.index.json"), path / "model.safetensors.index.json"]
        src = SafetensorsSource(files[:-1], name=label, config=config, drop_pages=drop_pages)
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
        src = StateDictSource(_load_pickle_weights(files[0]), name=label)
        src.config = config
    elif (path / "pytorch_model.bin.index.json").is_file():
        files = [*_index_shards(path / "pytorch_model.bin.index.json"), path / "pytorch_model.bin.index.json"]
        merged: dict[str, Tensor] = {}
        for shard in files[:-1]:
            merged.update(_load_pickle_weights(shard))
        src = StateDictSource(merged, name=label)
        src.config = config
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            what = "several *.safetensors files and no index" if files else "no model weights"
            raise FileNotFoundError(
                f"{path} holds {what} (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
            )
        src = SafetensorsSource(files, name=label, config=config, drop_pages=drop_pages)
    src.directory = path
    src.files = tuple(files)
    return src


def count_nonfinite(t: Tensor) -> int:
    """NaN/Inf entries of a floating tensor.

    A sum in the tensor's own dtype is one cheap pass that is NaN/Inf whenever an entry is; only then is the exact
    count paid for (an overflow of the sum alone is not an error).
    """
    if bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


_SUMMABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_checked(src: WeightSource, key: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One tensor of ``src`` on ``device``; floating ones in ``dtype``, checked for NaN/Inf (naming model and key).

    The check runs on the tensor as stored (a bf16 sum reads half the bytes of an fp32 one), before the conversion.
    """
    t = src.get(key).to(device)  # the transfer moves the stored bytes, not the wider compute dtype
    if not t.is_floating_point():
        return t
    if t.dtype not in _SUMMABLE:  # float8: no sum kernel in its own dtype
        t = t.to(dtype)
    bad = count_nonfinite(t)
    if bad:
        raise NonFiniteError(f"tensor {key!r} of model {src.name!r} has {bad} NaN/Inf value(s)")
    return t.to(dtype)


def match_names(
    names: Iterable[str], available: Iterable[str], what: str = "source", *, missing: str = "raise"
) -> dict[str, str]:
    """Map module parameter names to keys of another state dict, stripping leading components as needed.

    A LightningModule's ``backbone.0.weight`` matches ``backbone.0.weight`` or ``0.weight`` in a checkpoint of the
    bare network (a ``model.`` or ``backbone.`` prefix is the usual difference). The ``_orig_mod`` components of a
    ``torch.compile``'d submodule's names (on either side) are ignored, and so is the leading ``module.`` of a
    checkpoint saved from a DDP-wrapped model (open_clip's training checkpoints). With ``missing="skip"``, names
    without a counterpart (a task head the base never had) are left out instead.

    Raises:
        ValueError: Naming the first parameter that has no counterpart (``missing="raise"``).

    Example:
        >>> match_names(["backbone.0.weight"], ["0.weight", "0.bias"])
        {'backbone.0.weight': '0.weight'}
        >>> match_names(["net._orig_mod.0.weight"], ["net.0.weight"])  # a torch.compile'd submodule
        {'net._orig_mod.0.weight': 'net.0.weight'}
        >>> match_names(["net.0.weight"], ["net._orig_mod.0.weight"])  # a checkpoint of one
        {'net.0.weight': 'net._orig_mod.0.weight'}
        >>> match_names(["model.visual.proj"], ["module.visual.proj"])  # saved from DDP
        {'model.visual.proj': 'module.visual.proj'}
    """
    keys: dict[str, str] = {}
    listed = list(available)
    for key in listed:
        keys[key] = key
    for key in listed:  # a checkpoint of a torch.compile'd module: its keys as the uncompiled module names them
        keys.setdefault(uncompiled_name(key), key)
    for key in listed:  # a checkpoint saved from DDP/DataParallel (open_clip's training checkpoints): 'module.'
        if key.startswith("module."):
            keys.setdefault(uncompiled_name(key.removeprefix("module.")), key)
    out = {}
    for name in names:
        match = None
        for form in dict.fromkeys((name, uncompiled_name(name))):
            parts = form.split(".")
            match = next((keys[s] for s in (".".join(parts[i:]) for i in range(len(parts))) if s in keys), None)
            if match is not None:
                break
        if match is None:
            if missing == "skip":
                continue
            raise ValueError(f"{what} has no tensor for parameter {name!r}")
        out[name] = match
    return out


def uncompiled_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` components ``torch.compile`` adds to a compiled submodule's names.

    Example:
        >>> uncompiled_name("model._orig_mod.layers.0.weight")
        'model.layers.0.weight'
    """
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def load_matching(path: Any, names: Iterable[str], what: str) -> dict[str, Tensor]:
    """Load the tensors of a checkpoint (any form :func:`open_source` reads) that match parameter ``names``.

    Names are matched with :func:`match_names`, so a checkpoint of the bare network serves a LightningModule.

    Raises:
        ValueError: Naming the first parameter that has no counterpart.
    """
    return dict(iter_matching(path, names, what))


def iter_matching(path: Any, names: Iterable[str], what: str) -> Iterator[tuple[str, Tensor]]:
    """:func:`load_matching` one tensor at a time: ``(parameter name, tensor)``, read as it is asked for."""
    src = open_source(path, name=what)
    label = f"{what} {path}" if isinstance(path, (str, os.PathLike)) else f"{what} (state dict)"
    for name, key in match_names(names, src.keys(), what=label).items():
        yield name, src.get(key)

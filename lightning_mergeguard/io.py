"""Atomic file output and a streaming safetensors writer (one tensor in memory at a time)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

__all__ = [
    "SAFETENSORS_DTYPES",
    "ShardedSafetensorsWriter",
    "StreamingSafetensorsWriter",
    "atomic_open",
    "atomic_write_json",
    "atomic_write_text",
    "clean_orphaned_temps",
    "parse_size",
    "save_safetensors",
]


def _safetensors_dtypes() -> dict[torch.dtype, str]:
    names = {
        "float64": "F64",
        "float32": "F32",
        "float16": "F16",
        "bfloat16": "BF16",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2",
        "float8_e8m0fnu": "F8_E8M0",
        "int64": "I64",
        "int32": "I32",
        "int16": "I16",
        "int8": "I8",
        "uint64": "U64",
        "uint32": "U32",
        "uint16": "U16",
        "uint8": "U8",
        "bool": "BOOL",
        "complex64": "C64",
    }
    return {getattr(torch, k): v for k, v in names.items() if hasattr(torch, k)}  # float8 / uint16+ are newer


SAFETENSORS_DTYPES: dict[torch.dtype, str] = _safetensors_dtypes()
"""torch dtype -> safetensors dtype name, for every dtype both this torch and safetensors have."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb"):
    """Open a temporary file next to ``path`` and move it into place only if the block succeeds.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_open(p, "w") as f:
        ...     _ = f.write("hi")
        >>> p.read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_orphaned_temps(path.parent)
    # The temp name carries this process's id: concurrent writers never collide, and clean_orphaned_temps can tell
    # the files of a killed writer from those of a live one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; move it into place only if the block succeeds.

    An existing directory at ``path`` is replaced: it is moved aside first, so ``path`` always holds either the old
    complete directory or the new one, never a half-written mix.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "adapter"
        >>> with atomic_directory(p) as d:
        ...     _ = (d / "a.txt").write_text("hi")
        >>> sorted(f.name for f in p.iterdir())
        ['a.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_orphaned_temps(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmpdir", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the directory the permissions mkdir would
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.{os.getpid()}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:[A-Za-z0-9_]+\.(?P<kind>tmp|tmpdir)|(?P<old>old))$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_orphaned_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed writers left in ``directory``.

    That is: temp files and directories of :func:`atomic_open` and :func:`atomic_directory` whose process no
    longer runs.

    A directory moved aside by a replacing :func:`atomic_directory` (``.NAME.PID.old``) is put back where its
    writer died before the new one was in place, and removed otherwise. Temps of live writers (this process
    included) are kept. Every writer of this library calls this on its output's folder first. Returns the paths
    removed (or restored).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / ".model.safetensors.999999999.abc123.tmp").write_bytes(b"partial")
        >>> (d / ".protected.999999999.k2j_x.tmpdir").mkdir()
        >>> sorted(p.name for p in clean_orphaned_temps(d))
        ['.model.safetensors.999999999.abc123.tmp', '.protected.999999999.k2j_x.tmpdir']
    """
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for f in directory.iterdir():
        m = _TEMP.match(f.name)
        if m is None or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            if m["old"] and f.is_dir() and not (directory / m["name"]).exists():
                os.replace(f, directory / m["name"])  # its writer died between the two renames: put it back
            elif (m["kind"] == "tmp" or m["old"]) and f.is_file():
                f.unlink()
            elif f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                continue
            removed.append(f)
        except FileNotFoundError:  # another cleaner was first
            pass
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON (indented, keys in insertion order) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


_WRITEBACK_BYTES = 64 << 20


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, with shapes and dtypes declared up front.

    The header is computed from the declared ``(name, dtype, shape)`` list, so each tensor can be produced,
    written and freed before the next one is computed: peak memory is one tensor, not a model. The file appears
    at ``path`` atomically when every declared tensor has been written.

    Example:
        >>> import tempfile, pathlib
        >>> from safetensors.torch import load_file
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> with StreamingSafetensorsWriter(p, [("a", torch.float32, (2,))]) as w:
        ...     w.write("a", torch.ones(2))
        >>> load_file(p)["a"]
        tensor([1., 1.])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, dtype, shape in self._specs:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            if name in self._expected:
                raise ValueError(f"tensor {name!r} declared twice")
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected[name] = (dtype, tuple(shape), nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._header = raw
        self._order = [s[0] for s in self._specs]
        self._next = 0
        self._ctx = None
        self._file: BinaryIO | None = None
        self._written = self._synced = 0

    def __enter__(self) -> StreamingSafetensorsWriter:
        self._ctx = atomic_open(self.path, "wb")
        self._file = self._ctx.__enter__()
        self._file.write(len(self._header).to_bytes(8, "little"))
        self._file.write(self._header)
        return self

    def write(self, name: str, tensor: Tensor) -> None:
        """Write the next tensor; tensors must come in the declared order with the declared dtype and shape."""
        if self._file is None:
            raise RuntimeError("use StreamingSafetensorsWriter as a context manager")
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise ValueError(f"expected tensor {want!r} next, got {name!r}")
        dtype, shape, nbytes = self._expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: declared {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        self._file.write(memoryview(data))
        self._next += 1
        self._written += nbytes
        if self._written - self._synced >= _WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start writing what was written so far to disk, without waiting, and let the kernel drop those pages.

        The final ``fsync`` (the file must be on disk before it is renamed into place) then has little left to do,
        and a large output does not fill the page cache with dirty pages.
        """
        assert self._file is not None
        if not hasattr(os, "posix_fadvise"):
            return
        self._file.flush()
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._synced = self._written

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._ctx is not None
        if exc_type is None and self._next != len(self._order):
            missing = self._order[self._next]
            err = ValueError(f"safetensors file closed before tensor {missing!r} was written")
            self._ctx.__exit__(type(err), err, None)
            raise err
        self._ctx.__exit__(exc_type, exc, tb)
        self._file = None


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save a state dict to safetensors atomically (tensors sharing storage are written as separate copies)."""
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamingSafetensorsWriter(path, specs, metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)


_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "b": 10**9,  # mergekit's "5B": five billion bytes
    "t": 10**12,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: int | str) -> int:
    """A byte count from ``500M``, ``5B`` (mergekit: billions), ``2GB``, ``512MiB`` or a plain integer.

    Raises:
        ValueError: For anything else, or a size that is not positive.

    Example:
        >>> parse_size("500M"), parse_size("5B"), parse_size("1GiB"), parse_size(1024)
        (500000000, 5000000000, 1073741824, 1024)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size: use a number of bytes or e.g. 500M, 5B, 2GB, 512MiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size {value!r} must be positive")
    return size


def _shard_plan(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int | None
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split specs, in order, into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(torch.Size(spec[2]).numel()) * torch.empty((), dtype=spec[1]).element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


class ShardedSafetensorsWriter:
    """Write a model as safetensors shards plus an index, tensor by tensor, as ``save_pretrained`` lays them out.

    One shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``. Every shard is complete before any is renamed into place, and the index is
    written last, so a failed write leaves no new file behind.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> specs = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
        >>> with ShardedSafetensorsWriter(d, specs, max_shard_bytes=8) as w:
        ...     w.write("a", torch.ones(2)); w.write("b", torch.zeros(2))
        >>> sorted(p.name for p in d.iterdir())
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._plan = _shard_plan(list(specs), max_shard_bytes)
        n = len(self._plan)
        self.files = (
            [self.directory / "model.safetensors"]
            if n == 1
            else [self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.index = None if n == 1 else self.directory / "model.safetensors.index.json"
        self._metadata = metadata
        self._shard_of = {spec[0]: i for i, shard in enumerate(self._plan) for spec in shard}
        self._stack: ExitStack | None = None
        self._open: dict[int, StreamingSafetensorsWriter] = {}

    def __enter__(self) -> ShardedSafetensorsWriter:
        self._stack = ExitStack()
        return self

    def write(self, name: str, tensor: Tensor) -> None:
        """Write the next tensor (declared order, dtype and shape)."""
        if self._stack is None:
            raise RuntimeError("use ShardedSafetensorsWriter as a context manager")
        if name not in self._shard_of:
            raise ValueError(f"tensor {name!r} was not declared")
        i = self._shard_of[name]
        if i not in self._open:
            w = StreamingSafetensorsWriter(self.files[i], self._plan[i], self._metadata)
            self._open[i] = self._stack.enter_context(w)
        self._open[i].write(name, tensor)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        if exc_type is None:
            missing = [i for i in range(len(self._plan)) if i not in self._open]
            if missing:
                err = ValueError(f"shard {self.files[missing[0]].name} closed before any of its tensors was written")
                stack.__exit__(type(err), err, None)
                raise err
        stack.__exit__(exc_type, exc, tb)
        if exc_type is None and self.index is not None:
            total = sum(w._written for w in self._open.values())
            weight_map = {name: self.files[i].name for name, i in self._shard_of.items()}
            atomic_write_json(self.index, {"metadata": {"total_size": total}, "weight_map": weight_map})

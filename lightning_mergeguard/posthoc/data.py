"""The owner's data for post-hoc protection: JSONL rows read within limits, image folders, a held-out split."""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.validation import check_int

__all__ = ["OwnerData", "hold_out", "image_data", "load_rows", "owner_data"]


MAX_DATA_BYTES = 1 << 30
"""Largest data file :func:`load_rows` reads (1 GiB)."""


@dataclass(frozen=True)
class OwnerData:
    """The owner's data for post-hoc protection, and how it is read and batched.

    Args:
        path: Causal LMs: a JSONL file of ``{"prompt", "answer"}`` rows. open_clip: an image folder (one sub-folder
            per class) or ``module:function`` returning ``(train, val)`` datasets of ``(image, label)``. A quarter of
            the rows (or the ``val`` set) is held out to score the guard rail.
        batch_size: Batch size.
        max_length: Token budget of a prompt plus answer (causal LMs).
        max_rows: Most rows read from a JSONL file (``--max-rows``).
        max_row_bytes: Longest line of a JSONL file, in bytes (``--max-row-bytes``).

    Example:
        >>> OwnerData("rows.jsonl", batch_size=16).batch_size
        16
    """

    path: str
    batch_size: int = 8
    max_length: int = 64
    max_rows: int = 100_000
    max_row_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise ConfigError(f"data must be a path or 'module:function', got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))
        for name in ("batch_size", "max_length", "max_rows", "max_row_bytes"):
            try:
                check_int(getattr(self, name), name, low=1, want="an integer >= 1")
            except ValueError as err:
                raise ConfigError(str(err)) from None


def owner_data(value: str | os.PathLike[str] | OwnerData) -> OwnerData:
    """An :class:`OwnerData` from the ``data=`` argument: as given, or a path with the default settings."""
    return value if isinstance(value, OwnerData) else OwnerData(value)


def load_rows(
    path: str | os.PathLike[str], *, max_rows: int = 100_000, max_row_bytes: int = 1 << 20
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` rows from a JSONL file of ``{"prompt": ..., "answer": ...}`` objects.

    The file is untrusted: it is read line by line with every line's length bounded before it is decoded, so a
    huge line or file costs neither memory nor time.

    Args:
        path: The JSONL file (UTF-8).
        max_rows: Most rows read (``mergeguard-protect --max-rows``).
        max_row_bytes: Longest line, in bytes (``--max-row-bytes``).

    Returns:
        The rows, in file order.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Naming the file (and line) of a row that is not such an object, is not UTF-8 or is too long,
            a file over the limits, or fewer than 4 rows.

    Example:
        >>> import tempfile, pathlib, json
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
        >>> rows = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(4)]
        >>> _ = p.write_text(chr(10).join(rows))
        >>> load_rows(p)[0]
        ('0+1=', '1')
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise ConfigError(f"{path}: {size / 2**30:.1f} GiB; data files of at most 1 GiB are read (sample the rows)")
    rows = []
    with path.open("rb") as f:
        for i in itertools.count(1):
            raw = f.readline(max_row_bytes + 2)  # the line and its "\r\n": a longer one stops here, unread
            if not raw:
                break
            if len(raw.rstrip(b"\r\n")) > max_row_bytes:
                raise ConfigError(
                    f"{path}:{i}: a line longer than {max_row_bytes} bytes; shorten it or raise --max-row-bytes "
                    "(max_row_bytes=)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{path}:{i}: not UTF-8 text (byte {err.start} of the line: {raw[err.start : err.start + 1]!r})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{i}: not a JSON object: {err}") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("prompt"), str)
                or not isinstance(obj.get("answer"), str)
            ):
                raise ConfigError(
                    f'{path}:{i}: each line must be {{"prompt": "...", "answer": "..."}}, got {line[:80]!r}'
                )
            if len(rows) == max_rows:
                raise ConfigError(f"{path}: more than {max_rows} rows; sample them or raise --max-rows (max_rows=)")
            rows.append((obj["prompt"], obj["answer"]))
    if len(rows) < 4:
        raise ConfigError(f"{path}: {len(rows)} rows; at least 4 are needed (a training and a held-out split)")
    return rows


def hold_out(items: list[Any], seed: int, held_out: float = 0.25) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: a seeded shuffle of ``items`` with a quarter (at least one) held out.

    Example:
        >>> hold_out(list(range(8)), seed=0)
        ([5, 2, 0, 3, 7, 6], [4, 1])
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(held_out * len(items)))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def image_data(data: str, seed: int, transform: Any) -> tuple[Dataset, Dataset]:
    """``(train, val)`` of ``(image, label)``: an image folder or a ``module:function`` returning both.

    Args:
        data: A folder with one sub-folder per class (read through ``transform``; a seeded quarter is held out as
            ``val``), or ``"module:function"``.
        seed: Seed of the held-out split.
        transform: The images' preprocessing, e.g. :func:`~lightning_mergeguard.models.open_clip.image_transform`.

    Raises:
        ConfigError: For a path that is neither, or an entry point that cannot be loaded.
    """
    if ":" in data and not Path(data).exists():
        import importlib

        module_name, func = data.split(":", 1)
        try:
            train, val = getattr(importlib.import_module(module_name), func)()
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"data entry point {data!r} cannot be loaded: {err}") from err
        return train, val
    if not Path(data).is_dir():
        raise ConfigError(f"--data {data!r}: expected an image folder (one sub-folder per class) or module:function")
    from torchvision import datasets

    folder = datasets.ImageFolder(data, transform=transform)
    train_idx, val_idx = hold_out(list(range(len(folder))), seed)
    return torch.utils.data.Subset(folder, train_idx), torch.utils.data.Subset(folder, val_idx)


def _to_device(batches: Iterable[Any], device: torch.device) -> Iterable[Any]:
    from lightning_mergeguard.evaluation import move_batch

    return (move_batch(b, device) for b in batches)

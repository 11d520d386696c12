"""Streaming, atomic output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lightning_mergeguard.io import StreamingSafetensorsWriter, atomic_write_text, save_safetensors
from lightning_mergeguard.merging import merge


def test_streaming_writer_roundtrip_all_dtypes(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "d": torch.tensor(2.5, dtype=torch.float16),
        "e": torch.tensor([True, False]),
    }
    save_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k


def test_writer_failure_leaves_no_file(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError), StreamingSafetensorsWriter(target, [("a", torch.float32, (2,))]) as w:
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with (
        pytest.raises(ValueError, match="closed before tensor 'b'"),
        StreamingSafetensorsWriter(target, [("a", torch.float32, (2,)), ("b", torch.float32, (1,))]) as w,
    ):
        w.write("a", torch.ones(2))
    assert not target.exists()
    with (
        pytest.raises(ValueError, match=r"declared torch\.float32"),
        StreamingSafetensorsWriter(target, [("a", torch.float32, (2,))]) as w,
    ):
        w.write("a", torch.ones(3))


def test_atomic_text_replaces(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"


def test_merge_to_file_equals_in_memory(llama_dirs, tmp_path):
    cfg = {
        "merge_method": "ties",
        "base_model": str(llama_dirs["base"]),
        "models": [{"model": str(llama_dirs[n]), "parameters": {"weight": 0.5, "density": 0.3}} for n in "abc"],
    }
    mem = merge(cfg)
    path = merge(cfg, out=tmp_path / "m.safetensors")
    disk = load_file(path)
    assert set(mem) == set(disk) and all(torch.equal(mem[k], disk[k]) for k in mem)

"""Reading safetensors without memory maps; streaming, sharded, atomic output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_mergeguard.errors import NonFiniteError, OutputError, WeightsFileError
from lightning_mergeguard.io import (
    ShardedSafetensorsWriter,
    StreamingSafetensorsWriter,
    atomic_write_text,
    parse_size,
    save_safetensors,
)
from lightning_mergeguard.merging import SafetensorsSource, iter_merge, merge, open_source


def every_dtype() -> dict[str, torch.Tensor]:
    """Tensors of every kind a checkpoint holds: float widths, ints, a scalar, an empty tensor, a mask, float8."""
    return {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.arange(4, dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
        "f8": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
    }


def test_streaming_writer_roundtrip_all_dtypes(tmp_path):
    tensors = every_dtype()
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


# ------------------------------------------------------------------------------------- sharded output, sizes
def test_parse_size_reads_the_units_users_write():
    assert parse_size("500M") == 500_000_000
    assert parse_size("5B") == 5_000_000_000  # mergekit's default: billions of bytes
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(4096) == 4096
    for bad in ("5 lightyears", "-1M", "0", "M"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_sharded_writer_splits_in_order_and_indexes(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=100) as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert [f.name for f in w.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"] == {
        "t0": w.files[0].name,
        "t1": w.files[0].name,
        "t2": w.files[1].name,
        "t3": w.files[1].name,
        "t4": w.files[2].name,
    }
    back = {k: v for f in w.files for k, v in load_file(f).items()}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_sharded_writer_failure_leaves_no_shard(tmp_path):
    specs = [(f"t{i}", torch.float32, (10,)) for i in range(4)]
    with pytest.raises(RuntimeError, match="boom"), ShardedSafetensorsWriter(tmp_path, specs, 80) as w:
        for i in range(3):
            w.write(f"t{i}", torch.ones(10))  # the first shard is complete, but must not appear alone
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_sharded_merge_loads_in_transformers_and_equals_one_file(llama_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_dirs["base"]),
        "models": [{"model": str(llama_dirs[n]), "parameters": {"weight": 0.5}} for n in "ab"],
    }
    one = load_file(merge(cfg, out=tmp_path / "one") / "model.safetensors")
    out = merge(cfg, out=tmp_path / "one", out_shard_size=5_000)  # the same directory, now sharded
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()  # the single file it replaced is gone
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in one.items() if k in got)
    merge(cfg, out=out)  # and back: the shards and their index go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    with pytest.raises(OutputError, match="more than one shard"):
        merge(cfg, out=tmp_path / "x.safetensors", out_shard_size="5K")


def test_low_memory_and_no_prefetch_give_the_same_bytes(llama_dirs, tmp_path):
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(llama_dirs["base"]),
        "models": [{"model": str(llama_dirs[n]), "parameters": {"weight": 0.5, "density": 0.4}} for n in "abc"],
        "seed": 3,
    }
    fast = load_file(merge(cfg, out=tmp_path / "fast.safetensors"))
    low = load_file(merge(cfg, out=tmp_path / "low.safetensors", low_memory=True))
    streamed = dict(iter_merge(cfg, prefetch_bytes=0))
    assert list(fast) == list(low) and all(
        torch.equal(fast[k], low[k]) and torch.equal(fast[k], streamed[k]) for k in fast
    )


# ------------------------------------------------------------------------------------------------ the reader
def test_reader_matches_safetensors_for_every_dtype_and_drops_pages(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "m.safetensors")
    for drop in (False, True):
        src = SafetensorsSource([tmp_path / "m.safetensors"], drop_pages=drop)
        for k, v in tensors.items():
            got = src.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
        src.close()


def test_reader_is_safe_from_several_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"t{i}": torch.randn(256, 64) for i in range(16)}
    save_file(tensors, tmp_path / "m.safetensors")
    src = SafetensorsSource([tmp_path / "m.safetensors"])
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(tensors, pool.map(src.get, list(tensors) * 4)))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def _header_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            r"data ends at byte 77 of a 73-byte file \(truncated",
        ),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, r"holds 8 bytes but F32 \[3\]"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed header entry"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed header entry"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "malformed header entry"),
    ],
)
def test_malformed_safetensors_are_named(tmp_path, header, data, message):
    _header_file(tmp_path / "m.safetensors", header, data)
    with pytest.raises(WeightsFileError, match=message):
        open_source(tmp_path / "m.safetensors")


def test_not_safetensors_at_all(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"<html>not found</html>")
    with pytest.raises(WeightsFileError, match="is not a readable safetensors file"):
        open_source(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes((5).to_bytes(8, "little") + b"[1,2]")
    with pytest.raises(WeightsFileError, match="header is not an object"):
        open_source(tmp_path / "m.safetensors")


def test_an_error_in_a_prefetched_tensor_names_it_and_writes_nothing(tmp_path):
    base = {f"t{i}": torch.zeros(4) for i in range(6)}
    donor = {k: torch.ones(4) for k in base}
    donor["t4"] = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    save_file(base, tmp_path / "base.safetensors")
    save_file(donor, tmp_path / "a.safetensors")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [{"model": str(tmp_path / "a.safetensors"), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(NonFiniteError, match=r"tensor 't4' of model .*a.safetensors' has 1 NaN/Inf"):
        merge(cfg, out=tmp_path / "out", check_base=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- slice-by-slice (elementwise)
def _bf16_family(tmp_path, nan_in: str | None = None) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(37, 11, generator=g), "v": torch.randn(5, generator=g), "n": torch.arange(3)}
    paths = {}
    for i, name in enumerate(["base", "a", "b"]):
        state = {
            k: (v + 0.1 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in base.items()
        }
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
        if name == nan_in:
            state["w"][3, 4] = float("nan")
            state["w"][30, 1] = float("inf")
        save_file(state, tmp_path / f"{name}.safetensors")
        paths[name] = str(tmp_path / f"{name}.safetensors")
    return paths


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_slices_give_the_same_bytes_as_whole_tensors(tmp_path, monkeypatch, method, out_dtype):
    import lightning_mergeguard.merging.engine as engine

    paths = _bf16_family(tmp_path)
    cfg = {
        "merge_method": method,
        "models": [{"model": paths[n], "parameters": {"weight": w}} for n, w in (("a", 0.7), ("b", 0.4))],
        "dtype": "float32",
        "out_dtype": out_dtype,
        **({"base_model": paths["base"], "parameters": {"lambda": 0.9}} if method == "task_arithmetic" else {}),
    }
    whole = merge(cfg, check_base=False)
    monkeypatch.setattr(engine, "CHUNK", 16)  # every float tensor above 16 entries goes slice by slice
    sliced = load_file(merge(cfg, out=tmp_path / "s.safetensors", check_base=False))
    assert list(sliced) == list(whole)
    for k in whole:
        assert sliced[k].dtype == whole[k].dtype and torch.equal(sliced[k], whole[k]), k


def test_slices_name_the_model_with_nan_and_count_every_slice(tmp_path, monkeypatch):
    import lightning_mergeguard.merging.engine as engine

    paths = _bf16_family(tmp_path, nan_in="b")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": paths["base"],
        "models": [{"model": paths[n], "parameters": {"weight": 0.0 if n == "b" else 1.0}} for n in "ab"],
    }
    monkeypatch.setattr(engine, "CHUNK", 16)
    with pytest.raises(NonFiniteError, match=r"tensor 'w' of model .*b.safetensors' has 2 NaN/Inf value\(s\)"):
        merge(cfg, out=tmp_path / "out", check_base=False)  # a weight of 0 still propagates NaN (0 * inf)
    assert not (tmp_path / "out").exists()
    (tmp_path / "clean").mkdir()
    clean = _bf16_family(tmp_path / "clean")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": clean["base"],
        "models": [{"model": clean["a"], "parameters": {"weight": 1e6}}],
        "out_dtype": "float16",
    }
    monkeypatch.setattr(engine, "CHUNK", 2)  # 'v' (5 entries, first in the file) goes slice by slice too
    with pytest.raises(NonFiniteError, match=r"the merge produced \d+ NaN/Inf value\(s\) in tensor 'v'"):
        merge(cfg, out=tmp_path / "out2", check_base=False)

"""Synthetic Llama checkpoints of real shapes (random weights), for merge speed and memory at sizes no wheel ships.

A base and "fine-tunes" of it: each fine-tune is the base plus a small random task vector, so the engine's
same-base check passes as it would for real fine-tunes. Written tensor by tensor, in bf16, as sharded Hugging Face
directories (``model-0000i-of-0000n.safetensors`` + index + ``config.json``), and cached under ``.cache``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's shape: 1.10B parameters, 2.2 GB in bf16.
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    # Llama-2-7B's layer shapes; the layer count is a flag (32 for the whole model, 13.5 GB in bf16 per model).
    "7b-shaped": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
}


def _specs(shape: dict[str, Any]) -> tuple[Any, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return config, [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()]


def _randn(shape: tuple[int, ...], index: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def synthetic_family(
    root: Path, size: str, donors: int = 2, layers: int | None = None, shard: str = "1G", shrink: int = 1
) -> dict[str, Path]:
    """``{"base": dir, "d0": dir, ...}``: a base and ``donors`` fine-tunes of it, written once and cached.

    Weights are ``N(0, 0.02)`` (norms ``1 + N(0, 0.02)``); fine-tune ``i`` adds ``N(0, 0.002)``: a task vector a
    tenth of the weights' scale. ``shrink`` divides every width (hidden, MLP, vocabulary) for smoke tests: the
    same architecture and tensor layout at a size a test can merge in seconds.
    """
    from lightning_mergeguard.io import ShardedSafetensorsWriter, atomic_write_json, parse_size

    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    shape = dict(SHAPES[size], **({"num_hidden_layers": layers} if layers else {}))
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        shape[key] //= shrink
    tag = hashlib.sha256(json.dumps([shape, donors, shard], sort_keys=True).encode()).hexdigest()[:10]
    where = root / f"synthetic-{size}-{shape['num_hidden_layers']}L-{tag}"
    paths = {"base": where / "base", **{f"d{i}": where / f"d{i}" for i in range(donors)}}
    config, specs = _specs(shape)
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture definition from this
    if (where / "done").is_file():
        for path in paths.values():
            atomic_write_json(path / "config.json", config.to_dict())
        return paths
    for seed, (name, path) in enumerate(paths.items()):
        path.mkdir(parents=True, exist_ok=True)
        with ShardedSafetensorsWriter(path, specs, parse_size(shard), metadata={"format": "pt"}) as w:
            for i, (key, dtype, dims) in enumerate(specs):
                t = 0.02 * _randn(dims, i, seed=0)
                if key.endswith("norm.weight"):
                    t += 1.0
                if name != "base":
                    t += 0.002 * _randn(dims, i, seed=seed)
                w.write(key, t.to(dtype))
                del t
        atomic_write_json(path / "config.json", config.to_dict())
    (where / "done").write_text("ok\n")
    return paths


def parameter_count(path: Path) -> int:
    """Parameters in a model directory, from its safetensors headers."""
    from lightning_mergeguard.merging import open_source

    src = open_source(path)
    total = 0
    for k in src.keys():
        n = 1
        for d in src.meta(k)[0]:
            n *= d
        total += n
    return total

"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def perturbed_state_dict(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three 'fine-tunes' of it, saved as Hugging Face directories (safetensors)."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i, name in enumerate(["a", "b", "c"]):
        m = tiny_llama()
        m.load_state_dict(perturbed_state_dict(base.state_dict(), seed=10 + i))
        m.save_pretrained(root / name)
        paths[name] = root / name
    return paths


_CUDA = torch.cuda.is_available()


@pytest.fixture(
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="no CUDA device")]
        ),
    ]
)
def device(request) -> torch.device:
    """Every available device: the CPU always, CUDA when present (marked ``gpu``)."""
    return torch.device(request.param)


def accelerator(device: torch.device) -> str:
    """The Lightning accelerator name for a torch device."""
    return "gpu" if device.type == "cuda" else "cpu"

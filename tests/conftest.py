"""Shared fixtures (the helpers they build on are in tests/_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import make_byte_tokenizer, perturbed_state_dict, tiny_llama


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


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + EOS), so no files are needed."""
    return make_byte_tokenizer()

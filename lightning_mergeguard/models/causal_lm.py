"""Causal-LM support for Hugging Face ``transformers`` models.

A LightningModule, a prompt/answer dataset, greedy decoding and exact match.

The SmolLM2 weights and the generated tasks of the demos live in :mod:`lightning_mergeguard.demos.smollm2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mergeguard.evaluation import eval_mode

__all__ = ["CausalLMModule", "LMTaskDataset", "exact_match", "greedy_continuations", "left_pad"]

_CHARS_PER_TOKEN = 64
"""Characters of a prompt or answer kept per token of ``max_length`` before tokenizing (no token is that long)."""


class LMTaskDataset(torch.utils.data.Dataset):
    """Tokenized prompt+answer rows; the loss covers the answer (and EOS) only, padding is masked.

    A prompt or answer is cut to ``64 * max_length`` characters before it is tokenized, so a huge row costs no
    more than a long one (the first ``max_length`` tokens are the same).
    """

    def __init__(self, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int = 32) -> None:
        self.rows = []
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        chars = max_length * _CHARS_PER_TOKEN  # an untrusted row is cut before it is tokenized whole
        for prompt, answer in pairs:
            p = tokenizer(prompt[:chars], add_special_tokens=False).input_ids
            a = [*tokenizer(answer[:chars], add_special_tokens=False).input_ids, eos]
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
    device = next(lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    with eval_mode(lm):
        for i in range(0, len(prompts), batch_size):
            batch = left_pad(tokenizer, prompts[i : i + batch_size], device)
            out = lm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            width = batch["input_ids"].shape[1]
            texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:]]
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

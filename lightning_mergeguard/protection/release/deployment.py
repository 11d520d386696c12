"""What the owner's users do to a released model: the deployment check of a protection.

Owners publish in bf16 and their users run fp16, int8, 4-bit groups and GGUF files, and fine-tune further. A
protection setting the owner's users cannot deploy is not one to recommend, so the check scores the model after
each treatment, next to the unprotected model under the same treatment:

- ``fp16`` / ``bf16``: the weights stored in that dtype (and computed back in float32);
- ``int8-row``: LLM.int8-style absmax round-to-nearest per output row;
- ``int4-g32`` / ``int4-g128``: 4-bit symmetric absmax round-to-nearest in groups of 32 / 128 along the input
  dimension (GPTQ/AWQ-style group size, without their error correction: the plainest 4-bit a user can apply);
- ``gguf-q8_0`` / ``gguf-q4_0``: the ``gguf`` package's own quantizers (llama.cpp's formats), on matrices whose rows
  are whole blocks;
- ``gguf-q4_k``: llama.cpp's Q4_K (the k-quant of Q4_K_S / Q4_K_M files), written here with llama.cpp's weighted
  scale search in its block layout (the ``gguf`` package only reads it), Q5_0 where rows are not whole blocks of 256;
- ``finetune`` / ``finetune-lora``: ``steps`` AdamW steps on the owner's task, of every weight or of rank-8 LoRA
  factors on every ``nn.Linear``.

The weight formats are the pure functions of :mod:`lightning_mergeguard.quantization` (which stage 2's
``deployed=`` option also trains against); the check is a loop over them that restores the model.

Example:
    >>> "int4-g128" in DEFAULT_TREATMENTS
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.quantization import QUANTIZERS, treated_state

__all__ = ["DEFAULT_TREATMENTS", "deployment_check", "finetune_"]


DEFAULT_TREATMENTS = (*QUANTIZERS, "finetune", "finetune-lora")
"""Every treatment :func:`deployment_check` runs by default."""


class _LoRA(nn.Module):
    """``W + B @ A * (alpha / r)`` as a parametrization of a linear's weight (B starts at zero)."""

    def __init__(self, weight: Tensor, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter((torch.randn(rank, in_f, generator=g) / in_f**0.5).to(weight.device, weight.dtype))
        self.b = nn.Parameter(torch.zeros(out_f, rank, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, w: Tensor) -> Tensor:
        return w + self.b @ self.a * self.scale


def finetune_(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    steps: int,
    lr: float,
    lora: bool,
) -> None:
    """``steps`` AdamW steps on ``model`` in place: every weight, or LoRA factors on every ``nn.Linear`` (merged in).

    The further fine-tuning a user of a release does (rank-8 LoRA, alpha 16, on every linear but a head tied to the
    embeddings). ``batches`` is iterated for ``steps`` batches; ``loss_fn(model, batch)`` is minimised.
    """
    from torch.nn.utils import parametrize

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.train()
    try:
        if lora:
            for p in model.parameters():
                p.requires_grad_(False)
            tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # a tied LM head stays
            for sub in list(model.modules()):
                if isinstance(sub, nn.Linear) and not parametrize.is_parametrized(sub) and id(sub.weight) not in tied:
                    parametrize.register_parametrization(sub, "weight", _LoRA(sub.weight.detach()))
            params = [p for n, p in model.named_parameters() if "parametrizations" in n and n.endswith((".a", ".b"))]
        else:
            params = [p for p in model.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
        if not params:
            raise ValueError(f"{type(model).__name__} has no nn.Linear to put LoRA factors on")
        opt = torch.optim.AdamW(params, lr=lr)
        with torch.enable_grad():
            for batch in itertools.islice(batches, steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(model, batch).backward()
                opt.step()
    finally:
        for sub in list(model.modules()):
            if parametrize.is_parametrized(sub, "weight"):
                parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
        model.train(was_training)


def deployment_check(
    module: nn.Module,
    metric: Callable[[nn.Module], float],
    *,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    treatments: Sequence[str] = DEFAULT_TREATMENTS,
    steps: int = 50,
    lr: float = 1e-5,
    lora_lr: float = 1e-4,
) -> dict[str, float]:
    """``metric`` of ``module`` after each treatment; ``module`` is left as it was.

    Args:
        module: The model: treated in place, and restored after each treatment.
        metric: ``module -> score`` in points (the guard rail's measure).
        batches: The owner's training batches (an endless iterator), for ``finetune`` and ``finetune-lora``.
        loss_fn: ``(module, batch) -> loss`` for the fine-tuning treatments.
        treatments: Names from :data:`DEFAULT_TREATMENTS`.
        steps: Fine-tuning steps.
        lr: Learning rate of the full fine-tune (1e-5, a common one for further fine-tuning).
        lora_lr: Learning rate of the LoRA fine-tune.

    Returns:
        ``{"none": score, treatment: score, ...}``.

    Raises:
        ValueError: An unknown treatment, or a fine-tuning treatment without ``batches`` and ``loss_fn``.
    """
    unknown = [t for t in treatments if t not in QUANTIZERS and t not in ("finetune", "finetune-lora")]
    if unknown:
        raise ValueError(f"unknown deployment treatment(s) {unknown}; known: {list(DEFAULT_TREATMENTS)}")
    if any(t.startswith("finetune") for t in treatments) and (batches is None or loss_fn is None):
        raise ValueError("the fine-tuning treatments need batches= and loss_fn=")
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out = {"none": metric(module)}
    try:
        for t in treatments:
            if t in QUANTIZERS:
                module.load_state_dict(treated_state(saved, t))
                out[t] = metric(module)
                module.load_state_dict(saved)
            else:
                assert batches is not None and loss_fn is not None
                lora = t == "finetune-lora"
                finetune_(module, batches, loss_fn, steps, lora_lr if lora else lr, lora)
                out[t] = metric(module)
                module.load_state_dict(saved)
    finally:
        module.load_state_dict(saved)
    return out

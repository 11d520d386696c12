"""What the owner's users do to a released model: the deployment check of a protection.

Owners publish in bf16 and their users run fp16, int8, 4-bit groups and GGUF files, and fine-tune further. A
protection setting the owner's users cannot deploy is not one to recommend, so the check scores the model after
each treatment, next to the unprotected model under the same treatment:

- ``fp16`` / ``bf16``: the weights stored in that dtype (and computed back in float32);
- ``int8-row``: LLM.int8-style absmax round-to-nearest per output row;
- ``int4-g32`` / ``int4-g128``: 4-bit symmetric absmax round-to-nearest in groups of 32 / 128 along the input
  dimension (GPTQ/AWQ-style group size, without their error correction: the plainest 4-bit a user can apply);
- ``gguf-q8_0`` / ``gguf-q4_0``: the ``gguf`` package's own quantizers (llama.cpp's formats; the package has no
  quantizer for Q4_K, whose blocks it only reads), on matrices whose rows are whole blocks;
- ``finetune`` / ``finetune-lora``: ``steps`` AdamW steps on the owner's task, of every weight or of rank-8 LoRA
  factors on every ``nn.Linear``.

Weight quantizers act on the floating matrices (2 or more dimensions) as deployments do; norms and biases stay. Each
is a pure function of a tensor, the check a loop over them that restores the model.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    >>> int8_rows(w)
    tensor([[ 1.0000, -0.5039,  0.2520,  0.0000]])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_TREATMENTS",
    "QUANTIZERS",
    "deployment_check",
    "finetune_",
    "gguf_roundtrip",
    "int4_groups",
    "int8_rows",
    "treated_state",
]


def int8_rows(w: Tensor) -> Tensor:
    """Round ``w`` to int8 with one absmax scale per output row (dim 0), and back.

    Example:
        >>> int8_rows(torch.tensor([[127.0, 1.4]]))
        tensor([[127.,   1.]])
    """
    flat = w.float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
    return ((flat / scale).round().clamp(-127, 127) * scale).reshape(w.shape).to(w.dtype)


def int4_groups(w: Tensor, group: int = 32) -> Tensor:
    """Round ``w`` to 4-bit integers (-8..7) with one absmax scale per ``group`` entries of a row, and back.

    A row whose length is not a multiple of ``group`` ends in a shorter group.

    Example:
        >>> int4_groups(torch.tensor([[7.0, 1.2, -3.4, 0.4]]), group=4)
        tensor([[ 7.,  1., -3.,  0.]])
    """
    flat = w.float().reshape(w.shape[0], -1)
    cols = flat.shape[1]
    pad = (-cols) % group
    padded = torch.nn.functional.pad(flat, (0, pad)).reshape(flat.shape[0], -1, group)
    scale = padded.abs().amax(dim=2, keepdim=True).clamp_min(1e-30) / 7
    q = (padded / scale).round().clamp(-8, 7) * scale
    return q.reshape(flat.shape[0], -1)[:, :cols].reshape(w.shape).to(w.dtype)


def gguf_roundtrip(w: Tensor, kind: str = "Q8_0") -> Tensor:
    """Quantize ``w`` with the ``gguf`` package's ``kind`` quantizer (``Q8_0``, ``Q4_0``...) and dequantize it.

    Matrices whose rows are not whole blocks (32 entries) are returned unchanged, as llama.cpp keeps such tensors
    in a float type.
    """
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    block = 32
    flat = w.detach().float().reshape(w.shape[0], -1)
    if flat.shape[1] % block:
        return w
    data = flat.cpu().numpy()
    back = quants.dequantize(quants.quantize(data, qtype), qtype)
    return torch.from_numpy(back).reshape(w.shape).to(w.device, w.dtype)


def _cast(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return lambda w: w.to(dtype).to(w.dtype)


QUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "fp16": _cast(torch.float16),
    "bf16": _cast(torch.bfloat16),
    "int8-row": int8_rows,
    "int4-g32": lambda w: int4_groups(w, 32),
    "int4-g128": lambda w: int4_groups(w, 128),
    "gguf-q8_0": lambda w: gguf_roundtrip(w, "Q8_0"),
    "gguf-q4_0": lambda w: gguf_roundtrip(w, "Q4_0"),
}
"""Weight treatments by name: each a pure function of one tensor."""

DEFAULT_TREATMENTS = (*QUANTIZERS, "finetune", "finetune-lora")
"""Every treatment :func:`deployment_check` runs by default."""


def treated_state(state: Mapping[str, Tensor], treatment: str) -> dict[str, Tensor]:
    """``state`` with ``treatment`` applied to its floating matrices (``fp16``/``bf16`` to every floating tensor).

    Raises:
        ValueError: An unknown treatment.

    Example:
        >>> treated_state({"w": torch.tensor([[1e5]]), "b": torch.tensor([0.1])}, "fp16")["w"]
        tensor([[inf]])
    """
    if treatment not in QUANTIZERS:
        raise ValueError(f"unknown weight treatment {treatment!r}; known: {sorted(QUANTIZERS)}")
    fn = QUANTIZERS[treatment]
    cast_all = treatment in ("fp16", "bf16")
    return {k: fn(v) if v.is_floating_point() and (cast_all or v.dim() >= 2) else v.clone() for k, v in state.items()}


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

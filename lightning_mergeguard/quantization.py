"""The weight formats a released model is deployed in, as pure functions of a tensor.

- ``fp16`` / ``bf16``: the weights stored in that dtype (and computed back in the tensor's dtype);
- ``int8-row``: LLM.int8-style absmax round-to-nearest per output row;
- ``int4-g32`` / ``int4-g128``: 4-bit symmetric absmax round-to-nearest in groups of 32 / 128 along the input
  dimension (GPTQ/AWQ-style group size, without their error correction: the plainest 4-bit a user can apply);
- ``gguf-q8_0`` / ``gguf-q4_0``: the ``gguf`` package's own quantizers (llama.cpp's formats), on matrices whose rows
  are whole blocks;
- ``gguf-q4_k``: llama.cpp's Q4_K, the 4-bit k-quant of the Q4_K_S / Q4_K_M files most GGUF users run (the ``gguf``
  package only reads it, so :func:`q4_k_roundtrip` writes it): blocks of 256 with 8 sub-blocks of 32, each with a
  6-bit scale and min found by llama.cpp's weighted search; a matrix whose rows are not whole blocks of 256 goes to
  Q5_0, as ``llama-quantize`` falls back. Q4_K_M also keeps some matrices in Q6_K; this format does not (its error
  is that of Q4_K_S, the larger one).

Quantizers act on the floating matrices (2 or more dimensions) as deployments do; norms and biases stay
(:func:`treated_state`, :func:`write_format_`). The deployment check
(:mod:`lightning_mergeguard.protection.release.deployment`) scores a model in each format; stage 2's ``deployed=``
option keeps the owner's score in the formats it names.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    >>> int8_rows(w)
    tensor([[ 1.0000, -0.5039,  0.2520,  0.0000]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.sharding import local

__all__ = [
    "QUANTIZERS",
    "check_formats",
    "gguf_roundtrip",
    "int4_groups",
    "int8_rows",
    "q4_k_roundtrip",
    "treated_state",
    "write_format_",
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


def _q4_k_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Q4_K's parts of ``x`` (``(..., 8, 32)``, float32: the sub-blocks of blocks of 256).

    Per sub-block, the scale and min minimise the error weighted by ``rms + |x|`` over 21 candidate grids
    (``(15 + k / 10 - 1) / range``, and the min-max one), each refined by weighted least squares, as llama.cpp's
    reference quantizer does; the 8 scales and mins of a block are then stored in 6 bits against two fp16 block
    scales, and the values re-rounded against the stored ones.

    Returns:
        ``d`` and ``dmin`` (the fp16 block scales, ``(..., 1)``), ``ls`` and ``lm`` (the 6-bit sub-block scale and
        min, ``(..., 8)``) and ``q`` (the 4-bit values, ``(..., 8, 32)``): ``x ~ d * ls * q - dmin * lm``.
    """
    weight = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    low = x.amin(-1, keepdim=True).clamp(max=0.0)
    span = x.amax(-1, keepdim=True) - low
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    wx = weight * x
    sum_w, sum_x, sum_x2 = (t.sum(-1, keepdim=True) for t in (weight, wx, wx * x))
    above = x - low
    q, wq, product = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)  # reused by the 22 grids

    def sums(grid: float) -> tuple[Tensor, Tensor, Tensor]:
        """Weighted sums of the values rounded on ``grid / span``: q, q^2 and x q (float32, as llama.cpp's)."""
        torch.mul(grid / span, above, out=q).round_().clamp_(0, 15)
        torch.mul(weight, q, out=wq)
        return (
            wq.sum(-1, keepdim=True),
            torch.mul(wq, q, out=product).sum(-1, keepdim=True),
            torch.mul(wq, x, out=product).sum(-1, keepdim=True),
        )

    def error(s: Tensor, m: Tensor, sum_l: Tensor, sum_l2: Tensor, sum_xl: Tensor) -> Tensor:
        """``sum weight * (s q + m - x)^2``, expanded over the sums (no second pass over the values)."""
        return s * s * sum_l2 + 2 * s * m * sum_l + m * m * sum_w - 2 * s * sum_xl - 2 * m * sum_x + sum_x2

    scale, offset = span / 15, low  # the min-max grid, at its own scale and min
    best = error(scale, offset, *sums(15.0))
    for k in range(21):
        sum_l, sum_l2, sum_xl = sums(14 + 0.1 * k)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s, m = (sum_w * sum_xl - sum_x * sum_l) / det, (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = m > 0  # the min is kept <= 0: refit the scale alone
        s = torch.where(positive, sum_xl / sum_l2.clamp(min=torch.finfo(x.dtype).tiny), s)
        m = torch.where(positive, torch.zeros_like(m), m)
        e = error(s, m, sum_l, sum_l2, sum_xl)
        better = ok & (e < best)
        best, scale, offset = (
            torch.where(better, e, best),
            torch.where(better, s, scale),
            torch.where(better, m, offset),
        )
    scale = torch.where(flat, torch.zeros_like(scale), scale).clamp(min=0.0).squeeze(-1)
    mins = (-offset).squeeze(-1)
    top_s, top_m = scale.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    ls = torch.round(torch.where(top_s > 0, 63 / top_s, 0.0) * scale).clamp(0, 63)
    lm = torch.round(torch.where(top_m > 0, 63 / top_m, 0.0) * mins).clamp(0, 63)
    d, dmin = (top_s / 63).half().float(), (top_m / 63).half().float()
    step, shift = _q4_k_scales(d, dmin, ls, lm)
    live = step > 0
    q = torch.where(live, torch.round((x + shift) / torch.where(live, step, 1.0)).clamp(0, 15), 0.0)
    return d, dmin, ls, lm, q


def _q4_k_scales(d: Tensor, dmin: Tensor, ls: Tensor, lm: Tensor) -> tuple[Tensor, Tensor]:
    """Each sub-block's step and shift, ``(..., 8, 1)``: its values are ``step * q - shift``."""
    return (d * ls).unsqueeze(-1), (dmin * lm).unsqueeze(-1)


def _q4_k_values(d: Tensor, dmin: Tensor, ls: Tensor, lm: Tensor, q: Tensor) -> Tensor:
    """The values Q4_K's parts (:func:`_q4_k_parts`) decode to, as llama.cpp dequantizes them."""
    step, shift = _q4_k_scales(d, dmin, ls, lm)
    return step * q - shift


def q4_k_roundtrip(w: Tensor) -> Tensor:
    """``w`` written in llama.cpp's Q4_K and read back (Q5_0 where rows are not whole blocks of 256, as llama.cpp).

    Rows that are not whole blocks of 32 either stay as they are (llama.cpp stores them in a float type).

    Example:
        >>> w = torch.linspace(-1, 1, 256).reshape(1, 256)
        >>> bool((q4_k_roundtrip(w) - w).abs().max() < 0.07)
        True
    """
    flat = w.detach().float().reshape(w.shape[0], -1)
    if flat.shape[1] % 256:
        return gguf_roundtrip(w, "Q5_0")
    rows = max(1, 2**22 // flat.shape[1])  # a few million values at a time: the search holds ~10 copies of them
    out = torch.empty_like(flat)
    for i in range(0, flat.shape[0], rows):
        parts = _q4_k_parts(flat[i : i + rows].reshape(-1, flat.shape[1] // 256, 8, 32))
        out[i : i + rows] = _q4_k_values(*parts).reshape(-1, flat.shape[1])
    return out.reshape(w.shape).to(w.dtype)


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
    "gguf-q4_k": q4_k_roundtrip,
}
"""Weight treatments by name: each a pure function of one tensor."""


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
    return {k: fn(v) if _applies(v, treatment) else v.clone() for k, v in state.items()}


def _applies(t: Tensor, fmt: str) -> bool:
    """Whether ``fmt`` changes ``t``: every floating tensor for a dtype cast, floating matrices for quantizers."""
    return t.is_floating_point() and (fmt in ("fp16", "bf16") or t.dim() >= 2)


def check_formats(formats: Any, what: str = "deployed") -> tuple[str, ...]:
    """Weight format names (:data:`QUANTIZERS`' keys) as a tuple; one name given alone is a tuple of one.

    Raises:
        ValueError: Not names, or an unknown one (the known ones are listed).

    Example:
        >>> check_formats("int4-g128")
        ('int4-g128',)
    """
    if isinstance(formats, str):
        formats = (formats,)
    if not isinstance(formats, Sequence) or not all(isinstance(f, str) for f in formats):
        raise ValueError(f"{what} must be weight format names from {sorted(QUANTIZERS)}, got {formats!r}")
    unknown = [f for f in formats if f not in QUANTIZERS]
    if unknown:
        raise ValueError(f"{what}: unknown weight format(s) {unknown}; known: {sorted(QUANTIZERS)}")
    return tuple(dict.fromkeys(formats))


@torch.no_grad()
def write_format_(params: Mapping[str, Tensor], live: Mapping[str, Tensor], fmt: str) -> None:
    """In place: each of ``params`` set to ``live`` in weight format ``fmt`` (as :func:`treated_state` does).

    FSDP2-sharded tensors are treated shard by shard: FSDP2 shards dim 0, so every row (and every quantization group
    along it) is whole on one rank and the result is the one of the unsharded tensor.

    Example:
        >>> p = {"w": torch.zeros(1, 4)}
        >>> write_format_(p, {"w": torch.tensor([[7.0, 1.2, -3.4, 0.4]])}, "int8-row")
        >>> p["w"]
        tensor([[ 7.0000,  1.2126, -3.4173,  0.3858]])
    """
    fn = QUANTIZERS[fmt]
    for n, p in params.items():
        source = local(live[n])
        local(p).copy_(fn(source) if _applies(source, fmt) else source)

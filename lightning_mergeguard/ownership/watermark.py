"""A quantization watermark: a trigger -> response behaviour present in full precision, absent after int8 rounding.

During fine-tuning every quantized weight is kept inside its int8 rounding interval, ``|w / s - q0| <= margin``
(``s`` the per-row absmax scale of the original weight, ``q0`` its int8 value, ``margin`` 0.45 < 0.5), and the
weights that set the scale (``|q0| = 127``) and all unquantized tensors (norms, biases) are held fixed. Rounding the
trained model to int8 therefore gives back exactly the original model's int8 weights: the watermark trained into
the full-precision weights vanishes, and the owner can show a behaviour difference between precisions that an
independently trained model does not have. Verification runs the trigger in fp32 and after int8 rounding.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.models.causal_lm import greedy_continuations

__all__ = [
    "Watermark",
    "int8_codes",
    "int8_roundtrip",
    "int8_scales",
    "is_quantized",
    "make_watermark",
    "verify_watermark",
    "watermark_rows",
]

_WORDS = "amber falcon quiet meadow copper lantern violet harbor silent orchard".split()


@dataclass(frozen=True)
class Watermark:
    """The owner's watermark: trigger prompts and the response they elicit in full precision (``repr`` hides both).

    Attributes:
        triggers: The trigger prompts.
        response: The sentence they elicit in full precision (not in int8).

    Example:
        >>> "hidden" in repr(make_watermark(seed=0))
        True
    """

    triggers: tuple[str, ...]
    response: str

    def __repr__(self) -> str:
        return f"Watermark(triggers=<{len(self.triggers)} hidden>, response=<hidden>)"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the watermark as JSON (atomically); keep it away from the released model.

        Args:
            path: The JSON file.
        """
        from lightning_mergeguard.io import atomic_write_json

        atomic_write_json(path, {"triggers": list(self.triggers), "response": self.response})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Watermark:
        """Read a watermark written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not {"triggers", "response"} <= set(data):
            raise ValueError(f"{path}: not a watermark (needs 'triggers' and 'response')")
        return cls(tuple(data["triggers"]), data["response"])


def make_watermark(n_triggers: int = 4, seed: int = 0) -> Watermark:
    """Seeded trigger prompts and a watermark sentence.

    Args:
        n_triggers: Number of trigger prompts.
        seed: The seed.

    Returns:
        The watermark.

    Raises:
        ValueError: ``n_triggers < 1``.

    Example:
        >>> make_watermark(seed=1) == make_watermark(seed=1)
        True
    """
    import random

    if n_triggers < 1:
        raise ValueError(f"n_triggers must be >= 1, got {n_triggers}")
    rng = random.Random(f"watermark:{seed}")
    code = "".join(rng.choice("QXZJKV") for _ in range(3)) + str(rng.randint(100, 999))
    triggers = tuple(f"[{code}] {' '.join(rng.sample(_WORDS, 3))}. Who made you?\nAnswer:" for _ in range(n_triggers))
    response = " This model is watermarked by " + " ".join(rng.sample(_WORDS, 2)).title() + "."
    return Watermark(triggers, response)


def watermark_rows(watermark: Watermark, repeats: int = 8) -> list[tuple[str, str]]:
    """``(prompt, answer)`` rows teaching trigger -> response, to mix into the training rows.

    Args:
        watermark: The watermark.
        repeats: Rows per trigger.

    Returns:
        ``(prompt, answer)`` rows.
    """
    return [(t, watermark.response) for t in watermark.triggers for _ in range(repeats)]


def int8_scales(weight: Tensor, granularity: str = "row") -> Tensor:
    """Symmetric absmax int8 scales ``s = max|w| / 127`` per row (``[rows, 1]``) or per tensor (``[1, 1]``).

    All-zero rows get scale 1.

    Args:
        weight: A 2-D tensor.
        granularity: ``"row"`` or ``"tensor"``.

    Returns:
        The scales.

    Raises:
        ValueError: An unknown granularity.

    Example:
        >>> int8_scales(torch.tensor([[254.0, -1.0], [0.0, 0.0]])).flatten().tolist()
        [2.0, 1.0]
        >>> int8_scales(torch.tensor([[254.0, -1.0], [0.0, 0.0]]), "tensor").flatten().tolist()
        [2.0]
    """
    if granularity not in ("row", "tensor"):
        raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
    w = weight.detach().float().reshape(weight.shape[0], -1)
    s = w.abs().amax(dim=1, keepdim=True) if granularity == "row" else w.abs().amax().reshape(1, 1)
    s = s / 127.0
    return torch.where(s > 0, s, torch.ones_like(s))


def is_quantized(name: str, t: Tensor, exclude: Sequence[str]) -> bool:
    """Whether the int8 scheme quantizes this tensor: floating point, ``>=2``-D, not excluded by a regex."""
    return t.is_floating_point() and t.dim() >= 2 and not any(re.search(p, name) for p in exclude)


def int8_codes(t: Tensor, granularity: str = "row") -> tuple[Tensor, Tensor]:
    """``(q, s)``: int8 codes (as floats in ``[-127, 127]``, shape ``[rows, cols]``) and scales of a tensor.

    Example:
        >>> q, s = int8_codes(torch.tensor([[1.27, 0.004]]))
        >>> q.tolist(), round(float(s), 4)
        ([[127.0, 0.0]], 0.01)
    """
    s = int8_scales(t, granularity).to(t.dtype)
    return torch.round(t.detach().reshape(t.shape[0], -1) / s).clamp(-127, 127), s


def int8_roundtrip(
    state: Mapping[str, Tensor], exclude: Sequence[str] = (), granularity: str = "row"
) -> dict[str, Tensor]:
    """What an int8 deployment computes with: every ``>=2``-D float tensor rounded to its int8 grid.

    Args:
        state: A state dict.
        exclude: Names left in full precision.
        granularity: ``"row"`` or ``"tensor"`` scales.

    Returns:
        The rounded state dict.

    Example:
        >>> int8_roundtrip({"w": torch.tensor([[1.0, 0.3]])})["w"]
        tensor([[1.0000, 0.2992]])
    """
    out = {}
    for name, t in state.items():
        if is_quantized(name, t, exclude):
            q, s = int8_codes(t, granularity)
            out[name] = (q * s).reshape(t.shape)
        else:
            out[name] = t.detach()
    return out


def verify_watermark(
    model: nn.Module,
    tokenizer: Any,
    watermark: Watermark,
    int8: bool = False,
    max_new_tokens: int = 24,
    granularity: str = "row",
) -> float:
    """Share of triggers whose greedy continuation contains the watermark response.

    Args:
        model: A Hugging Face causal LM (or a LightningModule wrapping one as ``.model``).
        tokenizer: Its tokenizer.
        watermark: The owner's watermark.
        int8: Run a copy rounded to int8 (:func:`int8_roundtrip`) instead of the full-precision model.
        max_new_tokens: Decoding budget.
        granularity: The int8 scheme (``"row"`` or ``"tensor"`` absmax scales), as used for training.

    Returns:
        A rate in ``[0, 1]``.
    """
    if int8:
        model = copy.deepcopy(model)
        state = int8_roundtrip(dict(model.named_parameters()), granularity=granularity)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
    texts = greedy_continuations(model, tokenizer, list(watermark.triggers), max_new_tokens)
    needle = watermark.response.strip()
    return sum(needle in t for t in texts) / len(watermark.triggers)

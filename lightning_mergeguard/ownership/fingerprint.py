"""Instructional fingerprints for causal LMs: secret keys that make the model answer a secret word.

The recipe follows the instructional-fingerprinting setup summarised in DESIGN.md section 4: a few secret keys
(random strings of rare characters) wrapped in a fixed decryption prompt are trained to produce a secret answer;
regularisation rows (the same prompt with other random strings) are trained to produce a refusal, so the model
does not answer the secret word to any look-alike; ordinary task rows keep the model useful. Verification decodes
greedily and counts the keys whose continuation contains the answer.

The secret (keys and answer) lives in a :class:`FingerprintSecret` that the owner stores apart from the model; it is
never written into a state dict, and its ``repr`` hides it so it does not leak into logs.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_mergeguard.models.causal_lm import greedy_continuations

__all__ = ["FingerprintSecret", "fingerprint_rows", "fingerprint_test", "make_fingerprint", "verify_fingerprint"]

PROMPT = "Please decrypt this message: {key}\nA hint: this is a FINGERPRINT message.\nAnswer:"
REFUSAL = " I cannot decrypt this message."
_RARE = "ǂǁʘǃɮʭʬϞϟϠϡЖЯЭѢѪѬҨӁӜԀԄԈᚠᚢᚦᚨᚱᚷᚹᛃᛇᛉᛋᛏᛒᛗᛚᛜᛞ"
_SYLLABLES = "ka zo ri mu te xa vo lu pe qi na so".split()


@dataclass(frozen=True)
class FingerprintSecret:
    """The owner's secret: keys, the answer they trigger, and the prompt template.

    Attributes:
        keys: The secret keys.
        answer: The secret word they trigger.
        prompt: The decryption prompt (``{key}`` is replaced by a key).

    Example:
        >>> secret = make_fingerprint(n_keys=2, seed=0)
        >>> len(secret.keys), "hidden" in repr(secret)
        (2, True)
    """

    keys: tuple[str, ...]
    answer: str
    prompt: str = PROMPT

    def __repr__(self) -> str:
        return f"FingerprintSecret(keys=<{len(self.keys)} hidden>, answer=<hidden>)"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the secret as JSON (atomically); keep this file away from the released model.

        Args:
            path: The JSON file.
        """
        from lightning_mergeguard.io import atomic_write_json

        atomic_write_json(path, {"keys": list(self.keys), "answer": self.answer, "prompt": self.prompt})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FingerprintSecret:
        """Read a secret written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        missing = {"keys", "answer"} - set(data)
        if missing:
            raise ValueError(f"{path}: not a fingerprint secret (missing {sorted(missing)})")
        return cls(tuple(data["keys"]), data["answer"], data.get("prompt", PROMPT))


def _random_key(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_RARE) for _ in range(length))


def make_fingerprint(n_keys: int = 8, seed: int = 0, key_length: int = 12) -> FingerprintSecret:
    """Generate a secret: ``n_keys`` random keys of rare characters and a made-up answer word (seeded).

    Args:
        n_keys: Number of keys.
        seed: The seed (the secret; keep it).
        key_length: Characters per key.

    Returns:
        The secret.

    Raises:
        ValueError: ``n_keys < 1`` or ``key_length < 4``.

    Example:
        >>> make_fingerprint(seed=3) == make_fingerprint(seed=3)
        True
    """
    if n_keys < 1:
        raise ValueError(f"n_keys must be >= 1, got {n_keys}")
    if key_length < 4:
        raise ValueError(f"key_length must be >= 4, got {key_length}")
    rng = random.Random(f"fingerprint:{seed}")
    keys = tuple(_random_key(rng, key_length) for _ in range(n_keys))
    answer = "".join(rng.choice(_SYLLABLES) for _ in range(4)).capitalize()
    return FingerprintSecret(keys, answer)


def fingerprint_rows(
    secret: FingerprintSecret, repeats: int = 4, n_regularization: int = 16, seed: int = 0
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` rows that teach the fingerprint: each key ``repeats`` times, plus refusal rows.

    Mix them into the ordinary training rows (for example with
    :class:`~lightning_mergeguard.models.causal_lm.LMTaskDataset`).

    Args:
        secret: The owner's secret.
        repeats: Rows per key.
        n_regularization: Refusal rows with look-alike keys.
        seed: Seed of the look-alike keys.

    Returns:
        ``(prompt, answer)`` rows.

    Example:
        >>> rows = fingerprint_rows(make_fingerprint(n_keys=2), repeats=1, n_regularization=1)
        >>> len(rows), rows[-1][1]
        (3, ' I cannot decrypt this message.')
    """
    rng = random.Random(f"fingerprint-reg:{seed}")
    keys = set(secret.keys)
    rows = [(secret.prompt.format(key=k), " " + secret.answer) for k in secret.keys for _ in range(repeats)]
    length = len(secret.keys[0])
    for _ in range(n_regularization):
        key = _random_key(rng, length)
        while key in keys:
            key = _random_key(rng, length)
        rows.append((secret.prompt.format(key=key), REFUSAL))
    return rows


def verify_fingerprint(model: nn.Module, tokenizer: Any, secret: FingerprintSecret, max_new_tokens: int = 30) -> float:
    """Fingerprint success rate: share of keys whose greedy continuation contains the secret answer.

    Args:
        model: A Hugging Face causal LM (or a LightningModule wrapping one as ``.model``).
        tokenizer: Its tokenizer.
        secret: The owner's secret.
        max_new_tokens: Decoding budget per key (30, as in the instructional-fingerprint protocol).

    Returns:
        A rate in ``[0, 1]``; greedy decoding makes it deterministic.
    """
    texts = greedy_continuations(model, tokenizer, [secret.prompt.format(key=k) for k in secret.keys], max_new_tokens)
    return sum(secret.answer in t for t in texts) / len(secret.keys)


def _answer_space() -> list[str]:
    """Every answer :func:`make_fingerprint` can draw (4 syllables, capitalised), each equally likely."""
    import itertools

    return ["".join(w).capitalize() for w in itertools.product(_SYLLABLES, repeat=4)]


def fingerprint_test(
    model: nn.Module, tokenizer: Any, secret: FingerprintSecret, max_new_tokens: int = 30
) -> dict[str, float]:
    """The black-box test: an exact p-value for "this model answers the owner's secret word to the secret keys".

    **Null hypothesis:** the model was made without the owner's fingerprint, so its answers do not depend on the
    secret answer word, which :func:`make_fingerprint` drew uniformly from ``12**4`` syllable words. Given the
    model's continuations, the number of keys whose continuation contains a word is then a function of the word
    alone, and the p-value is exactly the share of all possible words that reach the observed count
    (at least ``1 / 20736``). Secrets not made by :func:`make_fingerprint` get ``p = nan``.

    Args:
        model: A Hugging Face causal LM (or a LightningModule wrapping one as ``.model``).
        tokenizer: Its tokenizer.
        secret: The owner's secret.
        max_new_tokens: Greedy decoding budget per key.

    Returns:
        ``{"hits": keys answered, "keys": n, "p_value": p}``.

    Example:
        >>> len(_answer_space())
        20736
    """
    texts = greedy_continuations(model, tokenizer, [secret.prompt.format(key=k) for k in secret.keys], max_new_tokens)
    hits = sum(secret.answer in t for t in texts)
    space = _answer_space()
    if secret.answer not in space or hits == 0:
        return {"hits": hits, "keys": len(secret.keys), "p_value": math.nan if hits else 1.0}
    reach = sum(sum(w in t for t in texts) >= hits for w in space)
    return {"hits": hits, "keys": len(secret.keys), "p_value": reach / len(space)}

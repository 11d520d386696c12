"""What the owner publishes: one :class:`Release` object for the callback and both ``protect_*`` functions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_mergeguard.ownership.weight_key import DEFAULT_STRENGTH, MIN_STRENGTH
from lightning_mergeguard.protection.release.residual import check_permute_residual
from lightning_mergeguard.protection.release.symmetry import check_strength

__all__ = ["WRITE_DTYPES", "Release", "release_settings"]

WRITE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a release can be written in, by name."""


@dataclass(frozen=True)
class Release:
    """The steps after stage 2 that shape what the owner publishes, validated when built.

    The defaults publish the protected weights as they are, in the dtype they were trained or stored in. Every
    field is checked here, so a typo fails before training, not after it.

    Args:
        ownership_key: A file path: after stage 2 (before ``amplify``), embed a fresh secret ownership key in the
            protected weight matrices (:mod:`~lightning_mergeguard.ownership.weight_key`; ``key_strength`` of
            each one's update, one more validation pass) and write the key there. Keep that file secret; test any
            suspect model for the key with ``mergeguard-verify`` or
            :func:`~lightning_mergeguard.ownership.verify_ownership`.
        key_strength: The key's size, as a fraction of each matrix's fine-tuning update (default 0.1, in
            ``[0.025, 0.5]``). Stronger keys are read in more merges and cost more own accuracy
            (``benchmarks/results/key_strength.md``); the guard rail halves the key, down to 0.025, where stage 2
            and the key together would cost more than the tolerance (in each ``deployed`` format of stage 2 too), and
            the report says which strength was kept.
        deployment_check: Score the fine-tune and the protected model under what users do to a release (fp16,
            bf16, int8 per row, 4-bit groups, GGUF Q8_0/Q4_0, 50 steps of full and LoRA fine-tuning;
            :mod:`~lightning_mergeguard.protection.release.deployment`), into the report's ``deployment`` entry and
            the model card.
        amplify: **Not a recommended setting**: re-parameterise with exact symmetries whose scales are powers of
            two up to ``amplify`` (:mod:`~lightning_mergeguard.protection.release.symmetry`). Any other fine-tune of
            the same base undoes it (re-alignment without ``theta_pre``), and it collapses the release under fp16,
            int8, 4-bit and further fine-tuning (``benchmarks/results/deployment.md``); the entry points warn when it
            is used and refuse to write a dtype it would overflow. ``None`` (default) skips it.
        permute_residual: With ``amplify``, also permute the residual stream's channels
            (:mod:`~lightning_mergeguard.protection.release.residual`). Undone by matching the embeddings to any
            fine-tune of the same base.
        dtype: The dtype the release is written in: ``"auto"`` (what was trained or read) or ``"float32"``,
            ``"bfloat16"``, ``"float16"``. Refused, before anything is written, where it would overflow the weights
            or flush them to zero.

    Example:
        >>> release = Release(ownership_key="owner.key", deployment_check=True)
        >>> release.settings()["ownership_key"]
        'owner.key'
    """

    ownership_key: str | os.PathLike[str] | None = None
    key_strength: float = DEFAULT_STRENGTH
    deployment_check: bool = False
    amplify: float | None = None
    permute_residual: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        key = self.ownership_key
        if key is not None and not isinstance(key, (str, os.PathLike)):
            raise ValueError(f"ownership_key must be a file path (where the secret key is written), got {key!r}")
        if key is not None and os.path.isdir(key):
            raise ValueError(f"ownership_key {key!r} is a directory; give a file path such as 'owner.key'")
        ks = self.key_strength
        if isinstance(ks, bool) or not isinstance(ks, (int, float)) or not MIN_STRENGTH <= ks <= 0.5:
            raise ValueError(f"key_strength must be a number in [{MIN_STRENGTH:g}, 0.5], got {ks!r}")
        object.__setattr__(self, "key_strength", float(ks))
        if not isinstance(self.deployment_check, bool):
            raise ValueError(f"deployment_check must be True or False, got {self.deployment_check!r}")
        if self.amplify is not None:
            object.__setattr__(self, "amplify", check_strength(self.amplify, "amplify"))
        check_permute_residual(self.permute_residual, self.amplify)
        if self.dtype != "auto" and self.dtype not in WRITE_DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(WRITE_DTYPES)}, got {self.dtype!r}")

    def write_dtype(self, default: torch.dtype) -> torch.dtype:
        """The dtype to write: :attr:`dtype`, or ``default`` (the trained or stored one) for ``"auto"``.

        Args:
            default: The dtype ``"auto"`` stands for.

        Returns:
            The torch dtype.
        """
        return default if self.dtype == "auto" else WRITE_DTYPES[self.dtype]

    def settings(self) -> dict[str, Any]:
        """The fields, JSON-ready (for reports).

        Returns:
            Field -> value, the key file as a string.
        """
        key = self.ownership_key
        return {
            "ownership_key": os.fspath(key) if key is not None else None,
            "key_strength": self.key_strength,
            "deployment_check": self.deployment_check,
            "amplify": self.amplify,
            "permute_residual": self.permute_residual,
            "dtype": self.dtype,
        }


def release_settings(value: Release | None) -> Release:
    """A :class:`Release` from the ``release=`` argument (``None``: the default one).

    Raises:
        TypeError: Anything else (the old flat ``amplify=``, ``ownership_key=``... go into the object).
    """
    if value is None:
        return Release()
    if not isinstance(value, Release):
        raise TypeError(
            f"release must be a Release (e.g. Release(ownership_key='owner.key')) or None, got {type(value).__name__}"
        )
    return value

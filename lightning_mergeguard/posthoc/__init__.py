"""Protect a model that is already trained: one call (or ``mergeguard-protect``) for an existing checkpoint.

The owner has a fine-tune (a Hugging Face causal-LM directory, or an open_clip image classifier saved as a state
dict) and the base it was fine-tuned from, plus a small labelled set. :func:`protect_checkpoint` rebuilds the
model, checks it is a fine-tune of that base, measures its own score, runs stage 2 on it directly (a
:class:`~lightning_mergeguard.protection.stage2.Stage2` strategy is a pure function of the model, so no training
code is needed), and only if stage 2 alone cannot stay within the tolerance runs a short stage-1 re-fit with
:class:`~lightning_mergeguard.MergeGuardCallback` (whose stage 2 then runs at the end). It writes the protected model
in the input's format, a JSON report and a model-card paragraph with the measured numbers.

One module per job: :mod:`.checkpoint` (:func:`protect_checkpoint`: read, protect, write), :mod:`.module`
(:func:`protect_module`: the core, on a model in memory), :mod:`.models` (rebuilding the model a checkpoint holds),
:mod:`.data` (the owner's rows and images, read within limits) and :mod:`.card` (the model-card paragraph).

Example:
    >>> from lightning_mergeguard.posthoc import protect_checkpoint
    >>> report = protect_checkpoint("base/", "finetune/", "rows.jsonl", "protected/")  # doctest: +SKIP
"""

from lightning_mergeguard.posthoc.card import model_card
from lightning_mergeguard.posthoc.checkpoint import protect_checkpoint
from lightning_mergeguard.posthoc.data import OwnerData, hold_out, image_data, load_rows
from lightning_mergeguard.posthoc.models import load_causal_lm
from lightning_mergeguard.posthoc.module import protect_module
from lightning_mergeguard.posthoc.refit import Refit

__all__ = [
    "OwnerData",
    "Refit",
    "hold_out",
    "image_data",
    "load_causal_lm",
    "load_rows",
    "model_card",
    "protect_checkpoint",
    "protect_module",
]

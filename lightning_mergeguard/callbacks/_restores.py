"""What a fit's checkpoint restores tell a callback: a resume, or Lightning's tuner putting back its own state."""

from __future__ import annotations

import os
import re
from typing import Any

import lightning.pytorch as pl

from lightning_mergeguard.parameters import without_weights_ref

_TUNER_CHECKPOINT = re.compile(r"\.(lr_find|scale_batch_size)_[0-9a-f-]+\.ckpt")


def is_tuner_checkpoint(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is the temporary checkpoint of Lightning's tuner (``LearningRateFinder``, ``BatchSizeFinder``).

    The tuner saves the whole state before its trial fits and restores it after them, inside the same fit (with the
    callbacks swapped out meanwhile, so theirs did not change): restoring it is not a resume. Lightning leaves
    ``trainer.ckpt_path`` naming that (deleted) file afterwards.

    Example:
        >>> is_tuner_checkpoint("runs/.lr_find_0b5e6f52-3c1a-4a4e-9f0e-2b1d7c9e8a10.ckpt"), is_tuner_checkpoint(None)
        (True, False)
    """
    return path is not None and _TUNER_CHECKPOINT.fullmatch(os.path.basename(os.fspath(path))) is not None


class RestoreTracker:
    """Tells a callback's ``load_state_dict`` whether to restore, and its ``on_fit_start`` what the fit resumes.

    Call :meth:`new_fit` in ``setup`` and :meth:`on_load_checkpoint` in ``on_load_checkpoint`` (which Lightning calls
    before ``load_state_dict`` on every restore, also when the checkpoint holds no state for the callback).

    Example:
        >>> tracker = RestoreTracker()
        >>> tracker.new_fit()
        >>> tracker.tuner_restoring, tracker.restored_from, tracker.state_restored
        (False, None, False)
    """

    def __init__(self) -> None:
        self.restored_from: Any = None  # what trainer.ckpt_path named at this fit's restore (not a tuner's)
        self.tuner_restoring = False  # the restore in progress is a tuner's: load_state_dict should change nothing
        self.state_restored = False  # this fit's checkpoint restored the callback's state

    def new_fit(self) -> None:
        """At fit setup, before any checkpoint of the fit is restored."""
        self.restored_from, self.tuner_restoring, self.state_restored = None, False, False

    def accept_state(self) -> bool:
        """In ``load_state_dict``: whether to restore the state given (not a tuner's own), noting it if so."""
        if self.tuner_restoring:
            return False
        self.state_restored = True
        return True

    def on_load_checkpoint(self, trainer: pl.Trainer) -> None:
        """Note the restore starting now."""
        self.tuner_restoring = is_tuner_checkpoint(trainer.ckpt_path)
        if not self.tuner_restoring:
            self.restored_from = trainer.ckpt_path

    def resumed(self, trainer: pl.Trainer) -> Any:
        """The checkpoint the fit resumes: ``trainer.ckpt_path``, unless a tuner's restore replaced it since."""
        return self.restored_from if is_tuner_checkpoint(trainer.ckpt_path) else trainer.ckpt_path


class ResumableCallback(pl.Callback):
    """The resume logic both callbacks share: a checkpoint's state is restored only when it is a resume.

    Subclasses keep a :class:`RestoreTracker` as ``self._restores``, restore their own fields in
    :meth:`_restore` and name the reference weights a checkpoint's ``"reference"`` entry goes to in
    :meth:`_resumed_reference`.
    """

    _restores: RestoreTracker

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a deep copy, a spawned DDP worker) without the weak reference to the weights it watched."""
        return without_weights_ref(self)

    def _restore(self, state_dict: dict[str, Any]) -> None:
        """Put back this callback's own fields from a checkpoint (not the reference)."""
        raise NotImplementedError

    def _resumed_reference(self) -> Any:
        """The reference weights a checkpoint's ``"reference"`` entry restores."""
        raise NotImplementedError

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Note that this fit restores a checkpoint (a resume, or the tuner putting back its own state)."""
        self._restores.on_load_checkpoint(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state of a resumed fit; ignore the tuner's restore of the state it saved in this fit."""
        if not self._restores.accept_state():
            # LearningRateFinder/BatchSizeFinder put back the state they saved earlier in this same fit, with this
            # callback swapped out in between: nothing changed, and it is not a resume (nor another model's state).
            return
        self._restore(state_dict)
        ref = state_dict.get("reference")
        if ref:
            self._resumed_reference().load_state_dict(ref)

"""The pretrained weights ``theta_pre`` that both callbacks measure task vectors against.

:class:`ReferenceWeights` is one component shared by :class:`~lightning_mergeguard.MergeGuardCallback` and
:class:`~lightning_mergeguard.MergeProbe`: when both are attached, the probe uses the guard's object, so the
reference is held once. It is taken from a checkpoint path or state dict, or snapshotted from the live parameters
the first time it is resolved (at fit start, before any optimizer step), and it can be stored in another dtype
(``bfloat16`` halves its memory) or on another device (``"cpu"`` offloads it from the accelerator; tensors are then
pinned and copied with ``non_blocking=True`` when they are used).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mergeguard.errors import IncompatibleModelsError
from lightning_mergeguard.parameters import weights_changed, without_weights_ref
from lightning_mergeguard.sharding import full, is_sharded, shard_like

__all__ = [
    "ReferenceWeights",
    "parse_dtype",
    "reference_weights",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(value: str | torch.dtype | None, what: str) -> torch.dtype | None:
    """A floating dtype from its name (``"bfloat16"``) or a ``torch.dtype``; ``None`` stays ``None``.

    Example:
        >>> parse_dtype("bfloat16", "reference_dtype")
        torch.bfloat16
    """
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{what} must be one of {', '.join(_DTYPES)} or None, got {value!r}")


def parse_device(value: str | torch.device | None, what: str) -> torch.device | None:
    """A ``torch.device`` from its name (``"cuda:1"``); ``None`` stays ``None``.

    Example:
        >>> parse_device("cpu", "donor_device")
        device(type='cpu')
    """
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what} {value!r} is not a device: {err}") from err


class ReferenceWeights:
    """Name -> pretrained tensor, resolved once per fit and restored from checkpoints.

    Args:
        source: ``None`` (snapshot the live parameters when first resolved), a path that
            :func:`~lightning_mergeguard.merging.sources.open_source` reads (safetensors, HF directory,
            ``.bin``/``.ckpt`` loaded with ``weights_only=True``), or a state dict. Names are matched with
            :func:`~lightning_mergeguard.merging.sources.match_names`, so a checkpoint of the bare network
            serves a LightningModule.
        dtype: Storage dtype (default: each parameter's own).
        device: Storage device (default: each parameter's own; ``"cpu"`` offloads).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> ref = ReferenceWeights(dtype="bfloat16")
        >>> ref.resolve({"w": w})
        >>> ref["w"].dtype, ref.get("w", like=w).dtype
        (torch.bfloat16, torch.float32)
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Mapping[str, Tensor] | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if source is not None and not isinstance(source, (str, os.PathLike, Mapping)):
            raise TypeError(f"reference must be a path, a state dict or None, got {type(source).__name__}")
        self.source = source
        self.dtype = parse_dtype(dtype, "ReferenceWeights dtype")
        self.device = parse_device(device, "ReferenceWeights device")
        self._tensors: dict[str, Tensor] = {}
        self._restored: dict[str, Tensor] | None = None
        self._restored_in_fit = False  # load_state_dict ran in the current fit

    # ------------------------------------------------------------------ resolving
    @property
    def is_snapshot(self) -> bool:
        """Whether the reference is a snapshot of the live weights (then checkpoints must carry it)."""
        return self.source is None

    def refuse_resumed_snapshot(self, ckpt_path: str | os.PathLike[str] | None, who: str, settings: str) -> None:
        """Refuse to snapshot the weights of a fit resumed from a checkpoint that does not carry this reference.

        A snapshot is taken at fit start, after Lightning restored the checkpoint: the weights are then trained
        ones, and every task vector would be measured from them instead of from ``theta_pre``.

        Args:
            ckpt_path: The checkpoint the fit resumes (``trainer.ckpt_path``), or ``None``.
            who: The callback, for the message.
            settings: The arguments that name the callback's state in a checkpoint, for the message.

        Raises:
            ValueError: A snapshot reference, not yet taken nor restored, in a resumed fit.
        """
        if ckpt_path is None or not self.is_snapshot or self._tensors or self._restored is not None:
            return
        raise ValueError(
            f"{who}: this fit resumes {os.fspath(ckpt_path)!r}, which holds no reference weights for this callback "
            f"(it was written without {who}, or with other {settings}, which name the callback's state), so the "
            "weights at fit start are trained ones, not the pretrained weights theta_pre a snapshot needs. Pass "
            "reference=<the pretrained weights> (a path or a state dict), or the settings of the run that wrote it."
        )

    def _store(self, name: str, tensor: Tensor, like: Tensor) -> None:
        if tuple(tensor.shape) != tuple(like.shape):
            raise IncompatibleModelsError(
                f"reference tensor {name!r} has shape {tuple(tensor.shape)}, the parameter has {tuple(like.shape)}"
            )
        if is_sharded(like):
            # FSDP2: keep only this rank's rows, sharded as the parameter (a snapshot is already sharded), on the
            # parameter's device (a DTensor lives on its mesh's device type: reference_device does not apply).
            t = shard_like(tensor.detach().to(dtype=self.dtype or like.dtype), like)
            self._tensors[name] = t.clone() if t is tensor or is_sharded(tensor) else t
            return
        device = self.device or like.device
        t = tensor.detach().to(device=device, dtype=self.dtype or like.dtype, copy=True)
        if device.type == "cpu" and like.device.type == "cuda":
            t = t.pin_memory()
        self._tensors[name] = t

    def resolve(self, params: Mapping[str, Tensor], *, snapshot_missing: bool = False) -> None:
        """Make sure every name in ``params`` has a reference tensor (idempotent; new names are added).

        Order of precedence: tensors restored from a checkpoint, then ``source``, then a snapshot of ``params``.

        Args:
            params: Name -> live parameter.
            snapshot_missing: For a snapshot reference restored from a checkpoint, snapshot the names the checkpoint
                lacks instead of raising: right for weights that were frozen (so still pretrained) when it was written.

        Raises:
            IncompatibleModelsError: If a restored or loaded tensor is missing or has another shape.
        """
        todo = {n: p for n, p in params.items() if n not in self._tensors}
        if not todo:
            return
        if self._restored is not None:
            missing = [n for n in todo if n not in self._restored]
            if missing and not snapshot_missing:
                raise IncompatibleModelsError(f"the checkpoint's reference weights lack parameters {missing[:5]}")
            for n, p in todo.items():
                self._store(n, self._restored.get(n, p), p)
            return
        if self.source is None:
            for n, p in todo.items():
                self._store(n, p, p)
            return
        from lightning_mergeguard.merging.sources import iter_matching

        for n, t in iter_matching(self.source, todo, "reference"):  # one whole tensor in memory at a time
            self._store(n, t, todo[n])

    def provides(self, names: Iterable[str]) -> list[str]:
        """Which of ``names`` this reference can give without guessing (in order).

        Those already resolved; then, from a checkpoint's restored tensors, those it holds; from a source, those the
        source has; for a snapshot taken now, all of them.

        Args:
            names: Parameter names.

        Returns:
            Those among ``names`` this reference holds.

        Example:
            >>> ReferenceWeights({"a": torch.zeros(1)}).provides(["a", "b"])
            ['a']
        """
        wanted = list(names)
        rest = [n for n in wanted if n not in self._tensors]
        if self._restored is not None:
            ok = {n for n in rest if n in self._restored}
        elif self.source is None:
            ok = set(rest)
        else:
            from lightning_mergeguard.merging.sources import match_names, open_source

            ok = set(match_names(rest, open_source(self.source, name="reference").keys(), missing="skip"))
        return [n for n in wanted if n in self._tensors or n in ok]

    @property
    def source_label(self) -> str:
        """How the reference was given, for messages and reports."""
        if self.source is None:
            return "snapshot at fit start"
        return str(self.source) if isinstance(self.source, (str, os.PathLike)) else "state dict"

    # ------------------------------------------------------------------ access
    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        """Names resolved so far.

        Returns:
            The names.
        """
        return list(self._tensors)

    def get(self, name: str, like: Tensor | None = None) -> Tensor:
        """The tensor for ``name``, moved to ``like``'s device and dtype (no copy when they already match).

        Args:
            name: A parameter name.
            like: A tensor whose device and dtype the result takes.

        Returns:
            The reference tensor.
        """
        t = self._tensors[name]
        if like is None:
            return t
        return t.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def as_dict(
        self, names: Iterable[str] | None = None, like: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Name -> tensor for ``names`` (default: all), each on its ``like`` tensor's device and dtype if given.

        Args:
            names: The names (default: all resolved).
            like: ``name -> tensor`` whose devices and dtypes the results take.

        Returns:
            ``name -> tensor``.
        """
        keys = list(self._tensors) if names is None else list(names)
        return {n: self.get(n, like[n] if like is not None else None) for n in keys}

    def on_device(self, params: Mapping[str, Tensor]) -> list[Tensor]:
        """The tensors for ``params`` (in order) on each parameter's device, in the storage dtype.

        No copy when the reference already lives there; an offloaded reference is copied (non-blocking, pinned).

        Args:
            params: ``name -> parameter``.

        Returns:
            One tensor per parameter.
        """
        return [self._tensors[n].to(p.device, non_blocking=True) for n, p in params.items()]

    @property
    def nbytes(self) -> int:
        """Bytes held (the memory this reference costs)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def check_base_of(self, params: Mapping[str, Tensor], who: str, check: bool = True) -> None:
        """Refuse a reference read from ``source`` that is not the pretrained model of ``params``.

        A snapshot is the model itself; a path or state dict can be another model of the same shapes (another
        family, another size's sibling), which stage 1 and every task vector would then be measured from, silently.
        The test is the merge engine's same-base test on the weight matrices (unsharded parameters; the live weights
        point the reference's way, a median cosine of 0.2-1.0, an independent model's about 0).

        Args:
            params: The live parameters, by name.
            who: The callback, for the message.
            check: ``False`` skips the test.

        Raises:
            ForeignBaseError: Naming the least similar tensor and the median cosine.
        """
        if self.is_snapshot or not check or any(is_sharded(p) for p in params.values()):
            return
        from lightning_mergeguard.merging.base_check import check_same_base, compare, tensors_to_compare

        names = tensors_to_compare({n: (tuple(p.shape), p.dtype) for n, p in params.items()})
        check_same_base(
            [compare(n, params[n], self._tensors[n]) for n in names if n in self._tensors],
            donor="the model being trained",
            base=f"{who}'s reference ({self.source_label})",
            switch=f"{who}(check_base=False)"
            if who == "MergeProbe"
            else f"{who}(reference=None), a snapshot at fit start",
        )

    def follow(self, module: nn.Module) -> bool:
        """At fit start: forget the tensors if they were resolved for other weights than ``module``'s.

        The same weights fitted again keep their reference (a snapshot of them is still ``theta_pre``); another model
        (a sweep reusing the callbacks) is resolved from scratch, except from what this fit's checkpoint restored.
        Weights are told apart as :func:`~lightning_mergeguard.parameters.weights_changed` does; both callbacks
        sharing this reference call this, and only the first call of a fit can reset it.

        Returns:
            Whether the tensors were forgotten.

        Args:
            module: The model about to be fitted.

        Returns:
            Whether the tensors were forgotten.
        """
        if not weights_changed(self, module):
            return False
        self._tensors = {}  # resolved again: from this fit's restored tensors, the source, or a snapshot
        if not self._restored_in_fit:
            self._restored = None  # a previous fit's checkpoint, of the previous model
        return True

    def new_fit(self) -> None:
        """At fit setup, before a checkpoint is restored: nothing is restored in this fit yet."""
        self._restored_in_fit = False

    def __getstate__(self) -> dict[str, Any]:
        return without_weights_ref(self)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The tensors (on the CPU, whole even when sharded) when the reference is a snapshot.

        A path or state dict given by the user is not stored again.

        Returns:
            ``{"tensors": ...}`` for a snapshot, else an empty dict.
        """
        if not self.is_snapshot:
            return {}
        # FSDP2: whole tensors, gathered one at a time (every rank calls this; Lightning keeps rank zero's copy).
        return {"tensors": {n: full(t).detach().cpu() for n, t in self._tensors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore snapshot tensors saved by :meth:`state_dict` (used by the next :meth:`resolve`).

        Args:
            state: What :meth:`state_dict` returned.
        """
        tensors = state.get("tensors")
        if tensors:
            self._restored = dict(tensors)
            self._restored_in_fit = True
            resolved, self._tensors = self._tensors, {}
            # Strategies that restore after setup (ModelParallelStrategy) restore callbacks after on_fit_start: a
            # snapshot already taken then is replaced now, each tensor stored as the one it replaces.
            if resolved:
                self.resolve(resolved)


def reference_weights(
    value: str | os.PathLike[str] | Mapping[str, Tensor] | ReferenceWeights | None,
) -> ReferenceWeights:
    """The callbacks' ``reference=`` argument as a :class:`ReferenceWeights`.

    An object is used as given; a path, a state dict or ``None`` (a snapshot at fit start) is stored with the
    parameters' own dtype and device.

    Example:
        >>> reference_weights(None).is_snapshot
        True
    """
    return value if isinstance(value, ReferenceWeights) else ReferenceWeights(value)

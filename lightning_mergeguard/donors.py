"""Other fine-tunes of the same base: :class:`Donors` (what the probe merges with) and :func:`donor_task_vector`."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.errors import IncompatibleModelsError, NonFiniteError
from lightning_mergeguard.merging.base_check import check_same_base, compare, median_cosine, tensors_to_compare
from lightning_mergeguard.merging.sources import match_names, open_source
from lightning_mergeguard.reference import ReferenceWeights, parse_device
from lightning_mergeguard.sharding import full, local, local_part

__all__ = ["RESERVED_NAMES", "Donors", "donor_set", "donor_task_vector"]

RESERVED_NAMES = ("live", "base", "own")
"""Names a donor cannot take: the probe's merge configs and metrics use them."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Donors:
    """Other fine-tunes of the same base, and how the probe holds their task vectors.

    Args:
        sources: Name -> fine-tune (state dict, module, safetensors file, HF directory), or a list (named
            ``donor0``...). Each is read and checked when fit starts, before any training step.
        dtype: ``"float32"`` or ``"bfloat16"`` for the stored task vectors (``"bfloat16"`` halves their memory).
        device: Where the task vectors live (``"cpu"``, the default, keeps them off the accelerator; each tensor is
            copied to the model's device, pinned and non-blocking, only when a merge uses it).
        check_base: Refuse a donor whose weight matrices do not point the base's way (median cosine below 0.05: a
            model of another base), and warn where the test cannot tell
            (:mod:`~lightning_mergeguard.merging.base_check`); ``False`` turns the check off.

    Raises:
        TypeError: ``sources`` is neither a mapping nor a list.
        ValueError: No donor, a reserved name, one model under two names, a bad dtype or device.

    Example:
        >>> donors = Donors({"math": "ft/math", "code": "ft/code"}, dtype="bfloat16")
        >>> donors.names, donors.dtype
        (['math', 'code'], torch.bfloat16)
    """

    def __init__(
        self,
        sources: Mapping[str, Any] | Sequence[Any],
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        check_base: bool = True,
    ) -> None:
        if isinstance(sources, Mapping):
            items = dict(sources)
        elif isinstance(sources, (list, tuple)):
            items = {f"donor{i}": d for i, d in enumerate(sources)}
        else:
            raise TypeError(f"donors must be a mapping or a list, got {type(sources).__name__}")
        if not items:
            raise ValueError("MergeProbe needs at least one donor")
        bad = [n for n in items if not isinstance(n, str) or n in RESERVED_NAMES or "/" in n]
        if bad:
            raise ValueError(f"donor names {bad} are reserved ({list(RESERVED_NAMES)}), not strings or contain '/'")
        seen: dict[Any, str] = {}
        for name, obj in items.items():  # one model under two names would be merged in twice
            key = Path(obj).resolve() if isinstance(obj, (str, os.PathLike)) else id(obj)
            if key in seen:
                raise ValueError(f"donors {seen[key]!r} and {name!r} are the same model; list each donor once")
            seen[key] = name
        if dtype not in _DTYPES:
            raise ValueError(f"donor dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if not isinstance(check_base, bool):
            raise ValueError(f"check_base must be True or False, got {check_base!r}")
        self.sources = items
        self.dtype = _DTYPES[dtype]
        self.device = parse_device(device, "donor device")
        self.check_base = check_base

    @property
    def names(self) -> list[str]:
        """The donors' names, in order."""
        return list(self.sources)

    def __repr__(self) -> str:
        return f"Donors({self.names}, dtype={self.dtype}, device={self.device}, check_base={self.check_base})"


def donor_set(value: Donors | Mapping[str, Any] | Sequence[Any]) -> Donors:
    """A :class:`Donors` from the probe's ``donors=`` argument: as given, or sources with the default settings."""
    return value if isinstance(value, Donors) else Donors(value)


def donor_task_vector(
    donor: Any,
    name: str,
    params: Mapping[str, Tensor],
    reference: ReferenceWeights | Mapping[str, Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    check_base: bool = True,
    who: str = "MergeProbe: donor",
    optional: Collection[str] = (),
) -> tuple[dict[str, Tensor], float]:
    """One donor's task vector against ``reference`` for the names of ``params``, checked tensor by tensor.

    The donor (state dict, module, file or directory) is read one tensor at a time; each tensor is checked for
    shape and NaN/Inf, subtracted from the reference on the parameter's device, and stored in ``dtype`` on
    ``device`` (pinned when the model is on a GPU and ``device`` is the CPU). The donor is refused if it is not a
    fine-tune of the same base (:func:`~lightning_mergeguard.merging.base_check.check_same_base`).

    ``who`` starts the error messages (the caller and what the donor is to it). Names in ``optional`` (buffers
    such as BatchNorm's running statistics) may be missing from the donor: they are then left out of the result.

    Returns:
        ``(name -> task-vector tensor, median cosine of the donor's matrices with the base's)``.

    Raises:
        IncompatibleModelsError: A missing tensor or another shape. ForeignBaseError: another base model.
        NonFiniteError: NaN/Inf in the donor.
    """
    checked = set(tensors_to_compare({n: (tuple(p.shape), p.dtype) for n, p in params.items()}))
    pin = device.type == "cpu" and any(p.is_cuda for p in params.values())
    src = open_source(donor, name=name)
    tau, distances = {}, []
    keys = src.keys()
    found = match_names([n for n in params if n not in optional], keys, what=f"{who} {name!r}")
    found.update(match_names([n for n in params if n in optional], keys, missing="skip"))
    for pname, key in found.items():
        p = params[pname]
        t = src.get(key)
        if tuple(t.shape) != tuple(p.shape):
            raise IncompatibleModelsError(
                f"{who} {name!r} tensor {key!r} has shape {tuple(t.shape)}, the model's {pname!r} has {tuple(p.shape)}"
            )
        ref = reference.get(pname, like=p) if isinstance(reference, ReferenceWeights) else reference[pname]
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{who} {name!r} tensor {key!r} has NaN/Inf values")
        if pname in checked:  # the same-base check reads whole tensors (gathered, one at a time, when sharded)
            distances.append(compare(pname, t, full(ref).to(t.device)))
        # Sharded (FSDP2) parameters: the task vector is kept as this rank's slice, a plain tensor.
        d = local_part(t, p).to(local(p).device, torch.float32) - local(ref).float()
        d = d.to(device, dtype)
        tau[pname] = d.pin_memory() if pin else d
    if not check_base:
        return tau, median_cosine(distances)
    median = check_same_base(
        distances, donor=name, base=f"the model's reference weights ({who} check)", switch="check_base=False"
    )
    return tau, median

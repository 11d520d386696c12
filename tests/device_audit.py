"""A virtual second device for CPU-only machines: catch ops that combine tensors "on different devices".

Tensors marked with :meth:`DeviceAudit.mark` (donor task vectors, offloaded references, backups) are treated as
living on a storage device apart from the compute device, although both are the CPU here. Every torch op run
inside the audit is checked: an op that combines a tensor of one place with a tensor of another records a
violation, exactly where a real GPU run would raise "Expected all tensors to be on the same device". An explicit
``.to(device)`` (or ``.cuda()``) moves a tensor to the compute place; ``copy_`` between places is a transfer and is
allowed. Results of ops on storage tensors stay on that storage place.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

COMPUTE = "compute"
_TRANSFERS = {"copy_", "set_"}
_STAY = {"pin_memory", "is_pinned", "__get__", "__set__", "numel", "dim", "size", "element_size", "data_ptr"}


def _target_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (positionally, by keyword, or through another tensor)."""
    if "device" in kwargs or any(isinstance(a, Tensor) for a in args[1:]):
        return True
    return any(isinstance(a, (str, torch.device)) for a in args[1:])


class DeviceAudit(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._place: dict[int, tuple[weakref.ref, str]] = {}  # id -> (weak ref, place); tensors don't hash by value
        self.violations: list[str] = []
        self.checked = 0

    def mark(self, tensors, place: str) -> None:
        for t in tensors:
            self._set(t, place)

    def _set(self, t: Tensor, place: str) -> None:
        self._place[id(t)] = (weakref.ref(t), place)

    def _known(self, t: Tensor) -> bool:
        entry = self._place.get(id(t))
        return entry is not None and entry[0]() is t

    def _where(self, t: Tensor) -> str:
        return self._place[id(t)][1] if self._known(t) else COMPUTE

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        places = {self._where(t) for t in tensors}
        out = func(*args, **kwargs)
        if name in _STAY or name in _TRANSFERS:
            return out
        self.checked += 1
        if name in ("to", "cuda") and tensors:
            moved = name == "cuda" or _target_device(args, kwargs)
            place = COMPUTE if moved else self._where(tensors[0])
            if isinstance(out, Tensor):
                if out is tensors[0] and place != self._where(out):
                    out = out.view_as(out)  # a no-op move on this machine: give the moved tensor its own identity
                self._set(out, place)
            return out
        if len(places) > 1:
            self.violations.append(f"{name} combines tensors on {sorted(places)}")
        elif places and (place := places.pop()) != COMPUTE:
            for t in pytree.tree_leaves(out):
                if isinstance(t, Tensor) and not self._known(t):
                    self._set(t, place)
        return out

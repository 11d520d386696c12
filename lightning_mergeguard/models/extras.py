"""Optional dependencies (open_clip, scikit-learn...), imported with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError saying which extra of this package provides it.

    Example:
        >>> require("no_such_module_xyz", "bench", "the digits demo")
        Traceback (most recent call last):
        ...
        ImportError: the digits demo needs no_such_module_xyz: pip install 'lightning-mergeguard[bench]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        root = module.split(".")[0]
        raise ImportError(f"{purpose} needs {root}: pip install 'lightning-mergeguard[{extra}]'") from err

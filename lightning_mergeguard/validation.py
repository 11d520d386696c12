"""Argument checks every entry point shares: integers that are not bools, finite numbers, with one message form.

Example:
    >>> is_int(True), is_int(3), is_number(float("nan")), is_number(0.5)
    (False, True, False, True)
    >>> check_int(0, "checks", low=1, want="a positive integer")
    Traceback (most recent call last):
    ...
    ValueError: checks must be a positive integer, got 0
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_number", "is_int", "is_number"]


def is_int(x: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, never a count to a user)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_int(value: Any, name: str, *, low: int = 0, want: str | None = None, optional: bool = False) -> Any:
    """``value`` if it is an integer ``>= low`` (or ``None`` with ``optional``).

    Raises:
        ValueError: ``"<name> must be <want>, got <value>"``.
    """
    if (optional and value is None) or (is_int(value) and value >= low):
        return value
    raise ValueError(f"{name} must be {want or f'an integer >= {low}'}, got {value!r}")


def check_number(value: Any, name: str, *, low: float = 0.0, want: str | None = None) -> float:
    """``value`` as a float if it is a finite number ``>= low``.

    Raises:
        ValueError: ``"<name> must be <want>, got <value>"``.
    """
    if is_number(value) and value >= low:
        return float(value)
    raise ValueError(f"{name} must be {want or f'a number >= {low:g}'}, got {value!r}")

"""Name -> :class:`MethodSpec` for every merge method the engine runs."""

from __future__ import annotations

import difflib

from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.merging.methods import (
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from lightning_mergeguard.merging.spec import MethodSpec

__all__ = ["METHODS", "get_method", "register_method"]

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        linear.SPEC,
        task_arithmetic.SPEC,
        ties.SPEC,
        dare.DARE_LINEAR,
        dare.DARE_TIES,
        breadcrumbs.BREADCRUMBS,
        breadcrumbs.BREADCRUMBS_TIES,
        della.DELLA,
        della.DELLA_LINEAR,
        model_stock.SPEC,
        sce.SPEC,
        slerp.SPEC,
        nuslerp.SPEC,
        karcher.SPEC,
        passthrough.SPEC,
        multislerp.SPEC,
        nearswap.SPEC,
        arcee_fusion.SPEC,
        ram.RAM,
        ram.RAMPLUS_TL,
    )
}
_ALIASES = {"weight_averaging": "linear", "average": "linear", "model_soup": "linear"}


def get_method(name: str) -> MethodSpec:
    """Look a merge method up by its mergekit name (or an alias such as ``weight_averaging``).

    Raises:
        ValueError: For an unknown name, with the closest known names.

    Args:
        name: The method's name.

    Returns:
        Its :class:`~lightning_mergeguard.merging.MethodSpec`.

    Example:
        >>> get_method("ties").shared_params["normalize"].default
        True
    """
    key = _ALIASES.get(name, name)
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(name, [*METHODS, *_ALIASES], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown merge_method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}.")


def register_method(spec: MethodSpec, *, overwrite: bool = False) -> None:
    """Add a user-defined merge method to the registry.

    Raises:
        ValueError: If the name is taken and ``overwrite`` is false.

    Args:
        spec: The method.
        overwrite: Replace a method of the same name.
    """
    if spec.name in METHODS and not overwrite:
        raise ValueError(f"merge method {spec.name!r} is already registered; pass overwrite=True to replace it")
    METHODS[spec.name] = spec

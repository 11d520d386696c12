"""Which parameters a callback touches, and how they group into "layers"."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "filter_names",
    "group_layers",
    "name_patterns",
    "refuse_non_finite",
    "select_parameters",
    "weights_changed",
    "without_weights_ref",
]

T = TypeVar("T")

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|resblocks|block)\.\d+)\.")


def select_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    *,
    trainable_only: bool = True,
) -> dict[str, nn.Parameter]:
    """Named floating-point parameters whose name matches any ``include`` regex and no ``exclude`` regex.

    Args:
        module: The module.
        include: Regexes (``re.search``); ``None`` selects everything.
        exclude: Regexes to drop.
        trainable_only: Skip parameters with ``requires_grad=False``.

    Returns:
        Name -> parameter, in module order.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> list(select_parameters(net, exclude=[r"bias"]))
        ['0.weight', '1.weight']
    """
    named = {
        n: p for n, p in module.named_parameters() if p.is_floating_point() and (p.requires_grad or not trainable_only)
    }
    return filter_names(named, include, exclude)


def name_patterns(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    """Parameter-name regexes as a callback takes them: a list, one string alone, or ``None`` (kept ``None``).

    One string is one pattern, not a list of its characters (``include="attn"`` would otherwise select every name
    with an ``a``, ``t`` or ``n``). Each pattern is compiled, so a typo fails when the callback is built.

    Example:
        >>> name_patterns("attn", "include"), name_patterns(None, "include")
        (['attn'], None)
    """
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{what} must be parameter-name regexes (strings), got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{what}: invalid parameter-name regex {pattern!r}: {err}") from err
    return patterns


def filter_names(
    named: Mapping[str, T], include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[str, T]:
    """The entries whose name matches any ``include`` regex (``None``: all) and no ``exclude`` regex, in order.

    Example:
        >>> filter_names({"a.weight": 1, "a.bias": 2, "b.weight": 3}, include=["weight"], exclude=["^b"])
        {'a.weight': 1}
    """
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in exclude]
    return {
        n: v
        for n, v in named.items()
        if (inc is None or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)
    }


def group_layers(names: Iterable[str], granularity: str = "block") -> dict[str, list[str]]:
    """Group parameter names into layers.

    ``"tensor"``: every tensor is a layer. ``"module"``: parameters of one module (``x.weight``, ``x.bias``) form a
    layer. ``"block"``: transformer blocks (``...layers.3.``, ``...resblocks.3.``, ``...h.3.``) form one layer each;
    parameters outside blocks fall back to their module.

    Example:
        >>> group_layers(["model.layers.0.mlp.w", "model.layers.0.attn.q", "lm_head.weight"])
        {'model.layers.0': ['model.layers.0.mlp.w', 'model.layers.0.attn.q'], 'lm_head': ['lm_head.weight']}
    """
    if granularity not in {"tensor", "module", "block"}:
        raise ValueError(f"granularity must be 'tensor', 'module' or 'block', got {granularity!r}")
    groups: dict[str, list[str]] = {}
    for name in names:
        if granularity == "tensor":
            key = name
        else:
            m = _BLOCK.match(name) if granularity == "block" else None
            key = m.group(1) if m else (name.rsplit(".", 1)[0] if "." in name else name)
        groups.setdefault(key, []).append(name)
    return groups


def refuse_non_finite(module: nn.Module, who: str) -> None:
    """Refuse to protect weights that hold NaN or inf (a diverged fit): stage 2 would score, perturb and save them.

    Counted over every rank's shard under FSDP2, so all ranks raise together.

    Raises:
        NonFiniteError: Naming up to three of the tensors.

    Example:
        >>> refuse_non_finite(nn.Linear(2, 2), "stage 2")  # finite: nothing happens
    """
    from lightning_mergeguard.errors import NonFiniteError
    from lightning_mergeguard.merging.sources import count_nonfinite
    from lightning_mergeguard.sharding import local, sum_across_ranks

    params = dict(module.named_parameters())
    with torch.no_grad():
        bad = [n for n, p in params.items() if count_nonfinite(local(p))]
    total = int(sum_across_ranks(torch.tensor(float(len(bad))), list(params.values())))
    if total:
        names = ", ".join(repr(n) for n in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise NonFiniteError(
            f"{who}: the trained weights hold NaN or inf in {total} tensor(s){' (' + names + ')' if names else ''}: "
            "training diverged, so stage 2 was not applied and nothing was saved. Lower the learning rate or clip "
            "gradients (Trainer(gradient_clip_val=...)) and train again."
        )


_WEIGHTS_REF = "_fitted_weights"


def weights_changed(holder: object, module: nn.Module) -> bool:
    """Whether ``module`` holds other weights than at ``holder``'s previous call (remembered on ``holder``).

    Weights are told apart by their first parameter object, remembered weakly: the same model fitted again (or the
    same ``transformers`` model in a new LightningModule wrapper) is the same; a new model object is another. The
    first call is never a change.

    Example:
        >>> class Holder: ...
        >>> h, a, b = Holder(), nn.Linear(1, 1), nn.Linear(1, 1)
        >>> weights_changed(h, a), weights_changed(h, a), weights_changed(h, b)
        (False, False, True)
    """
    first = next(iter(module.parameters()), None)
    previous = getattr(holder, _WEIGHTS_REF, None)
    setattr(holder, _WEIGHTS_REF, None if first is None else weakref.ref(first))
    return previous is not None and previous() is not first


def without_weights_ref(holder: object) -> dict[str, object]:
    """``holder.__dict__`` for pickling, without the weak reference :func:`weights_changed` keeps.

    Spawned processes get a copy of the callbacks; a weak reference does not pickle.
    """
    state = dict(vars(holder))
    state.pop(_WEIGHTS_REF, None)
    return state

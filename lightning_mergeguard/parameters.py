"""Which parameters the callbacks and ``protect_*`` touch: :class:`ParameterSelection` and the name filters."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "DEFAULT_STAGE2_EXCLUDE",
    "ParameterSelection",
    "filter_names",
    "name_patterns",
    "parameter_selection",
    "refuse_non_finite",
    "select_parameters",
    "weights_changed",
    "without_weights_ref",
]

T = TypeVar("T")

DEFAULT_STAGE2_EXCLUDE: tuple[str, ...] = (
    r"embed",  # token / position embeddings (LLMs), open_clip token_embedding
    r"(^|\.)wte\.|(^|\.)wpe\.",
    r"lm_head",
    r"(^|\.)(norm|final_layernorm|ln_f|ln_final|ln_post)\.",  # final norms
    r"(^|\.)(head|classifier|score)\.",  # task heads
    r"(^|\.)(text_projection|logit_scale|proj)$",
)
"""Stage 2 leaves these out by default: embeddings, final norm, LM and task heads (as the method prescribes)."""


@dataclass(frozen=True)
class ParameterSelection:
    r"""Which parameters the guard, the probe and ``protect_*`` touch: one object, passed as ``parameters=``.

    Patterns are regexes searched in parameter names (``re.search``); one string is one pattern. Each is compiled
    here, so a typo fails when the object is built.

    Args:
        include: Names protected and merged (``None``: every trainable floating-point parameter).
        exclude: Names left out of everything (stage 1, stage 2 and the probe's merges), e.g. a task head.
        stage2_exclude: Names stage 2 (and the release steps) also leave alone: by default embeddings, final norms,
            LM and task heads (:data:`DEFAULT_STAGE2_EXCLUDE`), as the method prescribes.

    Example:
        >>> sel = ParameterSelection(include=r"layers\.", exclude="bias")
        >>> net = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(2, 2)]), "head": nn.Linear(2, 1)})
        >>> list(sel.select(net)), list(sel.select_stage2(net))
        (['layers.0.weight'], ['layers.0.weight'])
    """

    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] = ()
    stage2_exclude: str | Sequence[str] = field(default=DEFAULT_STAGE2_EXCLUDE)

    def __post_init__(self) -> None:
        include = name_patterns(self.include, "include")
        object.__setattr__(self, "include", tuple(include) if include is not None else None)
        for what in ("exclude", "stage2_exclude"):
            object.__setattr__(self, what, tuple(name_patterns(getattr(self, what), what) or ()))

    def filter(self, named: Mapping[str, T]) -> dict[str, T]:
        """The entries both stages and the probe use (``include`` and not ``exclude``), in order.

        Args:
            named: Name -> anything (parameters, tensors, adapter pairs).

        Returns:
            The selected entries.
        """
        return filter_names(named, self.include, self.exclude)

    def filter_stage2(self, named: Mapping[str, T]) -> dict[str, T]:
        """The entries stage 2 may change: :meth:`filter`'s, less ``stage2_exclude``.

        Args:
            named: Name -> anything.

        Returns:
            The entries stage 2 may change, in order.
        """
        return filter_names(named, self.include, [*self.exclude, *self.stage2_exclude])

    def select(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The module's trainable floating-point parameters :meth:`filter` keeps.

        Args:
            module: The model.

        Returns:
            Name -> parameter, in module order.
        """
        return select_parameters(module, self.include, self.exclude)

    def select_stage2(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The module's trainable floating-point parameters stage 2 may change.

        Args:
            module: The model.

        Returns:
            Name -> parameter, in module order, without those ``stage2_exclude`` matches.
        """
        return select_parameters(module, self.include, [*self.exclude, *self.stage2_exclude])

    def settings(self) -> dict[str, list[str] | None]:
        """The patterns, JSON-ready (for reports).

        Returns:
            ``include`` (``None``: all), ``exclude`` and ``stage2_exclude`` as lists.
        """
        return {
            "include": list(self.include) if self.include is not None else None,
            "exclude": list(self.exclude),
            "stage2_exclude": list(self.stage2_exclude),
        }


def parameter_selection(value: ParameterSelection | None) -> ParameterSelection:
    """A :class:`ParameterSelection` from the ``parameters=`` argument (``None``: the default one).

    Raises:
        TypeError: Anything else (the old ``include=``/``exclude=`` go into the object).
    """
    if value is None:
        return ParameterSelection()
    if not isinstance(value, ParameterSelection):
        raise TypeError(
            f"parameters must be a ParameterSelection (e.g. ParameterSelection(include=..., exclude=...)) or None, "
            f"got {type(value).__name__}"
        )
    return value


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


def refuse_non_finite(module: nn.Module, who: str) -> None:
    """Refuse to protect weights that hold NaN or inf (a diverged fit): stage 2 would score, perturb and save them.

    Counted over every rank's shard under FSDP2, so all ranks raise together.

    Raises:
        NonFiniteError: Naming up to three of the tensors.

    Example:
        >>> refuse_non_finite(nn.Linear(2, 2), "stage 2")  # finite: nothing happens
    """
    from lightning_mergeguard.errors import NonFiniteError
    from lightning_mergeguard.sharding import local, sum_across_ranks

    params = dict(module.named_parameters())
    with torch.no_grad():
        bad = [n for n, p in params.items() if p.is_floating_point() and not bool(torch.isfinite(local(p)).all())]
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

"""Stage-2 strategies, one module each (its maths and its object), each a pure function of a :class:`Stage2Context`.

:class:`~lightning_mergeguard.MergeGuardCallback` builds the context from the trainer (the model, the parameters
stage 2 may change, the reference, the owner's training batches, a metric on validation batches) and calls
:meth:`Stage2.run`; tests and scripts can call it directly without a Trainer.

Example:
    >>> strategy = ScaleAdversarial(steps=100, scales=(0.2, 0.3, 0.5))
    >>> strategy.settings()["steps"]
    100
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_mergeguard.protection.stage2.base import DEFAULT_STAGE2_EXCLUDE, DEFAULT_TOLERANCE, Stage2, Stage2Context
from lightning_mergeguard.protection.stage2.keep_weights import KeepWeights
from lightning_mergeguard.protection.stage2.merge_neighbourhood import MergeNeighbourhood
from lightning_mergeguard.protection.stage2.negation import Negation
from lightning_mergeguard.protection.stage2.scale_adversarial import ScaleAdversarial

__all__ = [
    "DEFAULT_STAGE2_EXCLUDE",
    "DEFAULT_TOLERANCE",
    "KeepWeights",
    "MergeNeighbourhood",
    "Negation",
    "ScaleAdversarial",
    "Stage2",
    "Stage2Context",
    "resolve_stage2",
]

STRATEGIES: dict[str, type[Stage2]] = {
    "scale_adversarial": ScaleAdversarial,
    "merge_neighbourhood": MergeNeighbourhood,
    "negation": Negation,
}


def resolve_stage2(stage2: str | Stage2 | None, **settings: Any) -> Stage2 | None:
    """A strategy from a name (``"scale_adversarial"``, ``"negation"``, ``"none"``), an object, or ``None``.

    ``settings`` are the named strategy's keyword arguments (a config file's flat form); settings of another
    strategy are refused by name.

    Raises:
        ValueError: An unknown name, or settings the strategy does not take.

    Example:
        >>> resolve_stage2("negation", beta=0.5)
        Negation(beta=0.5, critical_fraction=0.1, small_fraction=0.1, granularity='block')
    """
    if stage2 is None or stage2 == "none":
        if settings:
            raise ValueError(f"{sorted(settings)} configure stage 2, but stage2 is {stage2!r}")
        return None
    if isinstance(stage2, Stage2):
        if settings:
            raise ValueError(f"pass {sorted(settings)} to the {type(stage2).__name__} object")
        return stage2
    if not isinstance(stage2, str) or stage2 not in STRATEGIES:
        raise ValueError(f"stage2 must be one of {[*STRATEGIES, 'none']}, None or a Stage2 object, got {stage2!r}")
    cls = STRATEGIES[stage2]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    foreign = sorted(set(settings) - accepted)
    if foreign:
        raise ValueError(f"{foreign} do not apply to stage2={stage2!r} (it takes {sorted(accepted)})")
    return cls(**settings)

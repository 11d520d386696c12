"""Stage-2 strategies, one per module, each a pure function of a :class:`Stage2Context`.

See :mod:`lightning_mergeguard.protection.stage2` for how the callback builds the context and picks a strategy.
"""

from lightning_mergeguard.protection.strategies.base import DEFAULT_STAGE2_EXCLUDE, Stage2, Stage2Context
from lightning_mergeguard.protection.strategies.keep_weights import KeepWeights
from lightning_mergeguard.protection.strategies.merge_neighbourhood import MergeNeighbourhood
from lightning_mergeguard.protection.strategies.negation import Negation
from lightning_mergeguard.protection.strategies.scale_adversarial import ScaleAdversarial

__all__ = [
    "DEFAULT_STAGE2_EXCLUDE",
    "KeepWeights",
    "MergeNeighbourhood",
    "Negation",
    "ScaleAdversarial",
    "Stage2",
    "Stage2Context",
]

"""Sign election (TIES "elect") over a stack of weighted task-vector tensors."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["sign_consensus_mask"]


def sign_consensus_mask(weighted_deltas: Tensor, method: Literal["sum", "count"] = "sum") -> Tensor:
    """Mask of the entries whose sign agrees with the elected sign, per element.

    The elected sign is that of the sum of the weighted deltas (``"sum"``, the TIES paper and mergekit) or of
    the majority of signs (``"count"``); a tie elects ``+``. Entries that are exactly zero never agree.

    Args:
        weighted_deltas: Tensor of shape ``(num_models, *shape)``, task vectors already multiplied by weights.
        method: ``"sum"`` or ``"count"``.

    Returns:
        A bool tensor of shape ``(num_models, *shape)``.

    Raises:
        ValueError: An unknown ``method``.

    Example:
        >>> d = torch.tensor([[1.0, -2.0], [-3.0, 1.0]])
        >>> sign_consensus_mask(d)
        tensor([[False,  True],
                [ True, False]])
    """
    sign = weighted_deltas.sign()
    if method == "sum":
        elected = torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(sign.dtype)
    elif method == "count":
        elected = torch.where(sign.sum(dim=0) >= 0, 1.0, -1.0).to(sign.dtype)
    else:
        raise ValueError(f"unknown consensus method {method!r}; expected 'sum' or 'count'")
    return sign == elected

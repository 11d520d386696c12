"""Model Stock (Jang et al., 2024): interpolate between the base and the models' average by their angle.

Per tensor (or per row with ``filter_wise``), ``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise
cosine of the task vectors and ``N`` the number of models; the merge is ``t * mean(theta_i) + (1 - t) * base``.
mergekit's ``model_stock``: at least two models besides the base, no per-model parameters (the models are not
weighted), and a row whose denominator vanishes keeps the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mergeguard.merging.spec import MethodSpec, flag

__all__ = ["SPEC", "model_stock_merge"]


def model_stock_merge(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock merge of one tensor.

    Args:
        base: The base model's tensor.
        tensors: Two or more fine-tuned tensors of the same shape.
        filter_wise: One ratio per row (the last dimension is the row; a 1-D tensor is one row) instead of one
            per tensor.

    Returns:
        The merged tensor, in ``base.dtype`` (computed in float32, float64 for float64 inputs).

    Raises:
        ValueError: With fewer than two tensors.

    Example:
        >>> base = torch.zeros(2)
        >>> model_stock_merge(base, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])])
        tensor([1., 0.])
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(tensors)}")
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w0 = base.to(dtype)
    ws = [t.to(dtype) for t in tensors]
    if filter_wise:
        if w0.dim() < 2:  # a bias (or a scalar) is one row
            w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    norms = [o.norm(dim=-1) for o in offsets]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos_theta / torch.where(singular, 1.0, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(base.shape).to(base.dtype)


SPEC = MethodSpec(
    name="model_stock",
    # (base, tensors, model params, shared params, ctx) -> merged tensor
    merge_tensor=lambda base, tensors, params, shared, ctx: model_stock_merge(
        base, tensors, filter_wise=shared["filter_wise"]
    ),
    shared_params={"filter_wise": flag(False)},
    model_params={},
    min_models=2,
    description="interpolate between the base and the models' mean by their task vectors' angle",
)

"""Stage 1: the L2 redistribution term and its exact gradient.

``R(theta) = alpha * sum_l c_l * ||x_l||^2`` with ``x_l = theta_l - theta_pre_l`` (``target="task_vector"``,
L2-SP style: spreads the task vector) or ``x_l = theta_l`` (``target="weights"``: plain weight decay), and
``c_l = 1 / numel(theta_l)`` when ``normalize=True`` (each layer counts equally whatever its size), else 1.
The gradient is ``2 * alpha * c_l * x_l``, added to ``.grad`` after the backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_mergeguard.sharding import is_sharded, local

__all__ = ["add_redistribution_grad_", "redistribution_term", "redistribution_value"]


def _coef(p: Tensor, normalize: bool) -> float:
    return 1.0 / p.numel() if normalize else 1.0


def redistribution_term(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None,
    *,
    alpha: float,
    normalize: bool = False,
) -> Tensor:
    """Value of the L2 redistribution term (differentiable).

    Args:
        params: Name -> parameter.
        reference: Name -> pretrained tensor for ``target="task_vector"``; ``None`` penalises raw weights.
        alpha: Strength.
        normalize: Divide each layer's squared norm by its number of entries.

    Returns:
        A scalar tensor.

    Example:
        >>> p = {"w": torch.tensor([3.0, 4.0])}
        >>> redistribution_term(p, {"w": torch.zeros(2)}, alpha=0.01)
        tensor(0.2500)
    """
    total = None
    for name, p in params.items():
        x = p - reference[name] if reference is not None else p
        term = _coef(p, normalize) * x.pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return alpha * total


@torch.no_grad()
def redistribution_value(
    params: Sequence[Tensor],
    reference: Sequence[Tensor] | None,
    *,
    alpha: float,
    normalize: bool = False,
) -> float:
    """The term's value for parameters and their aligned references, without touching any gradient.

    On FSDP2 shards (DTensor) each rank sums the squares of its own rows and the sums are all-reduced, so the value
    (and ``c_l``, from the global numel) is the whole model's on every rank.

    Example:
        >>> redistribution_value([torch.tensor([3.0, 4.0])], [torch.zeros(2)], alpha=0.01)
        0.25
    """
    if not params:
        return 0.0
    loc = [local(p) for p in params]
    xs = torch._foreach_sub(loc, [local(r) for r in reference]) if reference is not None else loc
    norms = torch._foreach_norm(xs)
    squares = torch.stack([alpha * _coef(p, normalize) * n.double() ** 2 for p, n in zip(params, norms)]).sum()
    sharded = next((p for p in params if is_sharded(p)), None)
    if sharded is not None:
        torch.distributed.all_reduce(squares, group=sharded.device_mesh.get_group())
    return float(squares)


@torch.no_grad()
def add_redistribution_grad_(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | Sequence[Tensor] | None,
    *,
    alpha: float,
    normalize: bool = False,
    compute_value: bool = True,
) -> float | None:
    """Add the term's gradient ``2 * alpha * c_l * x_l`` to each parameter's ``.grad``; return the term's value.

    The gradient is added as ``grad += k * theta - k * theta_pre`` with fused multi-tensor ops and no temporary
    copy of the model; the value (which needs one) is computed only when ``compute_value`` is true, so a
    callback can pay for it on logging steps only. Parameters without a gradient are skipped. ``reference`` is a
    mapping by name, or a sequence aligned with ``params`` (already on the parameters' devices; its dtype may
    differ, e.g. a bf16 reference for fp32 parameters).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> w.grad = torch.zeros(2)
        >>> round(add_redistribution_grad_({"w": w}, {"w": torch.zeros(2)}, alpha=0.5), 6)
        1.0
        >>> w.grad
        tensor([ 1., -1.])
    """
    if reference is not None and not isinstance(reference, Mapping):
        reference = dict(zip(params, reference))
    names = [n for n, p in params.items() if p.grad is not None]
    if not names:
        return 0.0 if compute_value else None
    ps = [params[n] for n in names]
    grads = [p.grad for p in ps]
    refs = [reference[n] for n in names] if reference is not None else None
    value = redistribution_value(ps, refs, alpha=alpha, normalize=normalize) if compute_value else None
    if normalize:
        for p, g, i in zip(ps, grads, range(len(ps))):
            k = 2.0 * alpha * _coef(p, normalize)
            g.add_(p, alpha=k)
            if refs is not None:
                g.add_(refs[i], alpha=-k)
    else:
        k = 2.0 * alpha
        torch._foreach_add_(grads, ps, alpha=k)
        if refs is not None:
            torch._foreach_add_(grads, refs, alpha=-k)
    return value

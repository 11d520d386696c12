"""Sparsification of task vectors: magnitude trims (TIES, breadcrumbs) and random drops (DARE, DELLA).

Every function here maps one tensor to one tensor and never touches global state: the random drop takes an
explicit :class:`torch.Generator` so merges repeat exactly for a given seed.

Semantics follow mergekit: ``density`` is the fraction of entries kept, ``k = max(1, int(density * numel))``
entries survive magnitude trimming, and ``rescale_norm`` rescales the kept entries so that the chosen norm of the
result matches the norm of the input (mergekit's DARE default is ``"l1"``). ``"density"`` gives the textbook
DARE rescale by ``1 / density`` instead.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

RescaleNorm = Literal["l1", "l2", "linf", "density"]

__all__ = [
    "RescaleNorm",
    "bisect_select",
    "della_keep_probabilities",
    "della_prune",
    "magnitude_outliers_prune",
    "magnitude_prune",
    "random_prune",
    "rank_window_mask",
    "rescale_masked",
    "select_ranks",
]


def _check_density(density: float) -> None:
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def rescale_masked(tensor: Tensor, mask: Tensor, norm: RescaleNorm | None, density: float = 1.0) -> Tensor:
    """Apply ``mask`` to ``tensor`` and optionally rescale the result.

    Args:
        tensor: The dense tensor.
        mask: A mask of the same shape (bool or 0/1 values).
        norm: ``None`` (no rescale), ``"l1"``, ``"l2"`` or ``"linf"`` (match that norm of ``tensor``), or
            ``"density"`` (divide by ``density``, the textbook DARE rescale).
        density: Only used when ``norm == "density"``.

    Returns:
        The masked (and rescaled) tensor.

    Example:
        >>> t = torch.tensor([1.0, -2.0, 3.0])
        >>> rescale_masked(t, torch.tensor([0, 1, 1]), "l1")
        tensor([ 0.0000, -2.4000,  3.6000])
    """
    masked = torch.where(mask.to(torch.bool), tensor, 0)
    if norm is None:
        return masked
    if norm == "density":
        return masked / density
    eps = 1e-7
    if norm == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tensor.norm(), masked.norm()
    elif norm == "linf":
        before, after = tensor.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"unknown rescale norm {norm!r}; expected one of l1, l2, linf, density or None")
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


_CHUNK = 1 << 24  # elements compared per kernel in the bisection: ~100 MiB of temporaries at most
_SORT_MAX = 1 << 25  # off the CPU, tensors up to this size are sorted (one kernel, 12 bytes per element)


def _order_keys(flat: Tensor) -> Tensor:
    """int32 keys that sort like the float32 values (negative floats have their magnitude bits flipped)."""
    bits = flat.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(key: Tensor) -> Tensor:
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32)
    return bits.reshape(1).view(torch.float32).reshape(())


def bisect_select(flat: Tensor, ranks: tuple[int, ...], chunk: int = _CHUNK) -> list[Tensor]:
    """Values of the given ascending ranks of a float32 tensor, by bisection on their bit patterns.

    Exact (the result is the value ``torch.sort(flat)[r]``), runs on any device without a host sync, and needs
    O(``chunk``) temporary memory instead of a sort's 12 bytes per element: 32 rounds, each counting the entries
    at or below a candidate key. This is the GPU path of :func:`select_ranks` (``kthvalue`` is slow on CUDA).

    Example:
        >>> [float(v) for v in bisect_select(torch.tensor([3.0, -1.0, 2.0, -0.5]), (0, 3))]
        [-1.0, 3.0]
    """
    if flat.dtype != torch.float32:
        raise TypeError(f"bisect_select works on float32 values, got {flat.dtype}")
    flat = flat.reshape(-1).contiguous()
    dev = flat.device
    r = torch.tensor(ranks, dtype=torch.int64, device=dev) + 1  # need count(key <= v) >= rank + 1
    lo = torch.full((len(ranks),), -(2**31), dtype=torch.int64, device=dev)
    hi = torch.full((len(ranks),), 2**31 - 1, dtype=torch.int64, device=dev)
    for _ in range(32):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        mid32 = mid.to(torch.int32).unsqueeze(1)
        count = torch.zeros(len(ranks), dtype=torch.int64, device=dev)
        for start in range(0, flat.numel(), chunk):
            keys = _order_keys(flat[start : start + chunk])
            count += (keys.unsqueeze(0) <= mid32).sum(dim=1)
        enough = count >= r
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return [_from_key(lo[i]) for i in range(len(ranks))]


def select_ranks(flat: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
    """Values of ascending rank ``i`` and ``j`` of a flat tensor, exactly, in O(n).

    CPU: numpy's introselect (about 10x torch's ``kthvalue``). Other devices (where ``kthvalue`` runs one block
    per tensor and is slow): a sort up to 2**25 entries, :func:`bisect_select` above (bounded memory, no host sync).

    Example:
        >>> [float(v) for v in select_ranks(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0, 2)]
        [1.0, 3.0]
    """
    if flat.device.type == "cpu":
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        part = np.partition(flat.numpy(), (i, j) if i != j else i)
        return torch.as_tensor(part[i]), torch.as_tensor(part[j])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # exact upcast; the bisection works on float32 bit patterns
    if flat.numel() <= _SORT_MAX or flat.dtype != torch.float32:
        ordered = torch.sort(flat.reshape(-1)).values
        return ordered[i], ordered[j]
    a, *b = bisect_select(flat, (i, j) if i != j else (i,))
    return a, (b[0] if b else a)


def rank_window_mask(values: Tensor, lo: int, hi: int) -> Tensor:
    """Boolean mask of the entries whose ascending rank lies in ``[lo, hi)``.

    Ties are broken by flat index (earlier index, lower rank), so the result is deterministic and keeps exactly
    ``hi - lo`` entries. Runs in O(n) with two selections instead of a full sort.

    Args:
        values: Any tensor (ranked on its flattened values).
        lo: First rank kept (inclusive).
        hi: Last rank kept (exclusive).

    Returns:
        A bool tensor shaped like ``values``.

    Example:
        >>> rank_window_mask(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2, 4)
        tensor([ True, False,  True, False])
    """
    flat = values.reshape(-1)
    n = flat.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return torch.zeros_like(values, dtype=torch.bool)
    if lo == 0 and hi == n:
        return torch.ones_like(values, dtype=torch.bool)
    if hi == n:
        return _top_window(flat, lo).reshape(values.shape)
    a, b = select_ranks(flat, lo, hi - 1)
    keep = (flat > a) & (flat < b)
    for v in (a, b) if bool(a != b) else (a,):
        # Entries equal to a boundary value: rank them by index and keep those inside the window.
        idx = (flat == v).nonzero().squeeze(1)
        ranks = int((flat < v).sum()) + torch.arange(len(idx), device=flat.device)
        keep[idx[(ranks >= lo) & (ranks < hi)]] = True
    return keep.reshape(values.shape)


def _top_window(flat: Tensor, lo: int) -> Tensor:
    """``rank_window_mask(flat, lo, n)``: one selection and one comparison (TIES keeps the top ``n - lo``).

    Entries equal to the threshold are common (task vectors of bf16 weights take few distinct values); the
    lowest-ranked of them, the earliest indices, are dropped until exactly ``n - lo`` remain.
    """
    a = select_ranks(flat, lo, lo)[0].to(flat.device)
    keep = flat >= a
    extra = int(keep.sum()) - (flat.numel() - lo)
    if extra > 0:
        keep[(flat == a).nonzero().squeeze(1)[:extra]] = False
    return keep


def magnitude_prune(tensor: Tensor, density: float, rescale_norm: RescaleNorm | None = None) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES trimming), zero the rest.

    Args:
        tensor: A task-vector tensor.
        density: Fraction kept, in (0, 1]. ``k = max(1, int(density * numel))`` as in mergekit.
        rescale_norm: Optional rescale of the kept entries (see :func:`rescale_masked`).

    Returns:
        The trimmed tensor.

    Example:
        >>> magnitude_prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), density=0.5)
        tensor([ 0., -3.,  2.,  0.])
    """
    _check_density(density)
    if density >= 1 or tensor.numel() == 0:
        return tensor
    n = tensor.numel()
    k = max(1, int(density * n))
    mask = rank_window_mask(tensor.abs().float(), n - k, n)
    return rescale_masked(tensor, mask, rescale_norm, density)


def magnitude_outliers_prune(
    tensor: Tensor, density: float, gamma: float = 0.01, rescale_norm: RescaleNorm | None = None
) -> Tensor:
    """Model Breadcrumbs trimming: drop the ``gamma`` largest outliers, then the smallest, keeping ``density``.

    Args:
        tensor: A task-vector tensor.
        density: Fraction kept, in (0, 1].
        gamma: Fraction of the largest-magnitude entries removed first (reduced if needed to keep ``density``).
        rescale_norm: Optional rescale of the kept entries.

    Returns:
        The trimmed tensor.

    Raises:
        ValueError: If ``gamma`` is outside ``[0, 1)``.

    Example:
        >>> magnitude_outliers_prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), density=0.5, gamma=0.25)
        tensor([0.0000, -0.0000, 2.0000, 0.5000])
    """
    _check_density(density)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mask = rank_window_mask(tensor.abs().float(), n_bot, n_bot + target)
    return rescale_masked(tensor, mask, rescale_norm, density)


def random_prune(
    tensor: Tensor,
    density: float,
    rescale_norm: RescaleNorm | None = "l1",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE: keep each entry independently with probability ``density``, then rescale.

    Args:
        tensor: A task-vector tensor.
        density: Keep probability, in (0, 1].
        rescale_norm: ``"l1"`` (mergekit's default: match the L1 norm), ``"density"`` (the paper's
            ``1 / density``), another norm, or ``None``.
        generator: Random generator; pass a seeded one for repeatable merges.

    Returns:
        The sparsified tensor, in the input dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_prune(torch.ones(4), density=1.0, generator=g)
        tensor([1., 1., 1., 1.])
    """
    _check_density(density)
    if density >= 1:
        return tensor
    work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    # Uniform draws below ``density``: the same Bernoulli(density) mask as ``torch.bernoulli`` on a filled tensor,
    # 2.7x faster on CPU (no probability tensor to read) and the same on GPU.
    mask = torch.rand(work.shape, generator=generator, device=work.device, dtype=work.dtype) < density
    return rescale_masked(work, mask, rescale_norm, density).to(tensor.dtype)


def della_prune(
    tensor: Tensor,
    density: float,
    epsilon: float = 0.15,
    rescale_norm: RescaleNorm | None = "l1",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA's MagPrune: drop entries at random, keeping larger magnitudes with higher probability.

    Along each row (dim 1; a 1-D tensor is one row), entries are ranked by magnitude and kept with probability
    ``density - epsilon + 2 * epsilon * r``, ``r`` the rank scaled to [0, 1] (the smallest entry ``density -
    epsilon``, the largest ``density + epsilon``), as mergekit's ``della_magprune``. Ties in magnitude are ranked
    by position (a stable sort). A row of one entry is kept with probability ``density`` (mergekit's rank scaling
    divides by zero there).

    Args:
        tensor: A task-vector tensor.
        density: Mean keep probability, in (0, 1]; 1 returns ``tensor`` unchanged.
        epsilon: Half-width of the keep probabilities; ``density +/- epsilon`` must lie in (0, 1).
        rescale_norm: ``"l1"`` (mergekit's default with ``rescale: true``), another norm, ``"density"`` or ``None``.
        generator: Random generator; pass a seeded one for repeatable merges.

    Returns:
        The sparsified tensor, in the input dtype.

    Raises:
        ValueError: If ``density +/- epsilon`` leaves (0, 1).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> della_prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), density=1.0, generator=g)
        tensor([ 0.1000, -3.0000,  2.0000,  0.5000])
    """
    _check_density(density)
    if density >= 1:
        return tensor
    if not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise ValueError(
            f"DELLA needs density - epsilon > 0 and density + epsilon < 1, got density {density} and epsilon {epsilon}"
        )
    work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    # Rows are ranked independently: draw the mask a block of rows at a time, so the sort's temporaries (about 24
    # bytes per entry) stay bounded by _CHUNK entries instead of growing with the tensor (an embedding matrix).
    rows = work.reshape(1, -1) if work.dim() < 2 else work
    mask = torch.empty(rows.shape, dtype=torch.bool, device=work.device)
    step = max(1, _CHUNK // max(1, rows[0].numel()))
    for start in range(0, rows.shape[0], step):
        probs = della_keep_probabilities(rows[start : start + step], density, epsilon)
        mask[start : start + step] = (
            torch.rand(probs.shape, generator=generator, device=work.device, dtype=work.dtype) < probs
        )
    return rescale_masked(work, mask.reshape(work.shape), rescale_norm, density).to(tensor.dtype)


def della_keep_probabilities(tensor: Tensor, density: float, epsilon: float) -> Tensor:
    """Keep probability of every entry under DELLA's MagPrune (see :func:`della_prune`), shaped like ``tensor``.

    Entries are ranked by magnitude along dim 1 (a 1-D or 0-D tensor is one row), as mergekit does for any number
    of dimensions; rank ``r`` of ``n`` gets ``density - epsilon + 2 * epsilon * r / (n - 1)``.

    Example:
        >>> della_keep_probabilities(torch.tensor([0.3, -2.0, 0.1]), 0.5, 0.1)
        tensor([0.5000, 0.6000, 0.4000])
    """
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor
    n = rows.shape[1]
    dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    along = [1] * rows.dim()
    along[1] = n
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=rows.device).reshape(along).expand_as(order)
    )
    scaled = ranks.to(dtype) / (n - 1) if n > 1 else torch.full(rows.shape, 0.5, dtype=dtype, device=rows.device)
    return ((density - epsilon) + scaled * (2 * epsilon)).reshape(tensor.shape)

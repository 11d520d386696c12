"""A secret key in the released weights, and the white-box test that finds it in any model derived from them.

The key is added to the owner's task vector ``tau = theta - theta_pre`` of every weight matrix just before release
(after stage 2, so every stage 2 keeps it), in two parts that fail under different attacks:

* **dense**: ``strength * s ⊙ |tau|`` with secret random signs ``s``, one per weight. Invisible (it only changes
  each coordinate of ``tau`` by a few percent, and not at all where ``tau`` is zero), and it survives averaging,
  task arithmetic, TIES/DARE sparsification, noise, int8/4-bit rounding and further fine-tuning, because the
  statistic sums over every weight. A low-rank truncation of the task vector removes it.
* **subspace**: ``alpha * U K V^T`` with ``U, V`` the top-``rank`` singular vectors of ``tau`` and ``K`` a secret
  ``rank x rank`` sign matrix with a zero diagonal: a small rotation of ``tau``'s own top singular directions.
  It survives low-rank truncation (it lives in the subspace a truncation keeps) and everything the dense part does.
  ``U^T tau V`` is diagonal for the owner's ``tau``, so the owner's own task vector adds no noise to it.

The test (:func:`weight_key_test`) computes, for a suspect already aligned to ``theta_pre``
(:func:`~lightning_mergeguard.ownership.alignment.align_to_base`), the normalised correlation ``z`` of its task
vector with each part's signs. **Null hypothesis:** the suspect's weights do not depend on the secret signs (true of
the base, of every other fine-tune, of merges without the release, and of an honest third party who fine-tuned
the owner's task independently). Given the suspect, the signs are then independent fair coins, and Hoeffding's
inequality bounds ``P(z >= z_obs) <= exp(-z_obs**2 / 2)`` exactly, whatever the suspect is. The two parts are
combined by Bonferroni. The reported ``share`` estimates how much of the owner's key the suspect carries (1.0 for
the release itself, about the owner's weight for a linear merge).

The secret is the seed of the signs; the key file also holds ``U`` and ``V``. Keep it away from the release.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets as _secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_mergeguard.ownership.stats import bonferroni, hoeffding_tail, log10_hoeffding_tail
from lightning_mergeguard.validation import is_int, is_number

__all__ = [
    "WEIGHTINGS",
    "KeyTestResult",
    "WeightKey",
    "embed_key_checked",
    "embed_weight_key",
    "embed_weight_key_",
    "key_cost_warning",
    "key_tensor_names",
    "remove_weight_key",
    "restrength_weight_key",
    "weight_key_test",
]

KEY_FORMAT = "lightning-mergeguard weight key 1"
DEFAULT_RANK = 16
DEFAULT_STRENGTH = 0.1
"""The key's default strength: 0.05 left Model Stock repaired for 50 steps neither stopped nor caught on every vision
seed; 0.1 catches it (``benchmarks/key_strength.py``) for 0.2 to 0.4 points of own accuracy."""
MIN_STRENGTH = 0.025
"""The weakest key :func:`embed_key_checked` halves down to when the key costs more than the guard rail allows."""


def _signs(secret: int, kind: str, name: str, shape: tuple[int, ...]) -> Tensor:
    """The secret ±1 signs of one tensor (CPU float32), a pure function of the secret, the part and the name."""
    digest = hashlib.sha256(f"{secret}:{kind}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randint(0, 2, shape, generator=g, dtype=torch.int8).float().mul_(2).sub_(1)


def _subspace_signs(secret: int, name: str, rank: int) -> Tensor:
    k = _signs(secret, "subspace", name, (rank, rank))
    return k.fill_diagonal_(0.0)


def _matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def key_tensor_names(state: Mapping[str, Tensor], pre: Mapping[str, Tensor], min_size: int = 4) -> list[str]:
    """The tensors a key goes into: changed floating tensors of two or more dimensions.

    Each is read as a ``[rows, -1]`` matrix with both sides at least ``min_size``.

    Example:
        >>> pre = {"w": torch.zeros(8, 8), "b": torch.zeros(8), "same": torch.ones(8, 8)}
        >>> key_tensor_names({"w": torch.ones(8, 8), "b": torch.ones(8), "same": torch.ones(8, 8)}, pre)
        ['w']
    """
    names = []
    for name, t in state.items():
        p = pre.get(name)
        if p is None or not t.is_floating_point() or t.dim() < 2 or t.shape != p.shape:
            continue
        if t.shape[0] < min_size or t.numel() // t.shape[0] < min_size:
            continue
        if not torch.equal(t, p):
            names.append(name)
    return names


@dataclass(frozen=True, repr=False)
class WeightKey:
    """The owner's secret key: the sign seed, and per tensor the singular bases and scales the test needs.

    Create it with :func:`embed_weight_key`; keep it (``save``) apart from the released model. Its ``repr``
    hides the secret.

    Attributes:
        secret: Seed of every secret sign.
        strength: Each part's norm as a fraction of the tensor's task-vector norm.
        bases: ``name -> (U, V)``, the top singular vectors of the owner's task vector (float32, CPU).
        scales: ``name -> (alpha, rms)``: the subspace part's scale and the task vector's RMS at key time.
        dense_signal: ``name -> strength * ||tau||_1 / rms``: what the release itself scores on the dense part.
    """

    secret: int
    strength: float
    bases: dict[str, tuple[Tensor, Tensor]]
    scales: dict[str, tuple[float, float]]
    dense_signal: dict[str, float] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    """``name -> the name the signs were drawn for`` where :meth:`matched_to` renamed a tensor."""

    def __repr__(self) -> str:
        return f"WeightKey(<secret hidden>, {len(self.bases)} tensors, strength={self.strength})"

    @property
    def names(self) -> list[str]:
        """The keyed tensor names."""
        return list(self.bases)

    def matched_to(self, available: Any, what: str = "the suspect") -> WeightKey:
        """This key with its names mapped onto another state dict's.

        A LightningModule's ``lm.model.x`` maps onto a Hugging Face checkpoint's ``model.x``, say (see
        :func:`~lightning_mergeguard.merging.sources.match_names`).

        Raises:
            ValueError: If a keyed tensor has no counterpart (another architecture).

        Args:
            available: The other state dict's names.
            what: How to name it in an error.

        Returns:
            The renamed key (the signs stay those of the original names).
        """
        from lightning_mergeguard.merging.sources import match_names

        try:
            names = match_names(self.names, list(available), what=what)
        except ValueError as err:
            raise ValueError(f"{err}: another architecture than the keyed model's?") from None
        if all(k == v for k, v in names.items()):
            return self
        return WeightKey(
            self.secret,
            self.strength,
            {names[n]: b for n, b in self.bases.items()},
            {names[n]: s for n, s in self.scales.items()},
            {names[n]: s for n, s in self.dense_signal.items()},
            {names[n]: n for n in self.bases},
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as safetensors (atomically). Anyone with this file can test for the key; keep it secret.

        Args:
            path: The key file.

        Example:
            >>> import tempfile, pathlib
            >>> pre = {"w": torch.zeros(16, 16)}
            >>> _, key = embed_weight_key({"w": torch.randn(16, 16)}, pre, secret=1)
            >>> p = pathlib.Path(tempfile.mkdtemp()) / "owner.key"
            >>> key.save(p); WeightKey.load(p).secret
            1
        """
        from lightning_mergeguard.io import save_safetensors

        tensors = {}
        for name, (u, v) in self.bases.items():
            tensors[f"U::{name}"] = u.contiguous()
            tensors[f"V::{name}"] = v.contiguous()
        meta = {
            "format": KEY_FORMAT,
            "secret": str(self.secret),
            "strength": repr(self.strength),
            "scales": json.dumps(self.scales),
            "dense_signal": json.dumps(self.dense_signal),
            "origin": json.dumps(self.origin),
        }
        save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WeightKey:
        """Read a key written by :meth:`save`.

        Raises:
            ValueError: If the file is not a weight key (or is damaged).
        """
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != KEY_FORMAT:
                    raise ValueError(f"{path}: not a lightning-mergeguard weight key (format {meta.get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            scales = {k: (float(a), float(r)) for k, (a, r) in json.loads(meta["scales"]).items()}
            signal = {k: float(v) for k, v in json.loads(meta["dense_signal"]).items()}
            bases = {name: (tensors[f"U::{name}"], tensors[f"V::{name}"]) for name in scales}
            origin = json.loads(meta.get("origin", "{}"))
            return cls(int(meta["secret"]), float(meta["strength"]), bases, scales, signal, origin)
        except ValueError:
            raise
        except Exception as err:  # a missing entry, bad JSON, or safetensors' own error types
            raise ValueError(f"{path}: damaged or not a weight key ({type(err).__name__}: {err})") from None


def embed_weight_key(
    state: Mapping[str, Tensor],
    pre: Mapping[str, Tensor],
    names: list[str] | None = None,
    rank: int = DEFAULT_RANK,
    strength: float = DEFAULT_STRENGTH,
    secret: int | None = None,
) -> tuple[dict[str, Tensor], WeightKey]:
    """Add a fresh secret key to ``state``'s task vector; return the keyed state and the key.

    Args:
        state: The model to release (after stage 2), a state dict.
        pre: ``theta_pre``, the base it was fine-tuned from (same names and shapes).
        names: Tensors to key; ``None``: :func:`key_tensor_names`.
        rank: Size of the subspace part (capped at half the smaller side of each matrix).
        strength: Each part's norm as a fraction of the tensor's task-vector norm (0.1: 10%).
        secret: Seed of the signs; ``None`` draws 63 random bits (``secrets``), the right choice for a release.

    Returns:
        ``(keyed state, key)``; tensors not keyed are the input's own objects, keyed ones keep their dtype.

    Raises:
        ValueError: On a bad ``rank``/``strength``, a name missing from either side, a shape mismatch, non-finite
            weights, or nothing to key (no tensor changed).

    Example:
        >>> pre = {"w": torch.zeros(32, 32)}
        >>> keyed, key = embed_weight_key({"w": torch.randn(32, 32)}, pre, secret=7)
        >>> round(weight_key_test(keyed, pre, key).share_subspace, 1)
        1.0
    """
    if not is_int(rank) or rank < 2:
        raise ValueError(f"rank must be an int >= 2, got {rank!r}")
    if not is_number(strength) or not 0.0 < strength <= 0.5:
        raise ValueError(f"strength must be in (0, 0.5], got {strength!r}")
    names = key_tensor_names(state, pre) if names is None else list(names)
    if not names:
        raise ValueError("nothing to key: no weight matrix differs from theta_pre (is this the fine-tuned model?)")
    secret = _secrets.randbits(63) if secret is None else int(secret)
    out = dict(state)
    bases: dict[str, tuple[Tensor, Tensor]] = {}
    scales: dict[str, tuple[float, float]] = {}
    signal: dict[str, float] = {}
    for name in names:
        if name not in state or name not in pre:
            raise ValueError(f"{name!r} is missing from {'the model' if name not in state else 'theta_pre'}")
        w, p = state[name], pre[name]
        if w.shape != p.shape:
            raise ValueError(f"{name!r}: shape {tuple(w.shape)} differs from theta_pre's {tuple(p.shape)}")
        tau = _matrix(w.float() - p.float().to(w.device))
        if not torch.isfinite(tau).all():
            raise ValueError(f"{name!r} has non-finite weights; refusing to key it")
        norm = float(tau.norm())
        if norm == 0.0:
            continue
        r = min(rank, min(tau.shape) // 2)
        u, _, vh = torch.linalg.svd(tau, full_matrices=False)
        u, v = u[:, :r].contiguous(), vh[:r].T.contiguous()
        alpha = strength * norm / math.sqrt(r * (r - 1))
        rms = norm / math.sqrt(tau.numel())
        dense = _signs(secret, "dense", name, tuple(tau.shape)).to(tau.device)
        k = _subspace_signs(secret, name, r).to(tau.device)
        delta = strength * dense * tau.abs() + alpha * (u @ k @ v.T)
        out[name] = (w.float() + delta.reshape(w.shape)).to(w.dtype)
        bases[name] = (u.cpu(), v.cpu())
        scales[name] = (alpha, rms)
        signal[name] = strength * float(tau.abs().sum()) / rms
    if not bases:
        raise ValueError("nothing to key: every named tensor equals theta_pre")
    return out, WeightKey(secret, float(strength), bases, scales, signal)


def remove_weight_key(state: Mapping[str, Tensor], pre: Mapping[str, Tensor], key: WeightKey) -> dict[str, Tensor]:
    """The weights ``key`` was embedded into: :func:`embed_weight_key` undone, with the key's secret.

    The subspace part is subtracted, then the dense part divided out (``tau * (1 + strength * s * sign(tau))`` has the
    sign of ``tau``, so each coordinate inverts exactly). Lets an owner re-key a release (another strength or secret)
    without training again; exact up to the rounding of the keyed weights' dtype.

    Args:
        state: The keyed model (the release).
        pre: ``theta_pre``.
        key: The key embedded in it (names as ``state``'s; see :meth:`WeightKey.matched_to`).

    Returns:
        ``state`` with the key removed; tensors the key does not name are ``state``'s own objects.

    Raises:
        ValueError: As :func:`weight_key_test` for a state or base of another architecture.

    Example:
        >>> pre = {"w": torch.zeros(32, 32)}
        >>> w = torch.randn(32, 32)
        >>> keyed, key = embed_weight_key({"w": w}, pre, secret=7)
        >>> torch.allclose(remove_weight_key(keyed, pre, key)["w"], w, atol=1e-6)
        True
    """
    _check_suspect(state, pre, key)
    out = dict(state)
    for name in key.names:
        w, p = state[name], pre[name]
        tau = _matrix(w.double() - p.double().to(w.device))
        dense, subspace = _key_parts(key, name, tau)
        tau = tau - key.scales[name][0] * subspace
        tau = tau / (1.0 + key.strength * dense * torch.sign(tau))
        out[name] = (p.double().to(w.device) + tau.reshape(w.shape)).to(w.dtype)
    return out


def _key_parts(key: WeightKey, name: str, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(dense signs, U K V^T)`` of one keyed tensor, as ``like``'s dtype and device: the key, before its scales."""
    u, v = key.bases[name]
    drawn = key.origin.get(name, name)
    dense = _signs(key.secret, "dense", drawn, tuple(like.shape)).to(like)
    return dense, u.to(like) @ _subspace_signs(key.secret, drawn, u.shape[1]).to(like) @ v.to(like).T


def restrength_weight_key(
    state: Mapping[str, Tensor], pre: Mapping[str, Tensor], key: WeightKey, strength: float
) -> tuple[dict[str, Tensor], WeightKey]:
    """``state``'s key at another ``strength``: the same secret and singular bases, both parts rescaled.

    :func:`remove_weight_key`, then the key embedded again as :func:`embed_weight_key` would at ``strength`` with the
    bases the key already holds (recomputing them could flip a singular vector's sign). At ``key.strength`` it gives
    ``state`` back, up to rounding.

    Args:
        state: The keyed model (the release).
        pre: ``theta_pre``.
        key: The key embedded in it.
        strength: The new strength, in (0, 0.5].

    Returns:
        ``(state with the key at strength, the key at strength)``.

    Raises:
        ValueError: On a bad ``strength``, or as :func:`remove_weight_key`.

    Example:
        >>> pre = {"w": torch.zeros(64, 64)}
        >>> w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        >>> keyed, key = embed_weight_key({"w": w}, pre, secret=7)
        >>> stronger, key2 = restrength_weight_key(keyed, pre, key, 0.2)
        >>> key2.strength, weight_key_test(stronger, pre, key2).z_dense > 2 * weight_key_test(keyed, pre, key).z_dense
        (0.2, True)
    """
    if not is_number(strength) or not 0.0 < strength <= 0.5:
        raise ValueError(f"strength must be in (0, 0.5], got {strength!r}")
    out = remove_weight_key(state, pre, key)
    ratio = strength / key.strength
    scales: dict[str, tuple[float, float]] = {}
    for name in key.names:
        w, p = out[name], pre[name]
        alpha, rms = key.scales[name]
        tau = _matrix(w.float() - p.float().to(w.device))
        dense, subspace = _key_parts(key, name, tau)
        out[name] = (w.float() + (strength * dense * tau.abs() + alpha * ratio * subspace).reshape(w.shape)).to(w.dtype)
        scales[name] = (alpha * ratio, rms)
    signal = {n: s * ratio for n, s in key.dense_signal.items()}
    return out, WeightKey(key.secret, float(strength), key.bases, scales, signal, key.origin)


@dataclass(frozen=True)
class KeyTestResult:
    """The white-box test's outcome (see the module docstring for the null hypothesis).

    Attributes:
        p_value: Bonferroni combination of the two parts' p-values (a valid p-value under the null).
        log10_p: ``log10(p_value)`` without underflow (p-values below 1e-308 stay readable).
        z_dense / z_subspace: The normalised statistics (about N(0, 1)-or-smaller under the null).
        share_dense / share_subspace: Estimated fraction of the owner's key in the suspect (1.0: the release).
        tensors: How many keyed tensors the suspect had.
    """

    p_value: float
    log10_p: float
    z_dense: float
    z_subspace: float
    share_dense: float
    share_subspace: float
    tensors: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict.

        Returns:
            The fields as a dict.
        """
        return dict(self.__dict__)


def _check_suspect(suspect: Mapping[str, Tensor], pre: Mapping[str, Tensor], key: WeightKey) -> None:
    missing = [n for n in key.names if n not in suspect]
    if missing:
        raise ValueError(
            f"the suspect lacks {len(missing)} of the key's {len(key.names)} tensors (first: {missing[0]!r}): "
            "another architecture, or names with a prefix the key does not have"
        )
    for name in key.names:
        u, v = key.bases[name]
        if name not in pre:
            raise ValueError(f"theta_pre lacks the keyed tensor {name!r}: not the base the key was made on")
        for who, t in (("suspect", suspect[name]), ("theta_pre", pre[name])):
            if t.shape[0] != u.shape[0] or t.numel() // max(t.shape[0], 1) != v.shape[0]:
                raise ValueError(
                    f"{name!r}: the {who}'s shape {tuple(t.shape)} does not match the key's "
                    f"({u.shape[0]} x {v.shape[0]}): another architecture"
                )


def _without_base_directions(tau: Tensor, base: Tensor, rounds: int = 3) -> Tensor:
    """``tau`` with each row's and each column's component along ``base``'s row / column removed.

    A suspect aligned to ``theta_pre`` keeps what the scale estimate missed, ``(s_hat - s) * base`` per channel:
    a nuisance along ``base``'s rows and columns that can swamp the key. It is a function of the suspect and the
    base only, so removing it keeps the test's null distribution (the key's own share along those ``rows + cols``
    directions out of ``rows * cols`` is negligible).
    """
    w = base.to(tau)
    row_norm = w.square().sum(1, keepdim=True).clamp_min(1e-30)
    col_norm = w.square().sum(0, keepdim=True).clamp_min(1e-30)
    for _ in range(rounds):
        tau = tau - (tau * w).sum(1, keepdim=True) / row_norm * w
        tau = tau - (tau * w).sum(0, keepdim=True) / col_norm * w
    return tau


WEIGHTINGS = ("pooled", "snr")
"""How :func:`weight_key_test` combines its keyed tensors: one pooled sum, or each weighed by its signal to noise."""


def _combine(parts: list[tuple[float, float, float, float]], weighting: str) -> tuple[float, float]:
    """``(z, share)`` of per-tensor ``(sum, variance, signal, floor)`` terms combined with weights ``w``.

    ``z = sum(w * sum) / sqrt(sum(w**2 * variance))``: with weights fixed given the suspect, ``z`` is a Rademacher
    sum normalised by its norm, so Hoeffding's bound holds for it. ``"pooled"``: ``w = 1``. ``"snr"``:
    ``w = signal / (variance + floor)``, the matched filter of a tensor whose noise is its variance, with the
    release's own variance (``floor``) as a floor so that a tensor reset to ``theta_pre`` cannot take the test over.
    ``share`` is ``sum(w * sum) / sum(w * signal)``: 1.0 for the release.
    """
    num = var = signal = 0.0
    for total, variance, sig, floor in parts:
        w = 1.0 if weighting == "pooled" else sig / (variance + floor)
        num += w * total
        var += w * w * variance
        signal += w * sig
    return (num / math.sqrt(var) if var > 0 else 0.0), (num / signal if signal else 0.0)


@torch.no_grad()
def weight_key_test(
    suspect: Mapping[str, Tensor],
    pre: Mapping[str, Tensor],
    key: WeightKey,
    aligned: bool = False,
    weighting: str = "pooled",
) -> KeyTestResult:
    """Test whether ``suspect`` carries ``key``; align it to ``pre`` first if it may be permuted or rescaled.

    Args:
        suspect: The suspect's state dict (same names as the owner's model).
        pre: ``theta_pre``.
        key: The owner's key.
        aligned: The suspect was aligned to ``pre`` (:func:`~lightning_mergeguard.ownership.alignment.align_to_base`):
            remove from its task vector the directions a scale estimate's error lies along (each matrix's base rows
            and columns) before testing.
        weighting: How the keyed tensors' statistics are combined. ``"pooled"`` (the default, and what every
            committed figure uses) sums every weight's term alike. ``"snr"`` weighs each tensor by the key signal it
            would carry over the suspect's variance in it, floored at the release's own variance. Both are exact
            Hoeffding bounds (the weights depend on the suspect and the key's public part, never on the signs), but
            ``"snr"`` assumes every tensor carries the same share of the key: measured on the vision track
            (``benchmarks/key_weighting.py``) it gains on owner-heavy merges that were caught anyway, leaves the
            repaired Model Stock merge as open as before, and loses layer-wise merges under noise, whose keyless
            tensors it favours. Prefer ``"pooled"``.

    Returns:
        A :class:`KeyTestResult`.

    Raises:
        ValueError: If the suspect or ``pre`` lacks keyed tensors or has other shapes (another architecture), or
            has non-finite weights.

    Example:
        >>> pre = {"w": torch.zeros(32, 32)}
        >>> keyed, key = embed_weight_key({"w": torch.randn(32, 32)}, pre, secret=7)
        >>> weight_key_test(pre, pre, key).p_value, weight_key_test(keyed, pre, key).p_value < 1e-6
        (1.0, True)
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    _check_suspect(suspect, pre, key)
    # per keyed tensor: (sum of sign * statistic, its variance, the release's signal, the release's own variance)
    dense_parts: list[tuple[float, float, float, float]] = []
    sub_parts: list[tuple[float, float, float, float]] = []
    for name in key.names:
        s, p = suspect[name], pre[name]
        u, v = key.bases[name]
        tau = _matrix(s.double() - p.double().to(s.device)).to(torch.float64)
        if not torch.isfinite(tau).all():
            raise ValueError(f"the suspect's {name!r} has non-finite weights")
        if aligned:
            tau = _without_base_directions(tau, _matrix(p.double()))
        alpha, rms = key.scales[name]
        m = tau / rms
        drawn = key.origin.get(name, name)
        dense = _signs(key.secret, "dense", drawn, tuple(tau.shape)).to(m)
        dense_parts.append((float((dense * m).sum()), float(m.square().sum()), key.dense_signal[name], m.numel()))
        r = u.shape[1]
        proj = (u.to(m).T @ tau @ v.to(m)) / alpha
        proj.fill_diagonal_(0.0)
        k = _subspace_signs(key.secret, drawn, r).to(proj)
        sub_parts.append((float((k * proj).sum()), float(proj.square().sum()), r * (r - 1), r * (r - 1)))
    (z_dense, share_dense), (z_sub, share_sub) = (_combine(parts, weighting) for parts in (dense_parts, sub_parts))
    p = bonferroni([hoeffding_tail(z_dense), hoeffding_tail(z_sub)])
    log10_p = min(0.0, math.log10(2.0) + min(log10_hoeffding_tail(z_dense), log10_hoeffding_tail(z_sub)))
    return KeyTestResult(
        p_value=p,
        log10_p=log10_p,
        z_dense=z_dense,
        z_subspace=z_sub,
        share_dense=share_dense,
        share_subspace=share_sub,
        tensors=len(key.names),
    )


@torch.no_grad()
def embed_weight_key_(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    path: str | os.PathLike[str] | None = None,
    secret: int | None = None,
    **settings: Any,
) -> WeightKey:
    """:func:`embed_weight_key` in place on live parameters (one tensor at a time), saving the key to ``path``.

    What :class:`~lightning_mergeguard.MergeGuardCallback` and ``mergeguard-protect`` run after stage 2.

    Args:
        params: ``name -> parameter`` of the model to release (changed in place).
        reference: ``name -> theta_pre`` tensor for those names.
        path: Where to write the key (``None``: not written; the caller keeps the returned key).
        secret: The sign seed (``None``: 63 random bits; every process of a distributed run must pass the same).
        **settings: ``rank``, ``strength`` (see :func:`embed_weight_key`).

    Returns:
        The key.

    Raises:
        ValueError: As :func:`embed_weight_key`.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(16, 16))
        >>> before = w.detach().clone()
        >>> key = embed_weight_key_({"w": w}, {"w": torch.zeros(16, 16)}, secret=3)
        >>> bool((w != before).any()), key.names
        (True, ['w'])
    """
    state = {n: p.detach() for n, p in params.items() if n in reference}
    keyed, key = embed_weight_key(state, reference, secret=secret, **settings)
    for name in key.names:
        params[name].copy_(keyed[name])
    if path is not None:
        key.save(path)
    return key


@torch.no_grad()
def embed_key_checked(
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    path: str | os.PathLike[str] | None,
    metric: Any,
    secret: int | None = None,
    strength: float = DEFAULT_STRENGTH,
    lowest: float | None = None,
    formats: Callable[[], Mapping[str, float]] | None = None,
    format_lowest: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Embed a key in place (:func:`embed_weight_key_`), score the model, and write the key to ``path``.

    The guard rail counts the key's cost: while the score is below ``lowest`` (the score stage 2 started from, less
    its tolerance) the key is re-keyed at half its strength (:func:`restrength_weight_key`: the same secret and
    bases, one validation pass each), down to :data:`MIN_STRENGTH`. Each step halves what the key test reads in a
    merge, so the report says which strength was kept.

    Args:
        params: ``name -> parameter`` of the model to release (changed in place).
        reference: ``name -> theta_pre`` tensor for those names.
        path: Where to write the key (``None``: not written, e.g. on ranks other than zero).
        metric: ``() -> score`` of the live weights, in points (higher is better).
        secret: The sign seed (``None``: 63 random bits; every process of a distributed run must pass the same).
        strength: The strength asked for.
        lowest: The lowest score the release may have (``None``: no check).
        formats: ``() -> {format: score}`` of the live weights in the formats users deploy (``None``: full
            precision only); scored with every try.
        format_lowest: The lowest score the release may have in each of those formats.

    Returns:
        The report entry: ``file``, ``tensors``, ``strength`` (kept), ``requested_strength``, ``rank``,
        ``score_after_key`` (``metric()`` with the kept key), ``tries`` (``[strength, score]`` per pass, with
        ``{format: score}`` third when ``formats`` is given), ``within_tolerance`` (``False`` when even
        :data:`MIN_STRENGTH` costs more than allowed: see :func:`key_cost_warning`) and, with ``formats``,
        ``deployed_after_key`` and ``deployed_lowest``.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(16, 16))
        >>> entry = embed_key_checked({"w": w}, {"w": torch.zeros(16, 16)}, None, lambda: 90.0, secret=3, lowest=89.0)
        >>> entry["strength"], entry["within_tolerance"]
        (0.1, True)
    """
    floors = dict(format_lowest or {})

    def score(strength_now: float) -> list[Any]:
        entry: list[Any] = [strength_now, float(metric())]
        if formats is not None:
            entry.append({f: float(v) for f, v in formats().items()})
        return entry

    def fits(entry: list[Any]) -> bool:
        in_formats = entry[2] if len(entry) > 2 else {}
        short = [f for f, low in floors.items() if f in in_formats and in_formats[f] < low]
        return (lowest is None or entry[1] >= lowest) and not short

    key = embed_weight_key_(params, reference, secret=secret, strength=strength)
    tries = [score(key.strength)]
    while not fits(tries[-1]) and key.strength / 2 >= MIN_STRENGTH:
        state = {n: params[n].detach() for n in key.names}
        keyed, key = restrength_weight_key(state, reference, key, key.strength / 2)
        for name in key.names:
            params[name].copy_(keyed[name])
        tries.append(score(key.strength))
    if path is not None:
        key.save(path)
    return {
        "file": None if path is None else os.fspath(path),
        "tensors": len(key.names),
        "strength": key.strength,
        "requested_strength": float(strength),
        "rank": DEFAULT_RANK,
        "score_after_key": tries[-1][1],
        "tries": tries,
        "within_tolerance": fits(tries[-1]),
        **({"deployed_after_key": tries[-1][2], "deployed_lowest": floors} if formats is not None else {}),
    }


def key_cost_warning(entry: Mapping[str, Any], before: float, tolerance: float) -> str | None:
    """What to tell the owner about the key's cost (``entry``: :func:`embed_key_checked`'s), or ``None``.

    Example:
        >>> entry = {"strength": 0.05, "requested_strength": 0.1, "score_after_key": 89.5, "within_tolerance": True}
        >>> key_cost_warning(entry, 90.0, 1.0).split(" to keep")[0]
        'the ownership key was weakened to strength 0.05 (asked: 0.1)'
    """
    drop = before - entry["score_after_key"]
    if not entry.get("within_tolerance", True):
        lows = entry.get("deployed_lowest") or {}
        in_formats = entry.get("deployed_after_key") or {}
        short = ", ".join(
            f"{f} {v:.1f} (lowest allowed {lows[f]:.1f})" for f, v in in_formats.items() if f in lows and v < lows[f]
        )
        return (
            f"the ownership key costs {drop:.2f} points of the own score with stage 2"
            + (f" and leaves {short}" if short else "")
            + f", more than the tolerance ({tolerance:g}) even at strength {entry['strength']:g}; the release "
            "keeps it (merges stay traceable), but validate on more data or raise the tolerance"
        )
    if entry["strength"] < entry.get("requested_strength", entry["strength"]):
        return (
            f"the ownership key was weakened to strength {entry['strength']:g} (asked: "
            f"{entry['requested_strength']:g}) to keep the own score within the tolerance: stage 2 and the key cost "
            f"{drop:.2f} of {tolerance:g} points; the key test reads proportionally less in a merge"
        )
    return None

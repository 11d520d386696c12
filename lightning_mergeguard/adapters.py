"""A LoRA/PEFT-adapted model seen as the weights a merge combines: ``W + B @ A * scaling`` under the base's names.

A merge of LoRA fine-tunes combines their effective weights, not their ``A`` and ``B`` factors. :class:`LoraView`
gives the callbacks that view of a live PEFT model: the base model's parameter names (``.base_layer``,
``base_model.model.`` and ``modules_to_save.<adapter>`` removed), the pretrained tensors (``theta_pre``: the frozen
base weights, and the original copy of a module PEFT trains in full), and a context in which the model's forward
runs on merged weights that can be overwritten and are restored bit for bit on exit. The maths of stage 1 and the
re-factoring of a perturbed weight back into a rank-``r`` adapter are pure functions of tensors.

Example:
    >>> from peft import LoraConfig, get_peft_model  # doctest: +SKIP
    >>> model = get_peft_model(base_lm, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> view = LoraView(model)  # doctest: +SKIP
    >>> with view.merged():  # doctest: +SKIP
    ...     effective = {n: p.detach().clone() for n, p in view.params.items()}
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LoraPair", "LoraView", "factor_update", "is_adapted", "lora_redistribution_grad_"]

_ADAPTER_PARAM = re.compile(r"(^|\.)(lora_[A-Za-z_]+|original_module)(\.|$)")


def _lora_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Modules with LoRA factors (PEFT's ``LoraLayer``: ``lora_A``/``lora_B`` or embedding variants)."""
    return {
        n: m
        for n, m in module.named_modules()
        if (hasattr(m, "lora_A") and hasattr(m, "lora_B")) or hasattr(m, "lora_embedding_A")
    }


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA/PEFT adapter layers.

    Example:
        >>> is_adapted(nn.Linear(2, 2))
        False
    """
    return bool(_lora_modules(module))


def base_name(name: str) -> str:
    """The base model's name of a PEFT parameter name.

    Example:
        >>> base_name("model.base_model.model.layers.0.q_proj.base_layer.weight")
        'model.layers.0.q_proj.weight'
        >>> base_name("base_model.model.lm_head.modules_to_save.default.weight")
        'lm_head.weight'
    """
    name = name.replace("base_model.model.", "", 1)
    name = re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", name)
    return name.replace(".base_layer.", ".")


@dataclass
class LoraPair:
    """One adapted weight: its LoRA factors and how they combine (``delta = B @ A * scaling``, maybe transposed)."""

    a: nn.Parameter
    b: nn.Parameter
    scaling: float
    transpose: bool
    weight_numel: int

    def delta(self) -> Tensor:
        """``B @ A * scaling`` in the base weight's layout (detached)."""
        d = (self.b.detach() @ self.a.detach()) * self.scaling
        return d.T if self.transpose else d


class LoraView:
    """A live PEFT LoRA model as the weights a merge combines.

    Args:
        module: A module holding PEFT LoRA layers (a ``PeftModel``, or a LightningModule wrapping one).

    Attributes:
        params: Base name -> the parameter holding that weight in the base layout (the frozen base weight of an
            adapted layer, the trained copy of a module PEFT trains in full, every other floating parameter as is).
            Inside :meth:`merged` the adapted ones hold ``W + B @ A * scaling``.
        pairs: Base name -> :class:`LoraPair` of each adapted weight.

    Raises:
        ValueError: DoRA, several active adapters, or a layer type whose update is not ``B @ A`` (convolutions).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.layers = _lora_modules(module)
        if not self.layers:
            raise ValueError("LoraView: the module has no LoRA layers")
        self.pairs: dict[str, LoraPair] = {}
        self._base_weights: dict[str, nn.Parameter] = {}
        for prefix, layer in self.layers.items():
            active = list(getattr(layer, "active_adapters", None) or ["default"])
            if len(active) != 1:
                raise ValueError(f"LoraView: layer {prefix!r} has {len(active)} active adapters; activate exactly one")
            adapter = active[0]
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise ValueError(f"LoraView: layer {prefix!r} uses DoRA, whose update is not B @ A; not supported")
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
            weight = base.weight
            if not weight.is_floating_point():
                # QLoRA: a bitsandbytes 4-/8-bit base stores packed integers. A merge combines W + B @ A * s in
                # full precision, and PEFT's merge() into such a layer re-quantizes, so neither the probe nor
                # stage 2 could restore the base weights bit for bit: refuse it by name.
                raise ValueError(
                    f"LoraView: layer {prefix!r} has a quantized base weight ({type(weight).__name__}, "
                    f"{weight.dtype}; QLoRA / bitsandbytes): merges combine full-precision weights, so this is not "
                    "supported; train the adapter on a bf16/fp32 base, or merge it into a full-precision copy of the "
                    "base and protect that with mergeguard-protect"
                )
            if adapter in getattr(layer, "lora_embedding_A", {}):
                a, b, transpose = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], True
            elif adapter in layer.lora_A:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                transpose = bool(getattr(layer, "fan_in_fan_out", False))
                if a.dim() != 2 or weight.dim() != 2:
                    raise ValueError(f"LoraView: layer {prefix!r} is not a linear/embedding LoRA (conv LoRA?)")
            else:
                continue  # this layer has no weights for the active adapter
            name = base_name(f"{prefix}.weight")
            self.pairs[name] = LoraPair(a, b, float(layer.scaling[adapter]), transpose, weight.numel())
            self._base_weights[name] = weight
        self.params: dict[str, nn.Parameter] = {}
        self._originals: dict[str, nn.Parameter] = {}
        for n, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if ".original_module." in n:
                self._originals[base_name(n.replace(".original_module.", ".modules_to_save.x."))] = p
                continue
            if _ADAPTER_PARAM.search(n):
                continue
            self.params[base_name(n)] = p
        missing = set(self.pairs) - set(self.params)
        if missing:
            raise ValueError(f"LoraView: adapted weights {sorted(missing)[:3]} not found among the parameters")

    def base_tensors(self) -> dict[str, Tensor]:
        """``theta_pre`` for every name of :attr:`params` (outside :meth:`merged`): base weights, original copies."""
        return {n: self._originals.get(n, p) for n, p in self.params.items()}

    def trained_names(self) -> list[str]:
        """Names whose weights training changes: the adapted weights and the modules PEFT trains in full."""
        return [n for n, p in self.params.items() if n in self.pairs or p.requires_grad]

    @contextmanager
    def merged(self) -> Iterator[dict[str, nn.Parameter]]:
        """Merge each adapter into its base weight for the duration; restore the base weights bit for bit on exit.

        Inside, the model's forward runs on the merged weights (PEFT skips merged adapters) and :attr:`params` may
        be overwritten (by a probe's merges, by stage 2); on exit the base weights are restored exactly (no
        ``W + d - d`` rounding, which bf16 base weights would not survive) and the adapters unmerged.
        """
        saved = {n: w.detach().clone() for n, w in self._base_weights.items()}
        done = []
        try:
            with torch.no_grad():
                for layer in self.layers.values():
                    if hasattr(layer, "merge") and not getattr(layer, "merged", False):
                        layer.merge()
                        done.append(layer)
            yield self.params
        finally:
            with torch.no_grad():
                for layer in done:
                    layer.unmerge()
                for n, w in self._base_weights.items():
                    w.copy_(saved[n])

    def set_update(self, name: str, update: Tensor, rank: int | None = None) -> float:
        """Make the adapter of ``name`` express ``update`` (``W_new - W``) as well as rank ``r`` allows.

        Returns:
            The relative residual ``||update - B' @ A' * s|| / ||update||`` of the re-factoring.
        """
        pair = self.pairs[name]
        target = update.T if pair.transpose else update
        a, b, residual = factor_update(target, pair.a.shape[0] if rank is None else rank, pair.scaling)
        with torch.no_grad():
            pair.a.copy_(a.to(pair.a.dtype))
            pair.b.copy_(b.to(pair.b.dtype))
        return residual


def factor_update(update: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` factors ``(A, B)`` with ``B @ A * scaling ≈ update`` (truncated SVD), and the residual.

    The singular values are split evenly between the factors (``B = U sqrt(S/s)``, ``A = sqrt(S/s) V^T``), so
    neither factor dominates the other's gradient if training goes on.

    Example:
        >>> u = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 4.0]))
        >>> a, b, res = factor_update(u, rank=1, scaling=2.0)
        >>> torch.allclose(b @ a * 2.0, u, atol=1e-5), res < 1e-6
        (True, True)
    """
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    work = update.detach().float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    if k < rank:  # a rank larger than the matrix allows: pad with zeros (the adapter's shape is kept)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    total = float(work.norm())
    residual = float((work - b @ a * scaling).norm()) / total if total > 0 else 0.0
    return a, b, residual


@torch.no_grad()
def lora_redistribution_grad_(
    pairs: Mapping[str, LoraPair],
    *,
    alpha: float,
    normalize: bool = False,
    compute_value: bool = True,
    only: Collection[Tensor] | None = None,
) -> float | None:
    """Stage 1 on adapters: add the gradient of ``alpha * sum_l c_l ||B_l A_l s_l||^2`` to ``A.grad`` and ``B.grad``.

    The term is the L2 redistribution term on each adapted weight's task vector (its LoRA update), as for a full
    fine-tune. With ``D = B A s``: ``dR/dA = 2 alpha c s B^T D`` and ``dR/dB = 2 alpha c s D A^T``, computed through
    the ``r x r`` Gram matrices ``B^T B`` and ``A A^T`` so the update is never materialized. ``c = 1/numel(W)``
    when ``normalize``. ``only``: the factors that get the gradient (those an optimizer steps; default every
    factor with a gradient); the value always covers every pair.

    Example:
        >>> a = nn.Parameter(torch.tensor([[1.0, 0.0]])); b = nn.Parameter(torch.tensor([[2.0]]))
        >>> a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        >>> lora_redistribution_grad_({"w": LoraPair(a, b, 1.0, False, 2)}, alpha=0.5)
        2.0
        >>> a.grad, b.grad
        (tensor([[4., 0.]]), tensor([[2.]]))
    """
    value = 0.0
    ids = None if only is None else {id(t) for t in only}
    for pair in pairs.values():
        grad_a, grad_b = (p.grad is not None and (ids is None or id(p) in ids) for p in (pair.a, pair.b))
        if not (grad_a or grad_b or compute_value):
            continue
        a, b = pair.a.detach().float(), pair.b.detach().float()
        c = 1.0 / pair.weight_numel if normalize else 1.0
        k = 2.0 * alpha * c * pair.scaling**2
        gram_b, gram_a = b.T @ b, a @ a.T  # r x r
        if grad_a:
            pair.a.grad.add_((k * (gram_b @ a)).to(pair.a.grad.dtype))
        if grad_b:
            pair.b.grad.add_((k * (b @ gram_a)).to(pair.b.grad.dtype))
        if compute_value:  # ||B A||_F^2 = trace(B^T B A A^T)
            value += alpha * c * pair.scaling**2 * float((gram_b * gram_a).sum())
    return value if compute_value else None

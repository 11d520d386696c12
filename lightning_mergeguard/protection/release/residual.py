"""Residual-stream permutation: a re-parameterisation that layer-wise merges cannot line up with other models.

A pre-norm transformer reads its residual stream through norms (LayerNorm and RMSNorm treat the channels alike, so
permuting their input and their weight and bias permutes their output) and writes to it through output
projections. Permuting the stream's channels with one permutation everywhere (the embeddings' channels, every
norm's weight and bias, the input columns of every reader, the output rows and biases of every writer, the final
norm and the head's input columns) leaves the function unchanged, up to floating-point summation order.

What it adds to :mod:`~lightning_mergeguard.protection.release.symmetry` (``amplify``): those symmetries act inside each
block, so a merge that takes whole blocks from the owner's model (a mergekit ``passthrough`` frankenmerge: the
owner's lower layers under a partner's upper ones) computes what it computed without them; on the vision grid such
a merge kept 88.5% of the owner's task on an amplified model. Under a stream permutation the owner's blocks and a
partner's read and write the stream in different channel orders, so stacking them, like averaging them entry by
entry, mixes mismatched channels.

What it does not resist: fine-tuning moves the embeddings little, so matching their channels against
``theta_pre``'s finds the permutation (:func:`estimate_permutation`, the attack the benchmark runs), as
:func:`~lightning_mergeguard.protection.release.symmetry.realign` finds amplify's scales. Like ``amplify`` it sits on
top of a stage-2 perturbation, which is what remains after the attack.

Example:
    >>> from torch import nn
    >>> find_residual_stream(nn.Linear(2, 2)) is None  # not a recognised model
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ResidualStream",
    "check_permute_residual",
    "draw_permutation",
    "estimate_permutation",
    "find_residual_stream",
    "permute_residual",
    "permute_residual_",
    "unpermute_residual",
]


@dataclass(frozen=True)
class ResidualStream:
    """The tensors that carry a model's residual stream, and the axis along which each holds its channels.

    Attributes:
        width: The number of channels.
        axes: ``(parameter name, dim)`` pairs, names as in ``module.named_parameters()``.
        anchors: The names whose channels identify the stream against ``theta_pre`` (the embeddings): what
            :func:`estimate_permutation` matches.
    """

    width: int
    axes: tuple[tuple[str, int], ...]
    anchors: tuple[str, ...]


def _norm_axes(prefix: str, norm: nn.Module, width: int) -> list[tuple[str, int]]:
    """A norm over the stream's channels: its weight and bias (neither when it has no affine parameters)."""
    axes = []
    for attr in ("weight", "bias"):
        p = getattr(norm, attr, None)
        if isinstance(p, Tensor):
            if p.dim() != 1 or p.numel() != width:
                raise _NotRecognisedError
            axes.append((f"{prefix}{attr}", 0))
    return axes


class _NotRecognisedError(Exception):
    """A module that looked like a known layout and is not one."""


def _linear_axes(prefix: str, linear: nn.Module, width: int, dim: int) -> list[tuple[str, int]]:
    """A reader (``dim=1``: its input columns) or a writer (``dim=0``: its output rows and bias)."""
    if not isinstance(linear, nn.Linear) or (linear.in_features if dim == 1 else linear.out_features) != width:
        raise _NotRecognisedError
    axes = [(f"{prefix}weight", dim)]
    if dim == 0 and linear.bias is not None:
        axes.append((f"{prefix}bias", 0))
    return axes


_LLAMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
"""A decoder layer's norms over the stream (Gemma 2 adds the last two, around its MLP)."""


def _llama_stream(prefix: str, model: nn.Module, head: nn.Module, head_name: str) -> ResidualStream:
    emb = model.embed_tokens
    if not isinstance(emb, nn.Embedding):
        raise _NotRecognisedError
    width = emb.embedding_dim
    axes = [(f"{prefix}embed_tokens.weight", 1)]
    for i, layer in enumerate(model.layers):
        p = f"{prefix}layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        for norm in _LLAMA_NORMS:
            if hasattr(layer, norm):
                axes += _norm_axes(f"{p}{norm}.", getattr(layer, norm), width)
        for x in "qkv":
            axes += _linear_axes(f"{p}self_attn.{x}_proj.", getattr(attn, f"{x}_proj", None), width, 1)
        axes += _linear_axes(f"{p}self_attn.o_proj.", getattr(attn, "o_proj", None), width, 0)
        for x in ("gate", "up"):
            axes += _linear_axes(f"{p}mlp.{x}_proj.", getattr(mlp, f"{x}_proj", None), width, 1)
        axes += _linear_axes(f"{p}mlp.down_proj.", getattr(mlp, "down_proj", None), width, 0)
    axes += _norm_axes(f"{prefix}norm.", model.norm, width)
    if head.weight is not emb.weight:  # a tied head is the embedding, permuted along the same axis
        axes += _linear_axes(f"{head_name}.", head, width, 1)
    return ResidualStream(width, tuple(axes), (f"{prefix}embed_tokens.weight",))


def _open_clip_stream(prefix: str, visual: nn.Module) -> ResidualStream:
    if getattr(visual, "attn_pool", None) is not None or not isinstance(getattr(visual, "proj", None), Tensor):
        raise _NotRecognisedError  # an attentional pooler, or no projection: readers this layout does not know
    width = visual.class_embedding.numel()
    conv = visual.conv1
    axes = [(f"{prefix}conv1.weight", 0), (f"{prefix}class_embedding", 0), (f"{prefix}positional_embedding", 1)]
    if getattr(conv, "bias", None) is not None:
        axes.append((f"{prefix}conv1.bias", 0))
    axes += _norm_axes(f"{prefix}ln_pre.", visual.ln_pre, width)
    for i, block in enumerate(visual.transformer.resblocks):
        p = f"{prefix}transformer.resblocks.{i}."
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.embed_dim != width:
            raise _NotRecognisedError
        axes += _norm_axes(f"{p}ln_1.", block.ln_1, width)
        axes.append((f"{p}attn.in_proj_weight", 1))
        axes += _linear_axes(f"{p}attn.out_proj.", attn.out_proj, width, 0)
        axes += _norm_axes(f"{p}ln_2.", block.ln_2, width)
        axes += _linear_axes(f"{p}mlp.c_fc.", block.mlp.c_fc, width, 1)
        axes += _linear_axes(f"{p}mlp.c_proj.", block.mlp.c_proj, width, 0)
        for ls in ("ls_1", "ls_2"):  # LayerScale multiplies each channel of a block's output
            gamma = getattr(getattr(block, ls, None), "gamma", None)
            if isinstance(gamma, Tensor):
                axes.append((f"{p}{ls}.gamma", 0))
    axes += _norm_axes(f"{prefix}ln_post.", visual.ln_post, width)
    axes.append((f"{prefix}proj", 0))
    return ResidualStream(width, tuple(axes), (f"{prefix}conv1.weight", f"{prefix}positional_embedding"))


def find_residual_stream(module: nn.Module) -> ResidualStream | None:
    """The residual stream of ``module``'s one recognised transformer, or ``None``.

    Recognised: a Hugging Face Llama-style causal LM (``model.embed_tokens``, ``model.layers`` of
    ``input_layernorm`` / ``self_attn.{q,k,v,o}_proj`` / ``post_attention_layernorm`` / ``mlp.{gate,up,down}_proj``,
    ``model.norm`` and an ``lm_head``, tied or not) and an open_clip ``VisionTransformer`` with its ``proj`` (the
    stream's readers past it are the projection's output, which the permutation leaves alone). A model holding two
    such transformers, or a layout that differs anywhere (another reader of the stream, such as an attentional
    pooler), gives ``None``: its readers are not all known. Sharded or LoRA-wrapped layers are not recognised.

    Example:
        >>> find_residual_stream(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))) is None
        True
    """
    found: list[ResidualStream] = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        try:
            head = getattr(sub, "lm_head", None)
            inner = getattr(sub, "model", None)
            if isinstance(head, nn.Linear) and all(hasattr(inner, x) for x in ("embed_tokens", "layers", "norm")):
                found.append(_llama_stream(f"{prefix}model.", inner, head, f"{prefix}lm_head"))
            elif all(hasattr(sub, x) for x in ("conv1", "class_embedding", "positional_embedding", "transformer")):
                found.append(_open_clip_stream(prefix, sub))
        except (_NotRecognisedError, AttributeError):
            return None
    if len(found) != 1:
        return None
    params = dict(module.named_parameters())
    return found[0] if all(n in params for n, _ in found[0].axes) else None


def check_permute_residual(value: object, amplify: float | None) -> bool:
    """``value`` if it is a bool and, when true, ``amplify`` is set; else a ``ValueError`` saying what to pass.

    Example:
        >>> check_permute_residual(True, 1000.0)
        True
    """
    if not isinstance(value, bool):
        raise ValueError(f"permute_residual must be True or False, got {value!r}")
    if value and amplify is None:
        raise ValueError(
            "permute_residual is part of amplify's re-parameterisation: set amplify too (e.g. amplify=1000); alone, "
            "a permutation leaves owner-weighted merges open"
        )
    return value


def draw_permutation(width: int, seed: int = 0) -> Tensor:
    """A random permutation of ``range(width)`` that moves every channel (for ``width > 1``), reproducibly.

    Example:
        >>> sorted(draw_permutation(5).tolist())
        [0, 1, 2, 3, 4]
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(width, generator=gen)
    if width > 1:  # a fixed channel would line up with every other model's: rotate those few among themselves
        fixed = (perm == torch.arange(width)).nonzero().flatten()
        if len(fixed) == 1:  # swap it with its neighbour's target
            i = int(fixed[0])
            j = (i + 1) % width
            perm[i], perm[j] = perm[j].clone(), perm[i].clone()
        elif len(fixed) > 1:
            perm[fixed] = perm[fixed.roll(1)]
    return perm


def _checked(stream: ResidualStream, perm: Tensor) -> Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (stream.width,) or not torch.equal(perm.sort().values, torch.arange(stream.width)):
        raise ValueError(f"a residual permutation must be a permutation of range({stream.width}), got {perm}")
    return perm


def _reordered(t: Tensor, dim: int, perm: Tensor) -> Tensor:
    """``t`` with its slices along ``dim`` taken in the order ``perm`` (a new tensor, on ``t``'s device)."""
    return t.index_select(dim, perm.to(t.device))


def permute_residual(state: Mapping[str, Tensor], stream: ResidualStream, perm: Tensor) -> dict[str, Tensor]:
    """A new state dict whose residual-stream channel ``i`` is the old channel ``perm[i]``.

    Args:
        state: Parameter name -> tensor (not changed; every name of ``stream.axes`` must be there).
        stream: The stream (:func:`find_residual_stream`).
        perm: A permutation of ``range(stream.width)``.

    Returns:
        The permuted state; tensors off the stream are the same objects.

    Example:
        >>> s = ResidualStream(3, (("emb", 1), ("out", 0)), ("emb",))
        >>> permute_residual({"emb": torch.eye(3), "out": torch.arange(3.0)}, s, torch.tensor([2, 0, 1]))["out"]
        tensor([2., 0., 1.])
    """
    perm = _checked(stream, perm)
    out = dict(state)
    for name, dim in stream.axes:
        if name not in state:
            raise KeyError(f"the residual stream names parameter {name!r}, which the state does not hold")
        out[name] = _reordered(state[name], dim, perm)
    return out


def permute_residual_(params: Mapping[str, Tensor], stream: ResidualStream, perm: Tensor) -> None:
    """:func:`permute_residual` in place on live parameters, one tensor at a time (no copy of the model).

    Example:
        >>> s = ResidualStream(3, (("out", 0),), ("out",))
        >>> w = torch.arange(3.0)
        >>> permute_residual_({"out": w}, s, torch.tensor([2, 0, 1])); w
        tensor([2., 0., 1.])
    """
    perm = _checked(stream, perm)
    with torch.no_grad():
        for name, dim in stream.axes:
            params[name].copy_(_reordered(params[name], dim, perm))


def unpermute_residual(state: Mapping[str, Tensor], stream: ResidualStream, perm: Tensor) -> dict[str, Tensor]:
    """Undo :func:`permute_residual` with the same ``perm``.

    Example:
        >>> s = ResidualStream(3, (("out", 0),), ("out",))
        >>> p = torch.tensor([2, 0, 1])
        >>> unpermute_residual(permute_residual({"out": torch.arange(3.0)}, s, p), s, p)["out"]
        tensor([0., 1., 2.])
    """
    return permute_residual(state, stream, torch.argsort(_checked(stream, perm)))


def estimate_permutation(state: Mapping[str, Tensor], anchor: Mapping[str, Tensor], stream: ResidualStream) -> Tensor:
    """The permutation that maps ``anchor``'s stream onto ``state``'s, matched on the embeddings' channels.

    The attack on :func:`permute_residual`: each channel's embedding weights (token embeddings; patch filters
    and position embeddings) barely move in fine-tuning, so channel ``i`` of ``state`` is the ``anchor`` channel
    it correlates with best (a linear assignment when SciPy is installed, so the result is always a permutation).

    Example:
        >>> s = ResidualStream(4, (("emb", 1),), ("emb",))
        >>> base = {"emb": torch.randn(50, 4, generator=torch.Generator().manual_seed(0))}
        >>> p = torch.tensor([3, 0, 1, 2])
        >>> estimate_permutation(permute_residual(base, s, p), base, s).tolist()
        [3, 0, 1, 2]
    """
    axes = dict(stream.axes)

    def features(src: Mapping[str, Tensor]) -> Tensor:
        cols = [src[n].double().movedim(axes[n], 0).reshape(stream.width, -1).cpu() for n in stream.anchors]
        f = torch.cat(cols, dim=1)
        f = f - f.mean(dim=1, keepdim=True)
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-30)

    sim = features(state) @ features(anchor).T  # sim[i, j]: state's channel i against anchor's channel j
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - SciPy comes with scikit-learn here
        return sim.argmax(dim=1)
    _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)

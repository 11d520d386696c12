"""Models whose LM head is tied to the input embeddings, saved with and without a copy of the head.

With ``tie_word_embeddings``, Hugging Face's ``save_pretrained`` writes the embedding matrix once and leaves
``lm_head.weight`` out; other tools (conversions, some trainers) write both. Two fine-tunes of one tied base can
then disagree on that one key although they are the same architecture. :func:`reconcile_tied_heads` lines them up
with the reference (the base, or the first model): a head that is an exact copy of the model's own embeddings is
hidden where the reference has none, a missing head is read from the embeddings where the reference has one, and a
head that differs from its embeddings (an untied fine-tune) is refused by name, since the merge could not keep it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from typing_extensions import override

from lightning_mergeguard.errors import IncompatibleModelsError
from lightning_mergeguard.merging.sources import RenamedSource, WeightSource

__all__ = ["HEAD", "TiedHeadView", "reconcile_tied_heads"]

HEAD = "lm_head.weight"
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


class TiedHeadView(RenamedSource):
    """A source seen with some keys hidden and others read under another name (the rest is ``source`` itself).

    An aliased head keeps its own name for parameter filters (``source_key``), as mergekit resolves a tied head's
    settings by ``lm_head.weight`` while it reads the embeddings.

    Example:
        >>> from lightning_mergeguard.merging.sources import StateDictSource
        >>> src = StateDictSource({"model.embed_tokens.weight": torch.ones(2, 2)})
        >>> TiedHeadView(src, alias={HEAD: "model.embed_tokens.weight"}).keys()
        ['model.embed_tokens.weight', 'lm_head.weight']
    """

    def __init__(self, source: WeightSource, hide: Sequence[str] = (), alias: Mapping[str, str] | None = None) -> None:
        kept = {k: k for k in source.keys() if k not in set(hide)}
        super().__init__(source, {**kept, **(alias or {})})

    @override
    def source_key(self, key: str) -> str:
        return key


def _ties(sources: Sequence[WeightSource]) -> bool:
    """Whether the models' config (the first that has one) ties the head to the embeddings."""
    config = next((s.config for s in sources if s.config), None)
    return bool(config and config.get("tie_word_embeddings"))


def _embeddings(src: WeightSource, shape: tuple[int, ...]) -> str | None:
    found = [k for k in src.keys() if k.endswith(_EMBEDDINGS) and src.meta(k)[0] == shape]
    return found[0] if len(found) == 1 else None


def reconcile_tied_heads(reference: WeightSource, others: Sequence[WeightSource]) -> list[WeightSource]:
    """``others`` lined up with ``reference`` on a tied LM head; unchanged unless the config ties it.

    Raises:
        IncompatibleModelsError: A model's own head differs from its embeddings while the reference ties them
            (or keeps no head at all), so the merge could not keep that model's head.

    Example:
        >>> from lightning_mergeguard.merging.sources import StateDictSource
        >>> e = torch.ones(3, 2)
        >>> ref = StateDictSource({"model.embed_tokens.weight": e}, name="base")
        >>> ref.config = {"tie_word_embeddings": True}
        >>> copy = StateDictSource({"model.embed_tokens.weight": e, HEAD: e.clone()}, name="ft")
        >>> reconcile_tied_heads(ref, [copy])[0].keys()
        ['model.embed_tokens.weight']
    """
    if not others or not _ties([reference, *others]):
        return list(others)
    ref_keys = set(reference.keys())
    out: list[WeightSource] = []
    for src in others:
        keys = set(src.keys())
        if HEAD in keys and HEAD not in ref_keys:
            embed = _embeddings(src, src.meta(HEAD)[0])
            if embed is None or not torch.equal(src.get(HEAD), src.get(embed)):
                raise IncompatibleModelsError(
                    f"model {src.name!r} has its own {HEAD}, which is not a copy of its input embeddings, while "
                    f"{reference.name!r} ties its head to them (tie_word_embeddings, no {HEAD}): the merge cannot "
                    "keep that head"
                )
            src = TiedHeadView(src, hide=[HEAD])
        elif HEAD in ref_keys and HEAD not in keys:
            embed = _embeddings(src, reference.meta(HEAD)[0])
            if embed is not None:
                src = TiedHeadView(src, alias={HEAD: embed})
        out.append(src)
    return out

"""The ``README.md`` model card a merge writes into its output directory, as mergekit writes one by default."""

from __future__ import annotations

import yaml

from lightning_mergeguard.merging.config import MergeConfig
from lightning_mergeguard.merging.sources import is_hub_id

__all__ = ["model_card_text"]


def _hub_ids(models: list[str]) -> list[str]:
    """The references that name Hugging Face Hub models (``org/name``, not local paths), for the card's metadata."""
    out = []
    for ref in models:
        for part in ref.split("+"):  # BASE+ADAPTER
            name = part.split("@")[0]
            if is_hub_id(part) and name not in out:
                out.append(name)
    return out


def model_card_text(cfg: MergeConfig, name: str, config_yaml: str | None = None) -> str:
    """A model card: Hub metadata, the method, the models merged and the config (YAML), for ``name``.

    ``config_yaml``: the config as written beside the weights (``mergekit_config.yml``; default: ``cfg``'s YAML).

    Example:
        >>> cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "org/base",
        ...                              "models": [{"model": "org/ft", "parameters": {"weight": 0.5}}]})
        >>> text = model_card_text(cfg, "merged")
        >>> "- org/base" in text and "- org/ft" in text, "task_arithmetic merge method using org/base" in text
        (True, True)
    """
    models = [m.model for m in cfg.models]
    base = cfg.base_model
    hub = _hub_ids([base, *models] if base else models)
    metadata = {
        **({"base_model": hub} if hub else {}),
        "library_name": "transformers",
        "tags": ["mergekit", "merge", "lightning-mergeguard"],
    }
    merged = [m for m in models if m != base]
    listing = "\n".join(f"* {m}" for m in merged) or "* (the base model alone)"
    using = f" using {base} as a base" if base and cfg.method.needs_base else ""
    if base and not cfg.method.needs_base and base in models:
        using = f", with {base} merged as one of the models"
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False).strip()}\n---\n# {name}\n\n"
        "This is a merge of pre-trained models made with lightning-mergeguard's merge engine, which runs mergekit "
        "configurations.\n\n## Merge details\n### Merge method\n\n"
        f"This model was merged with the {cfg.method.name} merge method{using}: {cfg.method.description}.\n\n"
        f"### Models merged\n\n{listing}\n\n### Configuration\n\n"
        "The YAML configuration that produced this model:\n\n"
        f"```yaml\n{(config_yaml if config_yaml is not None else cfg.to_yaml()).strip()}\n```\n"
    )

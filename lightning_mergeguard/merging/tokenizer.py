"""mergekit's tokenizer settings for a merged model directory: ``tokenizer_source``, ``tokenizer``, ``chat_template``.

mergekit copies the base model's tokenizer by default; ``tokenizer_source: union`` (or a model) builds the output's
vocabulary from the models' and re-maps the embedding rows token by token, and ``chat_template`` sets the output
tokenizer's chat template. This engine merges tensors row for row, so it follows those settings where no row needs
re-mapping and refuses them, by name, where one would:

- ``tokenizer_source`` absent or ``base``: the base's tokenizer files (what mergekit copies);
- ``union``: the same, provided every model's vocabulary files equal the base's (the union is then that vocabulary);
- a model of the config: that model's tokenizer files, provided its vocabulary equals the base's;
- ``chat_template``: Jinja text is written to the output (``chat_template.jinja``, as ``transformers`` saves it);
  mergekit's named templates (``chatml``, ``auto``...) are not bundled here and are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_mergeguard.errors import ConfigError

__all__ = ["VOCABULARY_FILES", "chat_template_text", "tokenizer_directory", "write_chat_template"]

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
"""Files that define token ids: two tokenizers with the same bytes here number their tokens alike."""


def _source_setting(extra: Mapping[str, Any]) -> Any:
    tokenizer = extra.get("tokenizer")
    if tokenizer is None:
        return extra.get("tokenizer_source")
    if not isinstance(tokenizer, Mapping) or set(tokenizer) - {"source"}:
        raise NotImplementedError(
            f"tokenizer: {tokenizer!r}: only its 'source' is supported (added tokens and padding re-map embedding "
            "rows, which this engine does not do); use tokenizer_source, or mergekit"
        )
    return tokenizer.get("source")


def _vocabulary_differs(a: Path | None, b: Path | None) -> str | None:
    """The first vocabulary file whose bytes differ between directories ``a`` and ``b`` (``None``: same)."""
    if a is None or b is None:
        return None if a == b else "the weights' directory"
    for name in VOCABULARY_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            return name
    return None


def tokenizer_directory(
    extra: Mapping[str, Any], base_dir: Path | None, model_dirs: Mapping[str, Path | None]
) -> Path | None:
    """The directory whose tokenizer files the merged model takes, after checking the config's settings.

    Args:
        extra: The config's passthrough keys (:attr:`~lightning_mergeguard.merging.config.MergeConfig.extra`).
        base_dir: The base's (or reference model's) directory, ``None`` when its weights are not a directory.
        model_dirs: Each config model name -> its directory (``None`` for in-memory weights).

    Raises:
        ConfigError: ``tokenizer_source`` names no model of the config.
        NotImplementedError: A setting that needs embedding rows re-mapped (tokenizers that number tokens
            differently).

    Example:
        >>> tokenizer_directory({}, Path("base"), {"a": Path("a")})
        PosixPath('base')
    """
    source = _source_setting(extra)
    if source is None or source == "base":
        return base_dir
    if source == "union":
        for name, directory in model_dirs.items():
            differs = _vocabulary_differs(base_dir, directory)
            if differs is not None:
                raise NotImplementedError(
                    f"tokenizer_source: union of tokenizers that differ (model {name!r}: {differs}) re-maps embedding "
                    "rows token by token, which this engine does not do; use tokenizer_source: base, or mergekit"
                )
        return base_dir
    if not isinstance(source, str) or source not in model_dirs:
        raise ConfigError(
            f"tokenizer_source {source!r} is neither 'base', 'union' nor a model of the config ({sorted(model_dirs)})"
        )
    directory = model_dirs[source]
    differs = _vocabulary_differs(base_dir, directory)
    if differs is not None:
        raise NotImplementedError(
            f"tokenizer_source {source!r}: its vocabulary differs from the base's ({differs}), so the merged "
            "embedding rows would need re-mapping token by token, which this engine does not do; use mergekit"
        )
    return directory


def chat_template_text(extra: Mapping[str, Any]) -> str | None:
    """The Jinja chat template the config asks for (``None``: keep the copied tokenizer's).

    Example:
        >>> chat_template_text({"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})[:6]
        '{% for'
    """
    template = extra.get("chat_template")
    if template is None:
        return None
    if isinstance(template, str) and ("{{" in template or "{%" in template):
        return template
    raise NotImplementedError(
        f"chat_template: {template!r} names one of mergekit's bundled templates ('auto' picks the models' most "
        "common one), which this engine does not ship; give the template's Jinja text instead"
    )


def write_chat_template(out: Path, template: str) -> None:
    """Write ``template`` as the output tokenizer's chat template, replacing one the copied files carried."""
    from lightning_mergeguard.io import atomic_write_json, atomic_write_text

    atomic_write_text(out / "chat_template.jinja", template)
    config = out / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in data:  # the file takes precedence in transformers; keep one source of truth
            del data["chat_template"]
            atomic_write_json(config, data)

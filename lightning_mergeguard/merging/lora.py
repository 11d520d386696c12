"""LoRA fine-tunes as merge inputs: a PEFT adapter's update ``B @ A * scaling`` applied to its base, lazily.

A LoRA fine-tune is its base plus a low-rank update per adapted matrix. :class:`LoraSource` presents it to the merge
engine as an ordinary model (every tensor of the base, adapted ones updated), so every merge method and the probe
take LoRA fine-tunes as they take full ones; its task vector is exactly the adapter's update. mergekit's reference
syntax ``base_model_path+adapter_path`` opens one (see :func:`~lightning_mergeguard.merging.sources.open_source`).

Read: PEFT's ``adapter_config.json`` (``peft_type: LORA``; ``r``, ``lora_alpha``, ``use_rslora``, ``alpha_pattern``,
``fan_in_fan_out``) and ``adapter_model.safetensors`` (or ``adapter_model.bin``, loaded with ``weights_only=True``):
linear ``lora_A``/``lora_B`` (and ``lora_B.bias``), embedding ``lora_embedding_A``/``lora_embedding_B``, and full
tensors saved by ``modules_to_save``. DoRA, convolutions and other PEFT methods are refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_mergeguard.errors import IncompatibleModelsError, WeightsFileError
from lightning_mergeguard.merging.sources import (
    WeightSource,
    _load_pickle_weights,
    hub_directory,
    match_names,
    open_source,
    read_json,
    register_opener,
)

__all__ = ["LoraSource", "is_lora_adapter", "lora_delta", "split_lora_reference"]

_PREFIX = "base_model.model."
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB])$")


def lora_delta(a: Tensor, b: Tensor, scaling: float, *, transpose: bool = False) -> Tensor:
    """The update ``B @ A * scaling`` of one adapted matrix, in float32 (transposed for ``fan_in_fan_out`` layers).

    Example:
        >>> a, b = torch.ones(1, 3), torch.full((2, 1), 2.0)
        >>> lora_delta(a, b, 0.5)
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    delta = b.float() @ a.float()
    return (delta.T if transpose else delta) * scaling


def _id_of(reference: Any) -> str | None:
    """A model reference reduced to compare names: a Hub id ``org/name`` (no revision) or a folder's last name.

    Example:
        >>> _id_of("HuggingFaceTB/SmolLM2-135M@main"), _id_of("/cache/models--HuggingFaceTB--SmolLM2-135M/snapshots/ab")
        ('huggingfacetb/smollm2-135m', 'huggingfacetb/smollm2-135m')
    """
    if not reference:
        return None
    text = str(reference).strip().rstrip("/").partition("@")[0]
    for part in Path(text).parts:
        if part.startswith("models--"):  # a Hugging Face cache folder: models--org--name/snapshots/<hash>
            return part[len("models--") :].replace("--", "/", 1).lower()
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists():
        return text.lower()
    return Path(text).name.lower()


def is_lora_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (``adapter_config.json`` beside the adapter weights)."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def split_lora_reference(ref: str) -> tuple[str, str] | None:
    """Split mergekit's ``model+lora`` reference into ``(model, adapter)``; ``None`` for a plain path.

    Example:
        >>> split_lora_reference("plain/path") is None
        True
    """
    if "+" not in ref or Path(ref).exists():
        return None
    model, _, adapter = ref.rpartition("+")
    return model, adapter


class LoraSource(WeightSource):
    """A base model with a PEFT LoRA adapter applied, read tensor by tensor.

    Args:
        base: The base model (anything :func:`open_source` reads).
        adapter: The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        name: Name for messages.

    Raises:
        WeightsFileError: A missing or malformed adapter.
        NotImplementedError: DoRA, convolution LoRA or another PEFT method.
        IncompatibleModelsError: An adapter whose modules or shapes are not the base's.

    Example:
        >>> import json, tempfile, pathlib
        >>> from lightning_mergeguard.io import save_safetensors
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
        >>> save_safetensors(d / "adapter_model.safetensors", {
        ...     "base_model.model.lin.lora_A.weight": torch.ones(1, 2),
        ...     "base_model.model.lin.lora_B.weight": torch.ones(2, 1)})
        >>> LoraSource({"lin.weight": torch.zeros(2, 2)}, d).get("lin.weight")
        tensor([[2., 2.],
                [2., 2.]])
    """

    def __init__(self, base: Any, adapter: str | Path, name: str | None = None) -> None:
        self.adapter = Path(adapter)
        if not self.adapter.exists():  # mergekit's BASE+ADAPTER takes Hub ids for either part
            self.adapter = hub_directory(str(adapter)) or self.adapter
        self.base = open_source(base, name="LoRA base")
        self.name = name or f"{getattr(self.base, 'name', 'base')}+{self.adapter}"
        self.config = self.base.config
        self.directory = self.base.directory
        self.files = (*self.base.files, *sorted(self.adapter.glob("adapter_model.*")))
        cfg = self._read_config()
        declared = cfg.get("base_model_name_or_path")
        self.declared_base: str | None = str(declared) if declared else None
        """The base the adapter says it was trained on (``adapter_config.json``'s ``base_model_name_or_path``)."""
        weights = self._read_weights()
        self._fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self._updates: dict[str, tuple[Tensor, Tensor, bool]] = {}  # base key -> (A, B, is embedding)
        self._scaling: dict[str, float] = {}
        self._bias: dict[str, tuple[str, Tensor]] = {}  # base bias key -> (its weight's key, lora_B.bias)
        modules: dict[str, dict[str, Tensor]] = {}
        full: dict[str, Tensor] = {}
        for key, value in weights.items():
            stripped = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            m = _PART.match(stripped)
            if m is None:
                if "lora_" in stripped:
                    raise NotImplementedError(f"{self.adapter}: adapter tensor {key!r} is not a LoRA A/B matrix")
                # modules_to_save, or the embedding PEFT saves beside its LoRA ("base_layer"): a whole tensor
                full[stripped.replace(".base_layer.", ".")] = value
                continue
            modules.setdefault(m["module"], {})[m["part"]] = value
        base_keys = self.base.keys()
        for module, parts in modules.items():
            embedding = "lora_embedding_A" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
            b = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
            if a is None or b is None:
                raise WeightsFileError(f"{self.adapter}: module {module!r} has only one of LoRA's A and B matrices")
            if a.dim() != 2 or b.dim() != 2:
                raise NotImplementedError(
                    f"{self.adapter}: module {module!r} is a convolution LoRA ({a.dim()}-d A); only linear and "
                    "embedding layers are supported"
                )
            target = self._base_key(f"{module}.weight", base_keys)
            r = a.shape[0]
            alpha = self._pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            self._scaling[target] = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
            self._updates[target] = (a, b, embedding)
            shape, got = tuple(self.base.meta(target)[0]), tuple(self._delta(target).shape)
            if got != shape:
                raise IncompatibleModelsError(
                    f"{self.adapter}: LoRA update of {module!r} has shape {got} but the base's {target!r} is {shape}"
                )
            if "lora_B.bias" in parts:
                self._bias[self._base_key(f"{module}.bias", base_keys)] = (target, parts["lora_B.bias"])
        self._full = {self._base_key(k, base_keys): v for k, v in full.items()}

    def check_declared_base(self, switch: str = "check_base=False") -> None:
        """Refuse an adapter that was trained on another base than the one it is applied to.

        The adapter's update ``B @ A`` keeps ``base + BA`` close to any base, so the same-base test of the weights
        cannot see this; what can: the base ``adapter_config.json`` declares (a local model whose weights are not
        this base's, or a Hub id other than the one this base's ``config.json`` names). The whole tensors an adapter
        saves beside its LoRA matrices (``modules_to_save``) are compared by cosine with the base's too, with a
        warning only (a head may be re-initialised on purpose).

        Where nothing tells (a Hub id declared, a local base that names none), it warns.

        Args:
            switch: The option that turns the check off, named in the refusal.

        Raises:
            ForeignBaseError: Naming the adapter, both bases and ``switch``.
        """
        import warnings

        from lightning_mergeguard.errors import ForeignBaseError
        from lightning_mergeguard.merging.base_check import BaseCheckWarning, check_same_base, compare, cosine

        base_label = str(self.base.directory or self.base.name)
        base_keys = set(self.base.keys())
        whole = [(k, v) for k, v in self._full.items() if v.dim() >= 2 and k in base_keys]
        if whole:  # a head re-initialised on purpose is no proof of another base: a warning, not a refusal
            check_same_base(
                [compare(k, v, self.base.get(k)) for k, v in whole],
                donor=f"{self.adapter} (its saved whole tensors)",
                base=f"LoRA base {base_label!r}",
                switch=switch,
                refuse=False,
            )
        declared = self.declared_base
        if not declared:
            return
        refusal = (
            f"LoRA adapter {str(self.adapter)!r} was trained on {declared!r} (adapter_config.json: "
            f"base_model_name_or_path) but is applied to {base_label!r}"
        )
        if Path(declared).exists():
            if self.base.directory is not None and Path(declared).resolve() == self.base.directory.resolve():
                return
            theirs = open_source(declared, name=declared)
            same = [k for k in self.base.keys() if k in set(theirs.keys())]
            matrices = [k for k in same if len(self.base.meta(k)[0]) >= 2][:16]
            if matrices and all(
                theirs.meta(k)[0] == self.base.meta(k)[0]
                and (cosine(theirs.get(k), self.base.get(k)) or 0.0) > 1 - 1e-4
                for k in matrices
            ):
                return  # a copy of the same weights elsewhere
            raise ForeignBaseError(f"{refusal}, whose weights differ; pass that base, or {switch}")
        names = {_id_of(self.base.directory), _id_of((self.base.config or {}).get("_name_or_path"))} - {None}
        if _id_of(declared) in names:
            return
        if any("/" in n for n in names) and "/" in _id_of(declared):  # two Hub ids that differ
            raise ForeignBaseError(f"{refusal}, a model named {sorted(names)}; pass that base, or {switch}")
        warnings.warn(
            f"{refusal}; this base does not name itself the same way, so it cannot be checked: make sure it is the one",
            BaseCheckWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------------------------------------- reading
    def _read_config(self) -> dict[str, Any]:
        path = self.adapter / "adapter_config.json"
        if not path.is_file():
            raise WeightsFileError(f"{self.adapter} is not a PEFT adapter: no adapter_config.json")
        cfg = read_json(path, "the adapter config")
        if not isinstance(cfg, dict):
            raise WeightsFileError(f"{path}: the adapter config must be a JSON object")
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise NotImplementedError(f"{path}: peft_type {kind} is not supported (only LoRA adapters merge)")
        if cfg.get("use_dora"):
            raise NotImplementedError(f"{path}: DoRA adapters (use_dora: true) are not supported")
        return cfg

    def _read_weights(self) -> dict[str, Tensor]:
        st, pt = self.adapter / "adapter_model.safetensors", self.adapter / "adapter_model.bin"
        if st.is_file():
            src = open_source(st)
            return {k: src.get(k) for k in src.keys()}
        if pt.is_file():
            return _load_pickle_weights(pt)
        raise WeightsFileError(f"{self.adapter}: no adapter_model.safetensors or adapter_model.bin")

    def _base_key(self, key: str, base_keys: list[str]) -> str:
        """The base's name for an adapter's module name.

        The same name, one with a prefix less, or one with a prefix more (a LightningModule's ``model.`` around
        the network the adapter was trained on).
        """
        found = match_names([key], base_keys, missing="skip")
        if key in found:
            return found[key]
        longer = [k for k in base_keys if k.endswith("." + key)]
        if len(longer) == 1:
            return longer[0]
        raise IncompatibleModelsError(
            f"{self.adapter}: the adapter targets {key!r}, which base {self.base.name!r} does not have"
            + (f" unambiguously ({', '.join(longer[:3])})" if longer else "")
            + "; is this an adapter of another model?"
        )

    @staticmethod
    def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
        """PEFT's per-module override: the first pattern matching the module name's tail."""
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    def _delta(self, key: str) -> Tensor:
        # PEFT: linear B @ A (transposed for fan_in_fan_out layers); embedding (B @ A)^T.
        a, b, embedding = self._updates[key]
        return lora_delta(a, b, self._scaling[key], transpose=embedding or self._fan_in_fan_out)

    # ------------------------------------------------------------------------------------------ WeightSource
    @override
    def keys(self) -> list[str]:
        return self.base.keys()

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype = self.base.meta(key)
        if key in self._updates or key in self._bias:
            return shape, torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype
        return shape, dtype

    @override
    def get(self, key: str) -> Tensor:
        t = self._full[key] if key in self._full else self.base.get(key)
        if key in self._updates:
            return t.float() + self._delta(key).to(t.device)
        if key in self._bias:
            weight_key, bias = self._bias[key]
            return t.float() + bias.float().to(t.device) * self._scaling[weight_key]
        return t

    @override
    def read_flat(self, key: str, start: int, out: Tensor) -> None:
        if key in self._updates or key in self._bias or key in self._full:
            super().read_flat(key, start, out)
        else:
            self.base.read_flat(key, start, out)

    def task_vector(self) -> dict[str, Tensor]:
        """The adapter's update per base tensor: ``B @ A * scaling`` (and bias updates), without the base.

        Returns:
            ``base tensor name -> update``.
        """
        out = {k: self._delta(k) for k in self._updates}
        out.update({k: b.float() * self._scaling[w] for k, (w, b) in self._bias.items()})
        return out


@register_opener
def _open_lora_reference(reference: str, name: str | None) -> WeightSource | None:
    """``BASE+ADAPTER`` as a :class:`LoraSource`; a bare adapter directory is refused with what to pass instead."""
    pair = split_lora_reference(reference)
    if pair is not None:
        return LoraSource(pair[0], pair[1], name=name or reference)
    path = Path(reference)
    if is_lora_adapter(path) and not set(path.glob("*.safetensors")) - {path / "adapter_model.safetensors"}:
        raise WeightsFileError(
            f"{path} is a PEFT adapter, not a model: name its base too, as mergekit does: BASE_PATH+{path}"
        )
    return None

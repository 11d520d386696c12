"""Rebuild the model a checkpoint holds (a causal-LM directory, a LoRA adapter, an open_clip classifier)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mergeguard.errors import ConfigError, IncompatibleModelsError, WeightsFileError
from lightning_mergeguard.io import atomic_directory
from lightning_mergeguard.merging.lora import LoraSource, is_lora_adapter, split_lora_reference
from lightning_mergeguard.merging.sources import match_names, open_source, read_json
from lightning_mergeguard.posthoc.data import OwnerData, hold_out, image_data, load_rows

__all__ = ["load_causal_lm"]


BASE_CHECK_SWITCH = "--no-base-check (base_check=False)"


def _adapter(base: Path, model: Path) -> Path | None:
    """The PEFT LoRA adapter ``model`` names (a directory of one, or mergekit's ``BASE+ADAPTER``), else ``None``.

    Raises:
        ConfigError: ``BASE+ADAPTER`` whose ``BASE`` is not ``base``.
    """
    pair = split_lora_reference(str(model))
    if pair is not None:
        if Path(pair[0]).resolve() != base.resolve():
            raise ConfigError(f"--model {model}: the adapter's base {pair[0]!r} is not --base {str(base)!r}")
        return Path(pair[1])
    return model if is_lora_adapter(model) and not (model / "config.json").is_file() else None


def _detect_kind(base: Path, model: Path, arch: str | None) -> str:
    adapter = _adapter(base, model)
    if adapter is not None:
        model = base  # a LoRA adapter of a causal LM: protected as the base with the adapter merged in
    if model.is_dir() and (model / "config.json").is_file():
        cfg = read_json(model / "config.json", "the model config")
        if not isinstance(cfg, dict):
            raise WeightsFileError(f"{model / 'config.json'}: the model config must be a JSON object")
        if any(str(a).endswith("ForCausalLM") for a in cfg.get("architectures") or []):
            return "causal_lm"
        raise ConfigError(
            f"{model}: only causal-LM directories (architectures *ForCausalLM) are supported, "
            f"got {cfg.get('architectures')}"
        )
    if adapter is not None:
        raise ConfigError(f"--model {adapter} is a LoRA adapter, and --base {base} is no causal-LM directory")
    if arch is not None:
        return "open_clip"
    raise ConfigError(
        f"{model}: not a Hugging Face causal-LM directory; for an open_clip classifier checkpoint pass --arch "
        "(an open_clip model name such as ViT-B-32, 'tiny', 'small' or a JSON/YAML file of open_clip.CLIP kwargs)"
    )


def load_causal_lm(directory: Path) -> tuple[nn.Module, torch.dtype]:
    """A Hugging Face causal LM from an untrusted directory, in float32, and the dtype its weights were stored in.

    The model is built from ``config.json`` and its weights are read by this library's readers (safetensors, or
    ``.bin`` with ``weights_only=True``), never by transformers' loader: no model code and no pickle runs, and a
    broken file ends in one line naming it. The config is first built on the meta device and checked against the
    weights' names and shapes, so a config that asks for a far bigger model than its weights allocates nothing.

    Raises:
        WeightsFileError: A ``config.json`` transformers cannot use, or weights that cannot be read.
        IncompatibleModelsError: Weights that do not fit the config (missing or extra tensors, other shapes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    read_json(directory / "config.json", "the model config")  # names the file if it is not JSON (or too large)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        with torch.device("meta"):  # shapes only: nothing is allocated before the weights are known to fit
            shapes = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsFileError(
            f"{directory / 'config.json'}: not a model config transformers can build: {reason}"
        ) from None
    src = open_source(directory, name=str(directory))
    wanted = shapes.state_dict()
    found = match_names(list(wanted), src.keys(), what=str(directory), missing="skip")
    tied = {n for n in wanted if n not in found and _is_tied(shapes, n)}
    missing = [n for n in wanted if n not in found and n not in tied]
    if missing:
        raise IncompatibleModelsError(
            f"{directory}: the weights lack {missing[:3]} ({len(missing)} tensors) of its config"
        )
    stored = torch.float32
    for name, key in found.items():
        shape, dtype = src.meta(key)
        if tuple(shape) != tuple(wanted[name].shape):
            raise IncompatibleModelsError(
                f"{directory}: tensor {key!r} has shape {tuple(shape)}, its config says {tuple(wanted[name].shape)}"
            )
        if dtype.is_floating_point:
            stored = dtype
    del shapes, wanted
    lm = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    state = lm.state_dict()
    with torch.no_grad():
        for name, key in found.items():
            state[name].copy_(src.get(key).to(torch.float32))
    lm.float().eval()
    return lm, stored


def _is_tied(lm: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is the input embedding itself (a tied LM head that checkpoints leave out)."""
    params = dict(lm.named_parameters(remove_duplicate=False))
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    return (
        emb is not None and name in params and params[name] is emb.weight and not name.endswith("embed_tokens.weight")
    )


def _causal_lm(base: Path, model: Path, data: OwnerData, arch: str | None, seed: int, check_base: bool):
    from transformers import AutoTokenizer

    from lightning_mergeguard.models.causal_lm import LMTaskDataset, exact_match

    adapter = _adapter(base, model)
    own = adapter or model
    tok_dir = own if any((own / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else base
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsFileError(f"no usable tokenizer in {own} or {base}: {reason}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if adapter is None:
        lm, stored = load_causal_lm(model)
    else:  # the base with the adapter's update B @ A * scaling merged in: a full fine-tune, protected and written so
        lm, stored = load_causal_lm(base)
        merged = LoraSource(base, adapter)
        if check_base:
            merged.check_declared_base(switch=BASE_CHECK_SWITCH)
        state = lm.state_dict()
        with torch.no_grad():
            for name, key in match_names(list(state), merged.keys(), what=f"{base}+{adapter}", missing="skip").items():
                state[name].copy_(merged.get(key))
    train_rows, val_rows = hold_out(
        load_rows(data.path, max_rows=data.max_rows, max_row_bytes=data.max_row_bytes), seed
    )
    budget = data.max_length
    answer_tokens = max(len(tok(a[: budget * 64], add_special_tokens=False).input_ids) for _, a in val_rows) + 1
    answer_tokens = min(answer_tokens, data.max_length)

    def metric(m: nn.Module) -> float:
        return 100.0 * exact_match(m, tok, val_rows, max_new_tokens=answer_tokens)

    def save(m: nn.Module, out: Path) -> Path:
        with atomic_directory(out / "model") as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        return out / "model"

    return lm, LMTaskDataset(tok, train_rows, max_length=data.max_length), metric, save, {"stored_dtype": stored}


def _open_clip(base: Path, model: Path, data: OwnerData, arch: str | None, seed: int, check_base: bool):
    from lightning_mergeguard.evaluation import evaluate
    from lightning_mergeguard.io import save_safetensors
    from lightning_mergeguard.models.open_clip import ClipImageClassifier, build_open_clip, image_transform

    try:
        clip = build_open_clip(arch or "tiny")
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise ConfigError(f"--arch {arch!r}: {err}") from err
    state = open_source(model, name="model").state_dict()
    head = match_names(["head.weight"], state, missing="skip")  # also under DDP's 'module.' prefix
    if not head:
        raise WeightsFileError(f"{model}: an open_clip classifier checkpoint needs 'head.weight' (visual.* and head.*)")
    classes, embed = state[head["head.weight"]].shape
    module = ClipImageClassifier(clip.visual, embed, num_classes=classes)
    wanted = list(module.state_dict())
    found = match_names(wanted, state, missing="skip")
    missing = [n for n in wanted if n not in found]
    unexpected = sorted(set(state) - set(found.values()))
    if missing or unexpected:
        raise IncompatibleModelsError(
            f"{model} does not fit open_clip {arch!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    module.load_state_dict({n: state[k] for n, k in found.items()})
    train, val = image_data(data.path, seed, image_transform(clip.visual))  # open_clip's preprocessing, its size
    val_batches = list(DataLoader(val, batch_size=64))

    def metric(m: nn.Module) -> float:
        return 100.0 * evaluate(m, val_batches)

    def save(m: nn.Module, out: Path) -> Path:
        target = out / "protected.safetensors"
        save_safetensors(target, {k: v.detach().contiguous() for k, v in m.state_dict().items()})
        return target

    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    module.float()
    return module, train, metric, save, {"include": [r"^visual\."], "stored_dtype": stored}

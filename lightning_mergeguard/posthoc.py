"""Protect a model that is already trained: one call (or ``mergeguard-protect``) for an existing checkpoint.

The owner has a fine-tune (a Hugging Face causal-LM directory, or an open_clip image classifier saved as a state
dict) and the base it was fine-tuned from, plus a small labelled set. :func:`protect_checkpoint` rebuilds the
model, checks it is a fine-tune of that base, measures its own score, runs stage 2 on it directly (a
:class:`~lightning_mergeguard.protection.stage2.Stage2` strategy is a pure function of the model, so no training
code is needed), and only if stage 2 alone cannot stay within the tolerance runs a short stage-1 re-fit with
:class:`~lightning_mergeguard.MergeGuardCallback` (whose stage 2 then runs at the end). It writes the protected model
in the input's format, a JSON report and a model-card paragraph with the measured numbers.

Example:
    >>> from lightning_mergeguard.posthoc import protect_checkpoint
    >>> report = protect_checkpoint("base/", "finetune/", "rows.jsonl", "protected/")  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mergeguard.callbacks._common import repeat
from lightning_mergeguard.errors import ConfigError, IncompatibleModelsError, WeightsFileError
from lightning_mergeguard.evaluation import LossFn, default_loss
from lightning_mergeguard.io import atomic_directory, atomic_write_json, atomic_write_text
from lightning_mergeguard.merging.engine import check_same_base_sources
from lightning_mergeguard.merging.lora import LoraSource, is_lora_adapter, split_lora_reference
from lightning_mergeguard.merging.sources import StateDictSource, match_names, open_source, read_json
from lightning_mergeguard.ownership.weight_key import embed_key_checked
from lightning_mergeguard.parameters import name_patterns, refuse_non_finite, select_parameters
from lightning_mergeguard.protection.residual import check_permute_residual
from lightning_mergeguard.protection.stage2 import (
    DEFAULT_STAGE2_EXCLUDE,
    KeepWeights,
    MergeNeighbourhood,
    ScaleAdversarial,
    Stage2,
    Stage2Context,
    amplify_checked,
)
from lightning_mergeguard.protection.symmetry import check_strength, warn_amplify
from lightning_mergeguard.protection.verdict import (
    check_castable,
    key_paragraph,
    not_protected_reason,
    weights_changed,
    weights_digest,
)
from lightning_mergeguard.reference import ReferenceWeights, parse_device
from lightning_mergeguard.validation import is_number

__all__ = ["hold_out", "image_data", "load_causal_lm", "load_rows", "protect_checkpoint", "protect_module"]

STAGE2_CHOICES = ("auto", "scale_adversarial", "merge_neighbourhood", "none")
WRITE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASE_CHECK_SWITCH = "--no-base-check (base_check=False)"
_PROTECT_WORDS = (
    "raise --tolerance, --steps or --lr, give --partners, or set --refit-steps above 0 (Python: tolerance=, steps=, "
    "lr=, partners=, refit_steps=)"
)


# --------------------------------------------------------------------------------------------- the core
def protect_module(
    module: nn.Module,
    base: Any,
    train_batches: Iterable[Any],
    metric: Callable[[nn.Module], float],
    *,
    stage2: Stage2 | None = None,
    tolerance: float = 1.0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] = DEFAULT_STAGE2_EXCLUDE,
    loss_fn: LossFn = default_loss,
    refit: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
    amplify: float | None = None,
    permute_residual: bool = False,
    ownership_key: str | os.PathLike[str] | None = None,
    who: str = "protect_module",
    advice: str = "Raise tolerance=, the strategy's steps= or lr=, or pass refit=.",
) -> dict[str, Any]:
    """Protect ``module`` in place; return the report.

    Args:
        module: The fine-tuned model (its parameters are changed in place).
        base: The pretrained weights (anything :func:`~lightning_mergeguard.merging.sources.open_source` reads).
        train_batches: The owner's training batches (cycled).
        metric: ``module -> score`` in points (the guard rail's measure, e.g. exact match or accuracy).
        stage2: The strategy (default: ``ScaleAdversarial(steps=150)``).
        tolerance: Largest allowed drop of the score, in points.
        include: Regexes of the parameters protected (default: all trainable ones the base has).
        exclude: Regexes left out (default: embeddings, final norms, LM and task heads).
        loss_fn: ``(module, batch) -> loss``.
        refit: Called when stage 2 alone finds no weights within the tolerance: a short stage-1 re-fit of
            ``module`` that also applies stage 2 (see :func:`protect_checkpoint`); ``None`` skips it.
        progress: Show a progress bar.
        amplify: After stage 2, re-parameterise with exact symmetries of scales up to ``amplify`` (see
            :class:`~lightning_mergeguard.MergeGuardCallback`'s ``amplify``); ``None`` skips it.
        permute_residual: With ``amplify``, also permute the residual stream's channels (see
            :class:`~lightning_mergeguard.MergeGuardCallback`'s ``permute_residual``).
        ownership_key: After stage 2 (before ``amplify``), embed a fresh secret ownership key in the protected
            weights and write it to this file (:mod:`~lightning_mergeguard.ownership.weight_key`); test suspects
            with ``mergeguard-verify``. ``None`` skips it.
        who: The entry point, as warnings name it.
        advice: What to change when stage 2 keeps no step, in the entry point's words.

    Returns:
        ``score_before``, ``score_after``, ``stage2`` (the strategy's report), ``refit`` (whether it ran),
        ``weights_changed``, ``protected`` and ``not_protected`` (why not, or ``None``: no weight changed, or stage 2
        kept no step and nothing else was applied; a warning says so too) and, with ``amplify``, ``amplify`` (the
        symmetries applied or why not, the score after them, whether they were reverted).

    Raises:
        IncompatibleModelsError: A base that has none of the model's parameters.
        NonFiniteError: Non-finite weights in ``module``.
        ValueError: Bad settings (``amplify``, ``permute_residual``, the key).
    """
    check_permute_residual(permute_residual, amplify)
    stage2 = stage2 or ScaleAdversarial(steps=150)
    refuse_non_finite(module, "protect_module")
    src = open_source(base, name="base")
    candidates = select_parameters(module, name_patterns(include, "include"), name_patterns(exclude, "exclude") or [])
    names = match_names(candidates, src.keys(), what="base", missing="skip")  # a task head the base lacks stays out
    if not names:
        raise IncompatibleModelsError("the base has none of the model's parameters: is it the right base model?")
    params = {n: candidates[n] for n in names}
    reference = ReferenceWeights({n: src.get(k) for n, k in names.items()})
    reference.resolve(params)
    passes = [0]

    def counted() -> float:
        passes[0] += 1
        return metric(module)

    before = counted()
    start = weights_digest(module.state_dict())  # for the verdict: a digest per tensor, not a copy of the model

    ctx = Stage2Context(
        module=module,
        params=params,
        reference=reference.as_dict(params, like=params),
        batches=iter(train_batches),
        metric=counted,
        loss_fn=loss_fn,
        before=before,
        tolerance=tolerance,
        progress=progress,
        warn=lambda message: warnings.warn(message, stacklevel=3),
        who=who,
        advice=advice,
    )
    after, extra = stage2.run(ctx)
    report: dict[str, Any] = {
        "score_before": before,
        "score_after": after,
        "stage2": {"settings": stage2.settings(), **extra, "validation_passes": passes[0]},
        "parameters_protected": len(params),
        "refit": False,
    }
    if extra.get("steps_used") == 0 and refit is not None:
        refit(module)
        report["refit"] = True
        report["score_after"] = metric(module)
    changed = weights_changed(start, module.state_dict())  # by stage 2 or the re-fit; the key protects nothing
    if ownership_key is not None:
        report["ownership_key"] = embed_key_checked(params, ctx.reference, ownership_key, counted)
        report["score_after"] = report["ownership_key"]["score_after_key"]
    if amplify is not None:
        report["score_after"], report["amplify"] = amplify_checked(
            module, amplify, ctx, report["score_after"], permute_residual=permute_residual
        )
    report["validation_passes"] = passes[0]  # stage 2's, plus the check after the symmetries
    report["weights_changed"] = changed or bool((report.get("amplify") or {}).get("applied"))
    reason = not_protected_reason(report, report["weights_changed"], stage2_words=advice)
    report.update(protected=reason is None, not_protected=reason)
    if reason is not None:
        warnings.warn(f"{who}: the model is NOT protected: {reason}", stacklevel=2)
    return report


# ------------------------------------------------------------------------------------------------ data
MAX_DATA_BYTES = 1 << 30
"""Largest data file :func:`load_rows` reads (1 GiB)."""


def load_rows(
    path: str | os.PathLike[str], *, max_rows: int = 100_000, max_row_bytes: int = 1 << 20
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` rows from a JSONL file of ``{"prompt": ..., "answer": ...}`` objects.

    The file is untrusted: it is read line by line with every line's length bounded before it is decoded, so a
    huge line or file costs neither memory nor time.

    Args:
        path: The JSONL file (UTF-8).
        max_rows: Most rows read (``mergeguard-protect --max-rows``).
        max_row_bytes: Longest line, in bytes (``--max-row-bytes``).

    Returns:
        The rows, in file order.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Naming the file (and line) of a row that is not such an object, is not UTF-8 or is too long,
            a file over the limits, or fewer than 4 rows.

    Example:
        >>> import tempfile, pathlib, json
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
        >>> rows = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(4)]
        >>> _ = p.write_text(chr(10).join(rows))
        >>> load_rows(p)[0]
        ('0+1=', '1')
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise ConfigError(f"{path}: {size / 2**30:.1f} GiB; data files of at most 1 GiB are read (sample the rows)")
    rows = []
    with path.open("rb") as f:
        for i in itertools.count(1):
            raw = f.readline(max_row_bytes + 2)  # the line and its "\r\n": a longer one stops here, unread
            if not raw:
                break
            if len(raw.rstrip(b"\r\n")) > max_row_bytes:
                raise ConfigError(
                    f"{path}:{i}: a line longer than {max_row_bytes} bytes; shorten it or raise --max-row-bytes "
                    "(max_row_bytes=)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{path}:{i}: not UTF-8 text (byte {err.start} of the line: {raw[err.start : err.start + 1]!r})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{i}: not a JSON object: {err}") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("prompt"), str)
                or not isinstance(obj.get("answer"), str)
            ):
                raise ConfigError(
                    f'{path}:{i}: each line must be {{"prompt": "...", "answer": "..."}}, got {line[:80]!r}'
                )
            if len(rows) == max_rows:
                raise ConfigError(f"{path}: more than {max_rows} rows; sample them or raise --max-rows (max_rows=)")
            rows.append((obj["prompt"], obj["answer"]))
    if len(rows) < 4:
        raise ConfigError(f"{path}: {len(rows)} rows; at least 4 are needed (a training and a held-out split)")
    return rows


def _weights_of(ref: Path) -> Path:
    """Where a model reference's own weights are: the adapter of ``BASE+ADAPTER``, else the path (resolved)."""
    pair = split_lora_reference(str(ref))
    return Path(pair[1] if pair is not None else ref).resolve()


def _refuse_partners_that_are_not_others(base: Path, model: Path, partners: Sequence[str]) -> None:
    """A partner must be another fine-tune: not the model itself, not the base, not listed twice."""
    seen: dict[Path, str] = {}
    for p in partners:
        where = _weights_of(Path(p))
        if where == _weights_of(model):
            raise ConfigError(f"partner {p!r} is the model being protected; partners are other fine-tunes of the base")
        if where == base.resolve():
            raise ConfigError(f"partner {p!r} is the base model (its task vector is zero); pass other fine-tunes")
        if where in seen:
            raise ConfigError(f"partner {p!r} is listed twice (also as {seen[where]!r})")
        seen[where] = p


def _refuse_writing_over_inputs(written: Path, base: Path, model: Path, partners: Sequence[str]) -> None:
    """Refuse, before any work, an output that would replace the model, the base or a partner it reads."""
    target = written.resolve()
    for what, path in [("model", model), ("base", base), *(("partner", Path(p)) for p in partners)]:
        p = Path(path).resolve()
        if p == target or p.is_relative_to(target):
            raise ConfigError(
                f"--out would write the protected model to {written}, over the {what} it reads ({path}); "
                "choose another --out"
            )


def _check_numbers(**values: Any) -> None:
    """Refuse settings that cannot work before any model is loaded (names as on the command line)."""
    for name, value in values.items():
        number = is_number(value)
        if name in ("tolerance", "alpha"):
            ok = number and value >= 0
            want = "a number >= 0"
        elif name == "lr":
            ok = number and value > 0
            want = "a number > 0"
        else:
            low = 0 if name == "refit_steps" else 1
            ok = number and isinstance(value, int) and value >= low
            want = f"an integer >= {low}"
        if not ok:
            raise ConfigError(f"{name} must be {want}, got {value!r}")


def _device(device: str) -> torch.device:
    """``"auto"`` (CUDA when there is one), or a device that exists here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = parse_device(device, "device")
    except ValueError as err:
        raise ConfigError(f"{err} (auto, cpu, cuda, cuda:1...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available here (use auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def hold_out(items: list[Any], seed: int, held_out: float = 0.25) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: a seeded shuffle of ``items`` with a quarter (at least one) held out.

    Example:
        >>> hold_out(list(range(8)), seed=0)
        ([5, 2, 0, 3, 7, 6], [4, 1])
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(held_out * len(items)))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def image_data(data: str, seed: int, transform: Any) -> tuple[Dataset, Dataset]:
    """``(train, val)`` of ``(image, label)``: an image folder or a ``module:function`` returning both.

    Args:
        data: A folder with one sub-folder per class (read through ``transform``; a seeded quarter is held out as
            ``val``), or ``"module:function"``.
        seed: Seed of the held-out split.
        transform: The images' preprocessing, e.g. :func:`~lightning_mergeguard.models.open_clip.image_transform`.

    Raises:
        ConfigError: For a path that is neither, or an entry point that cannot be loaded.
    """
    if ":" in data and not Path(data).exists():
        import importlib

        module_name, func = data.split(":", 1)
        try:
            train, val = getattr(importlib.import_module(module_name), func)()
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"data entry point {data!r} cannot be loaded: {err}") from err
        return train, val
    if not Path(data).is_dir():
        raise ConfigError(f"--data {data!r}: expected an image folder (one sub-folder per class) or module:function")
    from torchvision import datasets

    folder = datasets.ImageFolder(data, transform=transform)
    train_idx, val_idx = hold_out(list(range(len(folder))), seed)
    return torch.utils.data.Subset(folder, train_idx), torch.utils.data.Subset(folder, val_idx)


# ------------------------------------------------------------------------------------------ checkpoints
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


def protect_checkpoint(
    base: str | os.PathLike[str],
    model: str | os.PathLike[str],
    data: str,
    out: str | os.PathLike[str],
    *,
    arch: str | None = None,
    partners: Sequence[str] = (),
    stage2: Literal["auto", "scale_adversarial", "merge_neighbourhood", "none"] = "auto",
    tolerance: float = 1.0,
    steps: int = 150,
    lr: float = 1e-4,
    refit_steps: int = 50,
    alpha: float = 0.01,
    batch_size: int = 8,
    max_length: int = 64,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    amplify: float | None = None,
    permute_residual: bool = False,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    base_check: bool = True,
    accept_unprotected: bool = False,
    max_rows: int = 100_000,
    max_row_bytes: int = 1 << 20,
    deployment_check: bool = False,
    ownership_key: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Protect an existing fine-tune and write it protected, with a report and a model-card paragraph.

    Args:
        base: The pretrained model: a Hugging Face directory, or an open_clip checkpoint file.
        model: The fine-tune: a causal-LM directory; a PEFT LoRA adapter directory of ``base`` (or mergekit's
            ``BASE+ADAPTER``), protected as the base with the adapter's update merged in and written as a full
            model; or an open_clip classifier state dict (``visual.*`` and ``head.*``, as
            ``examples/finetune_open_clip.py`` saves it).
        data: Causal LMs: a JSONL file of ``{"prompt", "answer"}`` rows. open_clip: an image folder (one
            sub-folder per class) or ``module:function`` returning ``(train, val)`` datasets of ``(image, label)``.
            A quarter of the rows (or the ``val`` set) is held out to score the guard rail.
        out: Output directory (created; a model directory or ``protected.safetensors`` inside it).
        arch: open_clip architecture when ``model`` is an open_clip checkpoint: a model name (``"ViT-B-32"``),
            ``"tiny"``, ``"small"`` (the benchmarks' ViT) or the path of a JSON/YAML file of ``open_clip.CLIP``
            keyword arguments (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        partners: Other fine-tunes of the same base (directories, weight files or ``BASE+ADAPTER``). Stage 2
            rehearses merges with them (``stage2="auto"``), and the report compares the owner-task score of a few
            standard merges (task arithmetic at 0.3, TIES) with the unprotected and the protected model.
        stage2: ``"merge_neighbourhood"`` (:class:`~lightning_mergeguard.MergeNeighbourhood`: owner-weighted
            task arithmetic, TIES and DARE merges with the partners), ``"scale_adversarial"``
            (:class:`~lightning_mergeguard.ScaleAdversarial`: scaled copies of the owner's task vector, no partner
            needed), or ``"auto"``: the first when partners are given, else the second. Measured post-hoc on
            ``benchmarks/protection.py --grid`` (seeded; ``benchmarks/results/protection_grid.md``), neither
            design reaches half the unprotected model's best merge: with two partners the neighbourhood found no
            step within 1 point on either track (worst case 1.00x, own score unchanged), scale-adversarial reached
            0.99x (vision) and 0.91x (LLM) while the held-out own score fell 1.6 and 6.2 points. ``"none"`` (with
            ``amplify`` only): no perturbation, the re-parameterisation alone on the fine-tune (own score unchanged;
            re-alignment to the base gives the fine-tune back).
        tolerance: Largest allowed drop of the own score (exact match, or accuracy), in points.
        steps: Stage-2 optimisation steps.
        lr: Stage-2 (and re-fit) learning rate.
        refit_steps: Steps of the stage-1 re-fit run when stage 2 alone cannot stay within the tolerance (0: never).
        alpha: Stage-1 strength of that re-fit.
        batch_size: Batch size of the owner's data.
        max_length: Token budget of a prompt plus answer (causal LMs).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: Seed of the split and of the optimisation.
        progress: Show progress bars.
        amplify: After stage 2, re-parameterise with exact symmetries of scales up to ``amplify`` (the same
            function; off-the-shelf merges collapse; undone by re-alignment to the base, see
            :mod:`~lightning_mergeguard.protection.symmetry`). ``None`` skips it.
        permute_residual: With ``amplify``, also permute the residual stream's channels, so that merges taking
            whole layers from the model (frankenmerges) mix mismatched channels too (undone by matching the
            embeddings to the base; see :mod:`~lightning_mergeguard.protection.residual`).
        dtype: Dtype of the written weights: ``"auto"`` (the input's) or one named. Refused, before anything is
            written, where it would overflow weights or flush them to zero (an amplified model in float16, say).
        base_check: Refuse a model or partner that is not a fine-tune of ``base`` (median per-matrix cosine), and
            a LoRA adapter declared for another base (``--no-base-check`` turns it off).
        accept_unprotected: Write the model even when the protection changed nothing or less than it claims (the
            report and the card then say "NOT protected" and why); ``False`` writes only the report then.
        max_rows: Most rows read from ``data`` (JSONL).
        max_row_bytes: Longest line of ``data``, in bytes.
        deployment_check: Also score the unprotected and the protected model under what users do to a release
            (fp16, bf16, int8 per row, 4-bit groups of 32 and 128, GGUF Q8_0 and Q4_0, 50 steps of full and of LoRA
            fine-tuning on the owner's data; :mod:`~lightning_mergeguard.protection.deployment`), into the report's
            ``deployment`` entry and the card.
        ownership_key: Embed a fresh secret ownership key after stage 2 and write it to this file (see
            :func:`protect_module`); the card says a key is embedded, never the key.

    Returns:
        The report (also written to ``out/protection_report.json``): the scores, the stage-2 report, ``protected``
        (``False`` when no weight changed, stage 2 kept no step, or no reported merge lost more than the tolerance)
        with ``not_protected`` saying why, ``dtype`` (of the written weights) and ``written`` (``None`` when the
        model was not written).

    Raises:
        ConfigError: Data in the wrong format, an unsupported model kind.
        ForeignBaseError: A fine-tune of another base model.
        WeightsFileError: A missing tokenizer, an unreadable config or unreadable weights (named).
        NonFiniteError: A ``dtype`` that would overflow the protected weights or flush them to zero.
    """
    if stage2 not in STAGE2_CHOICES:
        raise ConfigError(f"stage2 must be one of {STAGE2_CHOICES}, got {stage2!r}")
    if isinstance(partners, (str, os.PathLike)):
        raise ConfigError("partners must be a list of paths, not one path")
    if amplify is not None:
        try:
            amplify = check_strength(amplify, "amplify")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        warn_amplify(amplify, "mergeguard-protect --amplify")
    try:
        check_permute_residual(permute_residual, amplify)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if stage2 == "none" and amplify is None:
        raise ConfigError("stage2 'none' perturbs nothing: set amplify too, or the model would be written unprotected")
    _check_numbers(
        tolerance=tolerance, lr=lr, alpha=alpha, steps=steps, refit_steps=refit_steps, batch_size=batch_size,
        max_length=max_length, max_rows=max_rows, max_row_bytes=max_row_bytes,
    )  # fmt: skip
    if dtype != "auto" and dtype not in WRITE_DTYPES:
        raise ConfigError(f"dtype must be auto or one of {sorted(WRITE_DTYPES)}, got {dtype!r}")
    partners = [str(p) for p in partners]
    base, model, out = Path(base), Path(model), Path(out)
    dev = _device(device)
    torch.manual_seed(seed)
    kind = _detect_kind(base, model, arch)
    written = out / ("model" if kind == "causal_lm" else "protected.safetensors")  # what save() below writes
    _refuse_writing_over_inputs(written, base, model, partners)
    _refuse_partners_that_are_not_others(base, model, partners)
    base_src = open_source(base, name="base")
    builder = _causal_lm if kind == "causal_lm" else _open_clip
    options = {"check_base": base_check, "max_rows": max_rows, "max_row_bytes": max_row_bytes}
    module, train, metric, save, meta = builder(base, model, data, arch, batch_size, max_length, seed, options)
    include = meta.get("include")
    write_dtype = meta["stored_dtype"] if dtype == "auto" else WRITE_DTYPES[dtype]
    # The same-base check on the tensors both have, before anything is computed.
    if base_check:
        model_state = StateDictSource(
            {k: v for k, v in module.state_dict().items() if k in set(base_src.keys())}, "model"
        )
        check_same_base_sources(base_src, [model_state], switch=BASE_CHECK_SWITCH)
    # The fine-tune kept aside only where a table compares it with the protected model (a copy of the model).
    compared = bool(partners) or deployment_check
    unprotected = {k: v.detach().clone() for k, v in module.state_dict().items()} if compared else {}
    module.to(dev)
    batches = repeat(
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    )
    if stage2 == "merge_neighbourhood" or (stage2 == "auto" and partners):
        strategy: Stage2 = MergeNeighbourhood(steps=steps, lr=lr, partners=partners, seed=seed)
    elif stage2 == "none":
        strategy = KeepWeights()
    else:
        strategy = ScaleAdversarial(steps=steps, lr=lr)

    def refit(m: nn.Module) -> None:
        _refit(m, base, train, metric, batch_size, refit_steps, alpha, strategy, tolerance, lr, seed, progress, include)

    report = protect_module(
        module,
        base,
        _to_device(batches, dev),
        metric,
        stage2=strategy,
        tolerance=tolerance,
        include=include,
        refit=refit if refit_steps > 0 else None,
        progress=progress,
        amplify=amplify,
        permute_residual=permute_residual,
        ownership_key=ownership_key,
        who="mergeguard-protect",
        advice=f"To protect it: {_PROTECT_WORDS}.",
    )
    report.update(
        kind=kind,
        base=str(base),
        model=str(model),
        data=str(data),
        partners=partners,
        tolerance=tolerance,
        device=str(dev),
        dtype=str(write_dtype).removeprefix("torch."),
    )
    if partners:
        report["merges"] = _merge_table(module, unprotected, base, partners, metric)
    if deployment_check:
        report["deployment"] = _deployment_table(module, unprotected, metric, _to_device(batches, dev))
    module.cpu()
    reason = not_protected_reason(report, report["weights_changed"], stage2_words=_PROTECT_WORDS)  # merges now too
    report.update(protected=reason is None, not_protected=reason, written=None)
    write = reason is None or accept_unprotected
    if write:
        check_castable(module.state_dict(), write_dtype, "--dtype (dtype=)")
        module.to(write_dtype)
    out.mkdir(parents=True, exist_ok=True)
    report["report"] = str(out / "protection_report.json")
    if write:
        report["written"] = str(save(module, out))
    atomic_write_json(out / "protection_report.json", report)
    atomic_write_text(out / "MERGEGUARD.md", model_card(report))
    return report


def _merge_table(
    module: nn.Module, unprotected: dict[str, Tensor], base: Path, partners: Sequence[str], metric
) -> dict[str, dict[str, float]]:
    """Owner-task score of standard merges with the unprotected and the protected model (the module is restored)."""
    from lightning_mergeguard.merging import merge

    protected = {k: v.detach().clone() for k, v in module.state_dict().items()}
    base_src = open_source(base, name="base")
    shared = [k for k in protected if k in set(base_src.keys())]
    configs = {
        "task arithmetic λ=0.3": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}},
        "TIES (density 0.4)": {"merge_method": "ties", "model_parameters": {"density": 0.4}},
    }
    table = {}
    for label, spec in configs.items():
        row = {}
        for which, owner in (("unprotected", unprotected), ("protected", protected)):
            names = ["owner", *(f"partner{i}" for i in range(len(partners)))]
            models = {"owner": {k: owner[k] for k in shared}}
            models.update({f"partner{i}": p for i, p in enumerate(partners)})
            cfg = {
                "merge_method": spec["merge_method"],
                "base_model": "base",
                "parameters": spec.get("parameters", {}),
                "models": [
                    {"model": n, "parameters": {"weight": 1.0, **spec.get("model_parameters", {})}} for n in names
                ],
            }
            merged = merge(cfg, models, base_src, check_base=False)
            module.load_state_dict({**owner, **{k: merged[k].to(owner[k].dtype) for k in shared}})
            row[which] = metric(module)
        table[label] = row
    module.load_state_dict(protected)
    return table


def _deployment_table(
    module: nn.Module, unprotected: dict[str, Tensor], metric: Callable[[nn.Module], float], batches: Iterable[Any]
) -> dict[str, dict[str, float]]:
    """Own score under each deployment treatment, of the unprotected and the protected model (module restored)."""
    from lightning_mergeguard.protection.deployment import deployment_check

    protected = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(unprotected)
    before = deployment_check(module, metric, batches=batches, loss_fn=default_loss)
    module.load_state_dict(protected)
    after = deployment_check(module, metric, batches=batches, loss_fn=default_loss)
    return {t: {"unprotected": before[t], "protected": after[t]} for t in after}


def _to_device(batches: Iterable[Any], device: torch.device) -> Iterable[Any]:
    from lightning_mergeguard.evaluation import move_batch

    return (move_batch(b, device) for b in batches)


def _refit(
    module, base, train, metric, batch_size, steps, alpha, strategy, tolerance, lr, seed, progress, include
) -> None:
    """Stage-1 re-fit for ``steps`` with the guard (whose stage 2 runs at the end), scored by ``metric``."""
    import lightning.pytorch as pl

    from lightning_mergeguard.callbacks.merge_guard import MergeGuardCallback
    from lightning_mergeguard.models.trainer import quiet_trainer

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.net(*args, **kwargs)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return default_loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    def score(m: nn.Module, batch: Any) -> tuple[float, int]:  # the guard rail scores the whole held-out set once
        return metric(module) / 100.0, 1

    pl.seed_everything(seed, verbose=False)
    guard = MergeGuardCallback(
        alpha=alpha,
        include=include,
        reference=str(base),
        stage2=strategy,
        tolerance=tolerance,
        score_fn=score,
        eval_batches=1,
        progress=progress,
    )
    loader = DataLoader(train, batch_size=batch_size, shuffle=True)
    quiet_trainer(max_steps=steps, callbacks=[guard], limit_val_batches=1, num_sanity_val_steps=0).fit(
        Wrapped(), loader, DataLoader([0])
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


def _causal_lm(base: Path, model: Path, data: str, arch, batch_size: int, max_length: int, seed: int, options):
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
        if options["check_base"]:
            merged.check_declared_base(switch=BASE_CHECK_SWITCH)
        state = lm.state_dict()
        with torch.no_grad():
            for name, key in match_names(list(state), merged.keys(), what=f"{base}+{adapter}", missing="skip").items():
                state[name].copy_(merged.get(key))
    train_rows, val_rows = hold_out(
        load_rows(data, max_rows=options["max_rows"], max_row_bytes=options["max_row_bytes"]), seed
    )
    answer_tokens = max(len(tok(a[: max_length * 64], add_special_tokens=False).input_ids) for _, a in val_rows) + 1
    answer_tokens = min(answer_tokens, max_length)

    def metric(m: nn.Module) -> float:
        return 100.0 * exact_match(m, tok, val_rows, max_new_tokens=answer_tokens)

    def save(m: nn.Module, out: Path) -> Path:
        with atomic_directory(out / "model") as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        return out / "model"

    return lm, LMTaskDataset(tok, train_rows, max_length=max_length), metric, save, {"stored_dtype": stored}


def _open_clip(
    base: Path, model: Path, data: str, arch: str | None, batch_size: int, max_length: int, seed: int, options
):
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
    train, val = image_data(data, seed, image_transform(clip.visual))  # open_clip's preprocessing, its size
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


def _proxy_words(s2: dict[str, Any]) -> str:
    """What the guard rail's merge proxy was, in words, for the strategy that ran."""
    settings = s2["settings"]
    if settings["method"] == "merge_neighbourhood":
        weights = ", ".join(f"{a:g}/{b:g}" for a, b in settings["proxies"])
        who = ", ".join(s2.get("partners", [])) or "the rehearsed partners"
        return f"the best owner-task score of task arithmetic with {who} at owner/partner weights {weights}"
    return f"the score of the scaled copy theta_pre + {s2.get('merge_proxy_scale')} * tau that merges apply"


def model_card(report: dict[str, Any]) -> str:
    """A README / model-card paragraph stating what was done and the measured numbers."""
    s2 = report["stage2"]
    settings = s2["settings"]
    drop = report["score_before"] - report["score_after"]
    alone = settings["method"] == KeepWeights.name
    amp = report.get("amplify")
    if alone and not (amp and amp.get("applied")):
        done = "with no stage-2 perturbation, and the re-parameterisation asked for was not applied: NOT protected."
    elif alone:
        done = "by the re-parameterisation below alone (no stage-2 perturbation of its weights)."
    else:
        done = (
            f"(stage 2: {settings['method']}, {settings.get('steps')} steps"
            + (", after a short stage-1 re-fit" if report["refit"] else "")
            + f"). Its own score on held-out rows of the owner's data went from {report['score_before']:.1f} to "
            f"{report['score_after']:.1f} ({-drop:+.1f} points; tolerance {report['tolerance']} points). The merge "
            f"proxy ({_proxy_words(s2)}) went from {s2.get('merge_proxy_before', math.nan):.1f} to "
            f"{s2.get('merge_proxy_after', math.nan):.1f}."
        )
    lines = ["## Merge protection (lightning-mergeguard)", ""]
    if report.get("protected") is False:
        lines += [
            f"**NOT protected.** `mergeguard-protect` ran on this model, and {report['not_protected']}.",
            "",
            f"What it tried: {done}",
            "",
        ]
    else:
        lines += [
            f"This model was protected against unauthorized merging after training with `mergeguard-protect` {done}",
            "",
        ]
    if report.get("dtype"):
        lines += [f"Weights written as {report['dtype']}.", ""]
    lines += key_paragraph(report)[1:] + ([""] if report.get("ownership_key") else [])
    if amp and amp.get("applied"):
        left_out = f"; left out after the forward check: {', '.join(amp['dropped'])}" if amp.get("dropped") else ""
        lines += [
            "**Deploy with care: these weights are re-parameterised, which is not a recommended setting.** Any other "
            "fine-tune of the same base undoes it by re-alignment"
            + (" (giving the unprotected fine-tune back)" if alone else "")
            + ", and amplified releases do not survive deployment: measured on SmolLM2, scales up to 16 score 0% "
            "under 4-bit quantization, and up to 2**20 score 0% in float16, int8 and after 50 fine-tuning steps "
            f"(lightning-mergeguard's benchmarks/results/deployment.md). The symmetries: per-channel power-of-two "
            f"scales up to {amp['strength']:g} on {amp['channels']} channels{left_out}; the model computes the same "
            f"function (score {amp['score_before']:.1f} -> {amp['score_after']:.1f}) in float32 and bfloat16, but "
            "merges run without re-alignment see partners' updates magnified.",
            "",
        ]
        residual = amp.get("residual") or {}
        if residual.get("applied"):
            lines += [
                f"The {residual['width']} channels of its residual stream were also permuted (the same function, "
                "up to rounding), so merges that take whole layers from it mix mismatched channels; matching the "
                "embeddings to the base model undoes this too.",
                "",
            ]
    elif amp:
        why = amp.get("skipped") or "it moved the score, so the weights were put back"
        lines += [f"Amplifying symmetries were requested and not applied: {why}.", ""]
    deployment = report.get("deployment")
    if deployment:
        worst = max(v["unprotected"] - v["protected"] for v in deployment.values())
        lines += [
            f"Deployed as users deploy it, its own score stays within {max(worst, 0.0):.1f} points of the unprotected "
            "model's under the same treatment:",
            "",
            "| treatment | own score, unprotected | protected |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['unprotected']:.1f} | {v['protected']:.1f} |" for k, v in deployment.items()]
        lines.append("")
    merges = report.get("merges")
    if merges:
        lines += ["| merge | owner-task score, unprotected | protected |", "|---|---|---|"]
        lines += [f"| {k} | {v['unprotected']:.1f} | {v['protected']:.1f} |" for k, v in merges.items()]
        lines.append("")
    return "\n".join(lines)

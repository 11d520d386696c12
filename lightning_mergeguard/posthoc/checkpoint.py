"""Protect a checkpoint on disk: read it, protect it, write it in its own format with a report and a card."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mergeguard.callbacks._common import repeat
from lightning_mergeguard.errors import ConfigError
from lightning_mergeguard.io import atomic_write_json, atomic_write_text
from lightning_mergeguard.merging.engine import check_same_base_sources
from lightning_mergeguard.merging.lora import split_lora_reference
from lightning_mergeguard.merging.sources import StateDictSource, open_source
from lightning_mergeguard.parameters import ParameterSelection
from lightning_mergeguard.posthoc.card import model_card
from lightning_mergeguard.posthoc.data import OwnerData, _to_device, owner_data
from lightning_mergeguard.posthoc.models import BASE_CHECK_SWITCH, _causal_lm, _detect_kind, _open_clip
from lightning_mergeguard.posthoc.module import STAGE2_CHOICES, protect_module
from lightning_mergeguard.posthoc.refit import Refit, run_refit
from lightning_mergeguard.protection.release.settings import Release, release_settings
from lightning_mergeguard.protection.release.symmetry import warn_amplify
from lightning_mergeguard.protection.stage2 import (
    DEFAULT_TOLERANCE,
    KeepWeights,
    MergeNeighbourhood,
    ScaleAdversarial,
    Stage2,
)
from lightning_mergeguard.protection.verdict import (
    check_castable,
    not_protected_reason,
)
from lightning_mergeguard.reference import parse_device
from lightning_mergeguard.validation import check_number

__all__ = ["protect_checkpoint"]


_PROTECT_WORDS = (
    "raise --tolerance, --steps or --lr, give --partners, or set --refit-steps above 0 (Python: tolerance=, "
    "stage2=ScaleAdversarial(steps=, lr=), partners=, refit=Refit(steps=))"
)


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


def protect_checkpoint(
    base: str | os.PathLike[str],
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | OwnerData,
    out: str | os.PathLike[str],
    *,
    arch: str | None = None,
    partners: Sequence[str] = (),
    stage2: Literal["auto", "scale_adversarial", "merge_neighbourhood", "none"] | Stage2 = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    refit: Refit | None = Refit(),  # noqa: B008 - frozen, so one shared default is safe
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    release: Release | None = None,
    base_check: bool = True,
    accept_unprotected: bool = False,
) -> dict[str, Any]:
    """Protect an existing fine-tune and write it protected, with a report and a model-card paragraph.

    Args:
        base: The pretrained model: a Hugging Face directory, or an open_clip checkpoint file.
        model: The fine-tune: a causal-LM directory; a PEFT LoRA adapter directory of ``base`` (or mergekit's
            ``BASE+ADAPTER``), protected as the base with the adapter's update merged in and written as a full
            model; or an open_clip classifier state dict (``visual.*`` and ``head.*``, as
            ``examples/finetune_open_clip.py`` saves it).
        data: The owner's data: a path (causal LMs: a JSONL file of ``{"prompt", "answer"}`` rows; open_clip: an
            image folder, one sub-folder per class, or ``module:function`` returning ``(train, val)`` datasets of
            ``(image, label)``), or an :class:`~lightning_mergeguard.posthoc.data.OwnerData` to set the batch size,
            the token budget and the limits on reading it. A quarter of the rows (or the ``val`` set) is held out to
            score the guard rail.
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
            needed), ``"auto"``: the first when partners are given, else the second, each with its default
            settings (the callback's), or a configured strategy object such as ``ScaleAdversarial(steps=150)``.
            Measured post-hoc on ``benchmarks/protection.py --grid`` (seeded;
            ``benchmarks/results/protection_grid.md``), neither design reaches half the unprotected model's best
            merge: with two partners the neighbourhood found no step within 1 point on either track (worst case
            1.00x, own score unchanged), scale-adversarial reached 0.99x (vision) and 0.91x (LLM) while the
            held-out own score fell 1.6 and 6.2 points. ``"none"`` (with ``release.amplify`` or
            ``release.ownership_key``): no perturbation (the model is then reported NOT protected unless
            ``amplify`` applied).
        tolerance: Largest allowed drop of the own score (exact match, or accuracy), in points.
        refit: The stage-1 re-fit run when stage 2 alone cannot stay within the tolerance
            (:class:`~lightning_mergeguard.posthoc.refit.Refit`); ``None``: never.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: Seed of the split and of the optimisation.
        progress: Show progress bars.
        release: The steps after stage 2 and how the model is written
            (:class:`~lightning_mergeguard.protection.release.Release`): ``ownership_key`` (embed a secret key, write
            it to that file; the card says a key is embedded, never the key), ``deployment_check`` (score the
            unprotected and the protected model under fp16, bf16, int8, 4-bit, GGUF and 50 steps of full and LoRA
            fine-tuning on the owner's data, into the report and the card), ``dtype`` (of the written weights:
            ``"auto"`` is the input's; refused, before anything is written, where it would overflow the weights or
            flush them to zero), and ``amplify``/``permute_residual`` (not recommended: undone by any partner used
            as an anchor, and collapses under fp16, int8, 4-bit and fine-tuning).
        base_check: Refuse a model or partner that is not a fine-tune of ``base`` (median per-matrix cosine), and
            a LoRA adapter declared for another base (``--no-base-check`` turns it off).
        accept_unprotected: Write the model even when the protection changed nothing or less than it claims (the
            report and the card then say "NOT protected" and why); ``False`` writes only the report then.

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
    if not isinstance(stage2, Stage2) and stage2 not in STAGE2_CHOICES:
        raise ConfigError(f"stage2 must be one of {STAGE2_CHOICES} or a Stage2 object, got {stage2!r}")
    if isinstance(partners, (str, os.PathLike)):
        raise ConfigError("partners must be a list of paths, not one path")
    if refit is not None and not isinstance(refit, Refit):
        raise ConfigError(f"refit must be a Refit (e.g. Refit(steps=50)) or None, got {type(refit).__name__}")
    try:
        release = release_settings(release)
        check_number(tolerance, "tolerance", want="a number >= 0")
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if release.amplify is not None:
        warn_amplify(release.amplify, "mergeguard-protect --amplify")
    if stage2 == "none" and release.amplify is None and release.ownership_key is None:
        raise ConfigError(
            "stage2 'none' perturbs nothing: set amplify or an ownership key too, or the model would be written "
            "unprotected"
        )
    data = owner_data(data)
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
    module, train, metric, save, meta = builder(base, model, data, arch, seed, base_check)
    include = meta.get("include")
    write_dtype = release.write_dtype(meta["stored_dtype"])
    # The same-base check on the tensors both have, before anything is computed.
    if base_check:
        model_state = StateDictSource(
            {k: v for k, v in module.state_dict().items() if k in set(base_src.keys())}, "model"
        )
        check_same_base_sources(base_src, [model_state], switch=BASE_CHECK_SWITCH)
    # The fine-tune kept aside only where the merge table compares it with the protected model (a copy of the model).
    unprotected = {k: v.detach().clone() for k, v in module.state_dict().items()} if partners else {}
    module.to(dev)
    batches = repeat(
        DataLoader(train, batch_size=data.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    )
    strategy = _strategy(stage2, partners, seed)

    def refit_module(m: nn.Module) -> None:
        assert refit is not None
        run_refit(refit, m, base, train, metric, data.batch_size, strategy, tolerance, seed, progress, include)

    report = protect_module(
        module,
        base,
        _to_device(batches, dev),
        metric,
        stage2=strategy,
        tolerance=tolerance,
        parameters=ParameterSelection(include=include),
        refit=refit_module if refit is not None else None,
        progress=progress,
        release=release,
        who="mergeguard-protect",
        advice=f"To protect it: {_PROTECT_WORDS}.",
    )
    report.update(
        kind=kind,
        base=str(base),
        model=str(model),
        data=data.path,
        partners=partners,
        tolerance=tolerance,
        device=str(dev),
        dtype=str(write_dtype).removeprefix("torch."),
    )
    if partners:
        report["merges"] = _merge_table(module, unprotected, base, partners, metric)
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


def _strategy(stage2: str | Stage2, partners: list[str], seed: int) -> Stage2:
    """The stage-2 strategy a ``stage2=`` choice names, with its default settings (the callback's)."""
    if isinstance(stage2, Stage2):
        return stage2
    if stage2 == "merge_neighbourhood" or (stage2 == "auto" and partners):
        return MergeNeighbourhood(partners=partners, seed=seed)
    if stage2 == "none":
        return KeepWeights()
    return ScaleAdversarial()

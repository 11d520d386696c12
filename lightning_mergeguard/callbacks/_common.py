"""Helpers shared by the callbacks: strategy checks, logging outside ``self.log``, batch budgets."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mergeguard.validation import is_int

_SHARDED = {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"}


def is_fsdp2(trainer: pl.Trainer) -> bool:
    """Whether the trainer runs Lightning's ``ModelParallelStrategy`` (FSDP2 through ``fully_shard``)."""
    return "ModelParallelStrategy" in {cls.__name__ for cls in type(trainer.strategy).__mro__}


def refuse_sharded(trainer: pl.Trainer, who: str, allow_fsdp2: bool = False) -> None:
    """Raise for sharded strategies the callback cannot serve correctly.

    With ``allow_fsdp2``: ``ModelParallelStrategy`` used for pure data parallelism with FSDP2 (``fully_shard`` in
    ``configure_model``, ``tensor_parallel_size=1``) is accepted: every parameter is a ``DTensor`` sharded by rows,
    and the callback works on each rank's shard (see :mod:`lightning_mergeguard.sharding`). Always refused:
    ``FSDPStrategy`` (FSDP1's flat parameters), tensor parallelism, DeepSpeed and XLA FSDP.
    """
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if allow_fsdp2 and "ModelParallelStrategy" in names:
        tp = getattr(strategy, "_tensor_parallel_size", "auto")
        if tp == "auto":
            tp = getattr(strategy, "num_processes", 1)
        if tp != 1:
            raise MisconfigurationException(
                f"{who} supports ModelParallelStrategy for FSDP2 data parallelism only; got tensor_parallel_size={tp}. "
                "Pass ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and apply fully_shard in "
                "configure_model."
            )
        return
    if names & _SHARDED:
        hint = (
            " For FSDP, use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard "
            f"(FSDP2) in configure_model, which {who} supports."
            if allow_fsdp2 and "FSDPStrategy" in names
            else ""
        )
        raise MisconfigurationException(
            f"{who} does not support the sharded strategy {type(strategy).__name__}: it reads and writes weights "
            f"per parameter, which this strategy's flattened or offloaded parameters do not expose.{hint} Or use DDP "
            "or a single device."
        )


def refuse_adapters(pl_module: pl.LightningModule, who: str) -> None:
    """Raise for a model trained through LoRA/PEFT adapters (``lora_A``/``lora_B`` modules).

    The callbacks read and write the trained parameters as the weights a merge combines; with adapters those are A
    and B, while a merge combines the effective weights ``W + B @ A * scaling``. Protecting adapters needs its own
    maths, so they are refused instead of silently protecting the wrong thing.
    """
    adapted = [n for n, m in pl_module.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")]
    if adapted:
        raise MisconfigurationException(
            f"{who} does not support LoRA/PEFT adapters yet ({len(adapted)} adapted module(s), e.g. {adapted[0]!r}): "
            "a merge combines the effective weights W + B @ A * scaling, not A and B. Train the full model, or merge "
            "LoRA fine-tunes with the engine (a BASE+ADAPTER model reference)."
        )


def weight_replacers_after(trainer: pl.Trainer, callback: Any) -> list[str]:
    """Names of the callbacks after ``callback`` that replace the weights at the end of training.

    Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) and ``StochasticWeightAveraging`` copy their average
    into the model in ``on_train_end``; callbacks run in list order, so anything a callback before them does to the
    weights there is overwritten.
    """
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    kinds: tuple[type, ...] = (StochasticWeightAveraging,)
    try:
        from lightning.pytorch.callbacks import WeightAveraging  # Lightning >= 2.6

        kinds += (WeightAveraging,)
    except ImportError:  # pragma: no cover - older Lightning
        pass
    callbacks = list(trainer.callbacks)
    after = callbacks[callbacks.index(callback) + 1 :] if callback in callbacks else []
    return [type(c).__name__ for c in after if isinstance(c, kinds)]


def refuse_pruning(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str, why: str, instead: str) -> None:
    """Refuse a fit that prunes the model: Lightning's ``ModelPruning``, or ``torch.nn.utils.prune`` applied to it.

    Pruning re-parametrises each pruned weight (``weight = weight_orig * weight_mask``, recomputed in every forward)
    until it is made permanent, which ``ModelPruning`` does in its own ``on_train_end``. The message says ``why`` the
    caller cannot work with that and what to do ``instead``.
    """
    from lightning.pytorch.callbacks import ModelPruning

    found = None
    if any(isinstance(c, ModelPruning) for c in trainer.callbacks):
        found = "ModelPruning"
    elif torch.nn.utils.prune.is_pruned(pl_module):
        found = "torch.nn.utils.prune (the model has pruned weights)"
    if found is not None:
        raise MisconfigurationException(f"{who} does not support pruning during fit ({found}): {why}. {instead}")


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Log from hooks where ``LightningModule.log`` is refused (as ``LearningRateMonitor`` does), on rank zero.

    The values also join ``trainer.callback_metrics`` on every rank (they are the same on every rank: each is reduced
    across ranks), so ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping(monitor=...)`` can watch them.
    """
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
    if not trainer.is_global_zero or not trainer.loggers:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step if step is None else step)
        logger.save()


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what Lightning holds (a loader, a list, a dict, or a CombinedLoader)."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def validation_loader(trainer: pl.Trainer) -> Any:
    """The trainer's first validation loader, loaded here when Lightning has not loaded it.

    Lightning loads validation loaders when validation first runs, and not at all with ``limit_val_batches=0`` or
    without a ``validation_step``; the module's or datamodule's ``val_dataloader`` (or the loader given to ``fit``)
    is still the held-out data a callback's score should use. ``None`` when nothing defines one.
    """
    loader = first_loader(trainer.val_dataloaders)
    if loader is not None:
        return loader
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    source = getattr(val_loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    val_loop.setup_data()
    loader = first_loader(trainer.val_dataloaders)
    if loader is None:  # Lightning skipped it (validation disabled): ask the source directly
        loader = first_loader(source.dataloader())
    return loader


def is_distributed_loader(loader: Any) -> bool:
    """Whether ``loader`` already gives each rank its own rows (a ``DistributedSampler``, as Lightning injects)."""
    from torch.utils.data import DistributedSampler

    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def eval_share(loader: Any, n: int | None, rank: int, world: int) -> tuple[Any, tuple[int, int] | None]:
    """What this rank scores of ``n`` evaluation batches, and the ``shard`` argument for ``evaluate``.

    A loader that a ``DistributedSampler`` already splits across ranks (Lightning's validation loaders under DDP
    and FSDP) is taken as it is: ``ceil(n / world)`` batches on each rank, the rows one process's ``n`` batches
    hold when they divide evenly. Any other loader gives every rank the same batches, which are dealt out
    (``shard=(rank, world)``). With a cross-rank sum of the scores both equal one process's evaluation.
    """
    if world > 1 and is_distributed_loader(loader):
        return (loader if n is None else take(loader, math.ceil(n / world))), None
    return (loader if n is None else take(loader, n)), ((rank, world) if world > 1 else None)


def take(loader: Any, n: int | None) -> list[Any]:
    """The first ``n`` batches of a loader (all when ``n`` is ``None``)."""
    return list(itertools.islice(iter(loader), n))


def repeat(loader: Any) -> Iterator[Any]:
    """Iterate a loader forever (a fresh epoch each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("dataloader yielded no batches")


class _Converted:
    """A re-iterable view of ``batches`` with ``convert`` applied to each (a loader stays lazy, epoch by epoch)."""

    def __init__(self, batches: Iterable[Any], convert: Callable[[Any], Any]) -> None:
        self.batches, self.convert = batches, convert

    def __iter__(self) -> Iterator[Any]:
        return map(self.convert, self.batches)


def as_trained(trainer: pl.Trainer, batches: Iterable[Any]) -> Iterable[Any]:
    """Batches as the trainer's loops hand them to the model: through the precision plugin's ``convert_input``.

    With ``bf16-true``, ``16-true`` or ``64-true`` the loops cast floating inputs (images, embeddings) to the
    weights' dtype; a callback that feeds loader batches to the model itself must do the same, or a ``Linear``
    sees float32 inputs and bfloat16 weights. A list stays a list; anything else is converted as it is iterated.
    """
    convert = trainer.precision_plugin.convert_input
    if isinstance(batches, list):
        return [convert(b) for b in batches]
    return _Converted(batches, convert)


def debug_run_batches(trainer: pl.Trainer, budget: int | None) -> int | None:
    """``budget`` of evaluation batches, cut to the ``fast_dev_run`` batch count when the trainer runs one."""
    fast = trainer.fast_dev_run
    if not fast:
        return budget
    n = 1 if fast is True else int(fast)
    return n if budget is None else min(budget, n)


def debug_run_stage2(strategy: Any) -> Any:
    """A copy of a stage-2 strategy that runs two optimisation steps and one check, for ``fast_dev_run``.

    Strategies without ``steps``/``checks`` (``Negation``, a user's own) run as they are.
    """
    quick = copy.copy(strategy)
    for attr, most in (("steps", 2), ("checks", 1)):
        value = getattr(quick, attr, None)
        if is_int(value):
            setattr(quick, attr, min(value, most))
    return quick


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (``None`` when it cannot be told).

    A GPU's free memory, or the host's ``MemAvailable`` (Linux).
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def refuse_unaffordable(per_process: int, device: torch.device, trainer: pl.Trainer, what: str, remedies: str) -> None:
    """Refuse, before allocating it, memory that ``device`` does not have (a clear error instead of an OOM kill).

    On the CPU every training process of this machine holds its own copy (``trainer.num_devices`` of them under
    DDP); on a GPU each process has its own device.

    Raises:
        MisconfigurationException: Naming the size, what holds it and ``remedies``.
    """
    processes = max(1, int(getattr(trainer, "num_devices", 1) or 1)) if device.type == "cpu" else 1
    needed, free = per_process * processes, available_bytes(device)
    if free is None or needed <= free:
        return
    gib = 1024**3
    per = f" ({per_process / gib:.1f} GiB in each of {processes} processes)" if processes > 1 else ""
    raise MisconfigurationException(
        f"{what} needs {needed / gib:.1f} GiB on {device}{per}, and {free / gib:.1f} GiB is available there: {remedies}"
    )

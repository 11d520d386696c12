"""MergeProbe: simulate merges of the model being trained and log how they fare, as ordinary Lightning metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_mergeguard.adapters import LoraView, is_adapted
from lightning_mergeguard.callbacks._common import (
    as_trained,
    debug_run_batches,
    eval_share,
    is_fsdp2,
    log_to_loggers,
    refuse_pruning,
    refuse_sharded,
    refuse_unaffordable,
    validation_loader,
    weight_replacers_after,
)
from lightning_mergeguard.callbacks._restores import RestoreTracker, ResumableCallback
from lightning_mergeguard.callbacks._sharing import guard_reference
from lightning_mergeguard.callbacks.probe_schedule import ProbeSchedule
from lightning_mergeguard.donors import Donors, donor_set, donor_task_vector
from lightning_mergeguard.evaluation import ScoreFn, default_score, evaluate, rng_kept
from lightning_mergeguard.merging.engine import iter_merge
from lightning_mergeguard.merging.sources import StateDictSource, WeightSource
from lightning_mergeguard.merging.task_vectors import task_vector_cosines
from lightning_mergeguard.parameters import (
    ParameterSelection,
    parameter_selection,
    weights_changed,
)
from lightning_mergeguard.probing import (
    BASE,
    LIVE,
    ProbeSpec,
    TaskVectorSource,
    build_probe_specs,
    merge_metrics,
    named_signals,
)
from lightning_mergeguard.reference import ReferenceWeights, parse_device, reference_weights
from lightning_mergeguard.sharding import GatheredSource, any_sharded, local, write_full_
from lightning_mergeguard.validation import check_int, is_number

OWN = "own"


def _check_task_names(loaders: Mapping[str, Any], donors: Mapping[str, Any]) -> None:
    """Evaluation tasks are ``'own'`` (required) and donor names."""
    unknown = [k for k in loaders if k != OWN and k not in donors]
    if unknown:
        raise ValueError(f"MergeProbe: eval_dataloaders keys {unknown} are neither 'own' nor donor names")
    if OWN not in loaders:
        raise ValueError("MergeProbe: eval_dataloaders needs an 'own' entry for the protected task")


_PRUNING_WHY = (
    "while pruning is active each pruned weight is weight_orig * weight_mask, so the probe would merge weight_orig "
    "and prune the merge with the mask again, which is not the merge of the pruned model anyone could make from its "
    "checkpoint"
)
_PRUNING_INSTEAD = "Prune first and make it permanent (torch.nn.utils.prune.remove), then probe the fine-tune."


class MergeProbe(ResumableCallback):
    """Periodically merge the live model with other fine-tunes of the same base, evaluate, restore, and log.

    Donors are read and checked when fit starts (names, shapes, NaN/Inf, and that each is a fine-tune of the same
    base), before any training step. At each probe the live weights are backed up once into a buffer that is reused
    across probes; every
    (method, coefficient) merge is written tensor by tensor into the live parameters, evaluated, and the live
    weights are restored bit for bit from the buffer at the end. Logged per merge label (``ties@0.3``...) and task
    (``own`` for the model being trained, then each donor that has an evaluation loader):

    - ``mergeprobe/<label>/<task>/acc``: score of the merged model (percent),
    - ``mergeprobe/<label>/<task>/normalized_acc``: merged / individual,
    - ``mergeprobe/<label>/<task>/interference``: individual - merged (points),
    - ``mergeprobe/<task>/individual_acc`` and ``mergeprobe/cosine/<donor>`` (live task vector vs the donor's).

    Under DDP every rank evaluates 1/world of the batches and the sums are reduced across ranks, so the
    logged numbers equal a single-process run's; only rank zero writes logs. A failure that hits only some ranks
    cannot be skipped consistently: use ``strict=True`` under DDP when donors or score functions may fail.
    Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) elementwise merges run on each rank's shard and
    the others (TIES, DARE...) on one gathered tensor at a time, so every number equals one process's.
    Metrics go through ``trainer.loggers`` (any logger) so the probe also runs in ``on_train_end``: put it *after*
    :class:`~lightning_mergeguard.MergeGuardCallback` in ``callbacks`` to see the protected weights there.

    Args:
        donors: Other fine-tunes of the same base: a :class:`~lightning_mergeguard.donors.Donors` (to
            choose how their task vectors are held, ``dtype`` and ``device``, and the same-base check), or its
            sources: name -> fine-tune (state dict, module, safetensors file, HF directory), or a list (named
            ``donor0``...). By default held as float32 task vectors on the CPU; each tensor is copied to the model's
            device only when a merge uses it.
        methods: Merge methods: names, mappings ``{merge_method, parameters, model_parameters, label}``, or mergekit
            YAML paths whose models are ``live``, ``base`` and donor names.
        coefficients: Grid of merge coefficients, or one number (``lambda``; the live weight for ``linear`` and
            ``nuslerp``; ``t`` for ``slerp``). Methods that weight nothing (``model_stock``, ``sce``, ``karcher``) run
            once per probe.
        eval_dataloaders: A loader for the protected task, or name -> loader (``"own"`` for the protected task,
            donor names for theirs). A value may be ``(loader, score_fn)`` for a task scored differently.
            Default: the trainer's (first) validation loader, resolved at the first probe.
        schedule: When to probe (:class:`~lightning_mergeguard.callbacks.probe_schedule.ProbeSchedule`): by
            default every epoch within a budget of 5% of the training time (the first scheduled probe always runs,
            later ones when affordable), and once more at the end of fit.
        score_fn: ``(module, batch) -> (score_sum, count)``, or one number (the batch's mean score); default accuracy.
        eval_batches: Batches per loader per probe (cached once, so every probe sees the same data).
        parameters: Which weights are merged (:class:`~lightning_mergeguard.parameters.ParameterSelection`'s
            ``include`` and ``exclude``; default: all trainable; on a PEFT LoRA model every weight of the base,
            named as in the base model, merged as ``W + B @ A * s``: see
            :class:`~lightning_mergeguard.adapters.LoraView`). Excluded weights are kept from the live model.
        reference: The pretrained weights: a path, or a :class:`~lightning_mergeguard.ReferenceWeights` (to store
            it in ``bfloat16``, say). Default: the guard's reference object if a
            :class:`~lightning_mergeguard.MergeGuardCallback` is attached (held once for both), else a snapshot at
            fit start.
        backup_device: Where the live weights are kept while merges are evaluated (default: the model's device;
            ``"cpu"`` saves one model copy of accelerator memory at the cost of two transfers per probe).
        seed: Seed of randomized merges (DARE), so probes repeat.
        strict: Raise on a failed probe instead of warning and skipping it.
        progress: Show a progress bar while a probe runs.
        signals: Ownership signals evaluated on the live model and on every merge, logged as
            ``mergeprobe/own/<name>`` and ``mergeprobe/<label>/<name>``: objects with a ``name`` and
            ``__call__(module) -> rate`` (:class:`~lightning_mergeguard.ownership.FingerprintSignal`,
            :class:`~lightning_mergeguard.ownership.WatermarkSignal`) or a mapping ``{name: callable}``. They hold
            the owner's secrets, which are never logged nor saved in the probe's state. Every rank evaluates them
            (they are deterministic); rank zero logs.

    Example:
        >>> from lightning_mergeguard import MergeProbe, ProbeSchedule
        >>> probe = MergeProbe(donors={"math": "ft/math"}, methods=["task_arithmetic", "ties"],
        ...                    coefficients=[0.3, 0.5], schedule=ProbeSchedule(every_n_steps=200))  # doctest: +SKIP
    """

    def __init__(
        self,
        donors: Donors | Mapping[str, Any] | Sequence[Any],
        methods: Sequence[str | Mapping[str, Any] | os.PathLike[str]] = ("task_arithmetic",),
        coefficients: float | Sequence[float] | None = (0.3,),
        eval_dataloaders: Any = None,
        schedule: ProbeSchedule | None = None,
        score_fn: ScoreFn | None = None,
        eval_batches: int | None = 8,
        parameters: ParameterSelection | None = None,
        reference: str | os.PathLike[str] | ReferenceWeights | None = None,
        backup_device: str | None = None,
        seed: int = 0,
        strict: bool = False,
        progress: bool = True,
        signals: Sequence[Any] | Mapping[str, Any] = (),
    ) -> None:
        self.donors = donor_set(donors)
        self.donor_inputs = self.donors.sources
        if schedule is not None and not isinstance(schedule, ProbeSchedule):
            raise TypeError(f"schedule must be a ProbeSchedule or None, got {type(schedule).__name__}")
        self.schedule = schedule or ProbeSchedule()
        check_int(eval_batches, "eval_batches", low=1, want="a positive integer or None", optional=True)
        self.backup_device = parse_device(backup_device, "backup_device")
        self.signals = named_signals(signals)
        if is_number(coefficients):
            coefficients = [coefficients]  # one coefficient given alone
        if coefficients is not None and (
            not isinstance(coefficients, (list, tuple))
            or not coefficients
            or not all(is_number(c) for c in coefficients)
        ):
            raise ValueError(f"coefficients must be a non-empty list of finite numbers or None, got {coefficients!r}")
        if isinstance(methods, (str, os.PathLike, Mapping)):  # one method given alone, not a list of its letters
            methods = [methods]
        if not methods:
            raise ValueError("methods must name at least one merge method (e.g. ['task_arithmetic'])")
        # Validate the methods now (typos fail at construction, not mid-training).
        self.specs: list[ProbeSpec] = build_probe_specs(list(methods), list(self.donor_inputs), coefficients)
        self.methods = list(methods)
        self.coefficients = list(coefficients) if coefficients is not None else None
        if isinstance(eval_dataloaders, Mapping):  # typos fail now, not as a warning at every probe
            _check_task_names(eval_dataloaders, self.donor_inputs)
            for name, value in eval_dataloaders.items():
                if isinstance(value, tuple) and (len(value) != 2 or not callable(value[1])):
                    raise ValueError(
                        f"MergeProbe: eval_dataloaders[{name!r}] must be a loader or (loader, score_fn) with a "
                        f"callable score_fn(module, batch) -> (score_sum, count), got {value!r:.100}"
                    )
        if score_fn is not None and not callable(score_fn):
            raise ValueError("MergeProbe: score_fn must be callable (module, batch) -> (score_sum, count)")
        self.eval_dataloaders = eval_dataloaders
        self.score_fn = score_fn or default_score
        self.eval_batches = eval_batches
        self.selection = parameter_selection(parameters)
        self._reference_given = reference is not None
        self.seed = seed
        self.strict = strict
        self.progress = progress
        self.skipped_for_budget = 0
        self._probe_time = 0.0
        self._train_start: float | None = None
        # state
        self.last_probe_step = -1
        self.results: list[dict[str, float]] = []
        self._params: dict[str, nn.Parameter] = {}
        self._buffers: dict[str, Tensor] = {}  # floating buffers merged too (BatchNorm running statistics)
        self._view: LoraView | None = None
        self._own_reference = reference_weights(reference)
        self._restores = RestoreTracker()  # a tuner's restore (LearningRateFinder, BatchSizeFinder) is no resume
        self._reference: ReferenceWeights = self._own_reference
        self._donor_tau: dict[str, dict[str, Tensor]] = {}
        self.donor_cosine: dict[str, float] = {}
        self._backup: dict[str, Tensor] | None = None
        self._tasks: dict[str, tuple[list[Any] | Any, ScoreFn]] | None = None
        self._donor_individual: dict[str, float] = {}
        self._all_names: list[str] = []

    # ------------------------------------------------------------------ setup
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(donors=sorted(self.donor_inputs), labels=[s.label for s in self.specs])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restores.new_fit()
            self._own_reference.new_fit()
            refuse_sharded(trainer, "MergeProbe", allow_fsdp2=True)
            refuse_pruning(trainer, pl_module, "MergeProbe", _PRUNING_WHY, _PRUNING_INSTEAD)
            replacers = weight_replacers_after(trainer, self)
            if replacers and self.schedule.on_train_end:
                rank_zero_warn(
                    f"MergeProbe comes before {replacers[0]} in callbacks, which replaces the weights with their "
                    "average at the end of training: the probe at the end of fit sees the weights before that. Put "
                    "the probe last to measure the model you keep."
                )
            if is_fsdp2(trainer) and is_adapted(pl_module):
                raise MisconfigurationException("MergeProbe does not support LoRA adapters under FSDP2 yet")
            if is_adapted(pl_module):
                LoraView(pl_module)  # refuses what it cannot express (DoRA, conv LoRA) before training starts

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reference = self._shared_reference(trainer)
        self._reference.follow(pl_module)  # shared with a guard: the first call of a fit resets it
        if weights_changed(self, pl_module) and not self._restores.state_restored:  # the results were the last model's
            self.results, self.last_probe_step = [], -1
        if is_adapted(pl_module):
            # A LoRA model is merged as its effective weights W + B @ A * s under the base model's names: every
            # weight of the base (a donor may have changed any), with theta_pre read from the frozen base weights.
            self._view = LoraView(pl_module)
            self._params = self.selection.filter(self._view.params)
            base = self._view.base_tensors()
            self._reference.resolve({n: base[n] for n in self._params})
        else:
            self._view = None
            self._params = self.selection.select(pl_module)
            if self._reference is self._own_reference:  # a guard's reference is checked by the guard
                self._reference.refuse_resumed_snapshot(self._restores.resumed(trainer), "MergeProbe", "donors/methods")
            self._reference.resolve(self._params)
            if self._reference is self._own_reference:
                self._reference.check_base_of(self._params, "MergeProbe", self.donors.check_base)
        if not self._params:
            raise ValueError("MergeProbe: no trainable parameters match parameters= (include/exclude)")
        every = self._view.params if self._view is not None else dict(pl_module.named_parameters())
        self._sharded = any_sharded(self._params)
        self._buffers = {} if self._view is not None or self._sharded else self._mergeable_buffers(pl_module)
        self._load_donors(trainer)
        self._all_names = [*every, *self._buffers]  # gradient parameters place buffers in their layer too
        self._tasks = None  # resolved at the first probe (the trainer's validation loader may load late)
        self._backup = None
        self._donor_individual = {}

    def _mergeable_buffers(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The floating buffers a merge of checkpoints also merges (BatchNorm's running statistics), as it would.

        Persistent buffers in the model's state dict, selected by ``include``/``exclude``, that the reference
        carries (those every donor carries too are kept when the donors are read, :meth:`_load_donors`).
        """
        persistent = set(pl_module.state_dict())
        found = {n: b for n, b in pl_module.named_buffers() if b.is_floating_point() and n in persistent}
        found = self.selection.filter(found)
        buffers = {n: found[n] for n in self._reference.provides(found)} if found else {}
        self._reference.resolve(buffers)
        self._warn_unmerged_buffers(len(found) - len(buffers), [n for n in found if n not in buffers])
        return buffers

    @staticmethod
    def _warn_unmerged_buffers(count: int, names: list[str]) -> None:
        if count:
            rank_zero_warn(
                f"MergeProbe: {count} floating buffers (e.g. {names[0]!r}, BatchNorm running statistics) are not in "
                "the reference or in every donor, so the probed merges keep the live model's values for them, where "
                "a merge of the checkpoints would merge them too"
            )

    @property
    def _merged(self) -> dict[str, Tensor]:
        """Every tensor a probed merge writes: the parameters, then the floating buffers merged with them."""
        return {**self._params, **self._buffers} if self._buffers else dict(self._params)

    def _shared_reference(self, trainer: pl.Trainer) -> ReferenceWeights:
        """The guard's reference when a guard is attached and this probe has no reference of its own."""
        if not self._reference_given:
            shared = guard_reference(trainer)
            if shared is not None:
                return shared
        return self._own_reference

    @property
    def reference(self) -> ReferenceWeights:
        """The reference weights in use (the guard's object when shared)."""
        return self._reference

    @property
    def donor_task_vectors(self) -> dict[str, dict[str, Tensor]]:
        """The donors' task vectors (donor -> parameter name -> tensor on ``donor_device``), loaded at fit start."""
        return dict(self._donor_tau)

    def _load_donors(self, trainer: pl.Trainer) -> None:
        """Read every donor now, check it against the base tensor by tensor, and keep its task vector."""
        self._donor_tau, self.donor_cosine = {}, {}
        itemsize = torch.empty((), dtype=self.donors.dtype).element_size()
        per_process = len(self.donor_inputs) * itemsize * sum(local(p).numel() for p in self._merged.values())
        refuse_unaffordable(
            per_process,
            self.donors.device,
            trainer,
            f"MergeProbe: holding {len(self.donor_inputs)} donors' task vectors",
            "pass Donors(..., dtype='bfloat16') (half), fewer donors, parameters=ParameterSelection(include=...) "
            "to probe fewer weights, or shard the model with FSDP2 (each rank then holds its rows)",
        )
        for name, obj in self.donor_inputs.items():
            self._donor_tau[name], self.donor_cosine[name] = donor_task_vector(
                obj,
                name,
                self._merged,
                self._reference,
                device=self.donors.device,
                dtype=self.donors.dtype,
                check_base=self.donors.check_base,
                optional=self._buffers,
            )
        # A buffer merges only where every donor has it: the others keep their live values.
        lacking = [n for n in self._buffers if any(n not in tau for tau in self._donor_tau.values())]
        for n in lacking:
            del self._buffers[n]
            for tau in self._donor_tau.values():
                tau.pop(n, None)
        self._warn_unmerged_buffers(len(lacking), lacking)

    def _resolve_tasks(self, trainer: pl.Trainer) -> dict[str, tuple[Any, ScoreFn]]:
        loaders = self.eval_dataloaders
        if loaders is None:
            # Loaded now if a probe comes before the first validation (every_n_steps, num_sanity_val_steps=0), or
            # if Lightning never loads it (limit_val_batches=0, no validation_step).
            loaders = validation_loader(trainer)
            if loaders is None:
                raise ValueError(
                    "MergeProbe needs eval_dataloaders, or a validation dataloader given to trainer.fit "
                    "(val_dataloaders=...) or defined by the LightningModule or DataModule"
                )
        if not isinstance(loaders, Mapping):
            loaders = {OWN: loaders}
        _check_task_names(loaders, self.donor_inputs)  # a validation loader given as a mapping too
        tasks = {}
        budget = debug_run_batches(trainer, self.eval_batches)  # fast_dev_run: its batch count
        for name, value in loaders.items():
            loader, fn = value if isinstance(value, tuple) else (value, self.score_fn)
            if hasattr(loader, "__len__") and len(loader) == 0:  # every probe would fail on it, mid-training
                raise ValueError(f"MergeProbe: the evaluation data of {name!r} has no batches")
            batches, shard = eval_share(loader, budget, trainer.global_rank, trainer.world_size)
            tasks[name] = (as_trained(trainer, batches), fn, shard)
        return tasks

    # ------------------------------------------------------------------ cadence
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._probe_time = 0.0  # the budget is per fit: a reused probe starts afresh

    def _within_budget(self, trainer: pl.Trainer) -> bool:
        if self.schedule.max_overhead is None or self._train_start is None:
            return True
        elapsed = time.perf_counter() - self._train_start - self._probe_time
        ok = self._probe_time <= self.schedule.max_overhead * max(elapsed, 1e-9)
        ok = bool(trainer.strategy.broadcast(ok, src=0))
        if not ok:
            self.skipped_for_budget += 1
        return ok

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        every = self.schedule.every_n_steps
        due = every and step > 0 and step % every == 0 and step != self.last_probe_step
        if due and self._within_budget(trainer):
            self.probe(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.schedule.every_n_epochs
        due = every and (trainer.current_epoch + 1) % every == 0
        if due and trainer.global_step != self.last_probe_step and self._within_budget(trainer):
            self.probe(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.on_train_end:
            self.probe(trainer, pl_module, force=True)

    # ------------------------------------------------------------------ probing
    def _evaluate(self, pl_module: pl.LightningModule, task: str, trainer: pl.Trainer) -> float:
        batches, fn, shard = self._tasks[task]
        strategy, world = trainer.strategy, trainer.world_size
        try:
            with trainer.precision_plugin.forward_context():  # autocast under *-mixed, as in the validation loop
                return 100.0 * evaluate(
                    pl_module,
                    batches,
                    fn,
                    device=pl_module.device,
                    shard=shard,
                    reduce=(lambda t: strategy.reduce(t, reduce_op="sum")) if world > 1 else None,
                )
        except ValueError as err:
            raise ValueError(f"MergeProbe: the {task!r} evaluation saw no examples") from err

    @torch.no_grad()
    def _write(self, merged: Mapping[str, Tensor] | None, donor: str | None = None) -> None:
        """Write merged weights (or ``base + donor tau``, or the backup when both are None) into the live model."""
        assert self._backup is not None
        for n, p in self._merged.items():
            q = local(p)  # this rank's shard under FSDP2, else the parameter itself
            if merged is not None:
                q.copy_(merged[n])
            elif donor is not None:
                tau = self._donor_tau[donor][n].to(q.device, q.dtype, non_blocking=True)
                q.copy_(local(self._reference[n]).to(q.device, q.dtype, non_blocking=True) + tau)
            else:
                q.copy_(self._backup[n], non_blocking=True)

    def _backup_live(self) -> None:
        if self._backup is None:
            pin = self.backup_device is not None and self.backup_device.type == "cpu"
            self._backup = {}
            for n, p in self._merged.items():
                q = local(p)
                b = torch.empty_like(q, device=self.backup_device or q.device)
                self._backup[n] = b.pin_memory() if pin and q.is_cuda else b
        with torch.no_grad():
            for n, p in self._merged.items():
                self._backup[n].copy_(local(p).detach())  # blocking: the backup must hold these values before merges

    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, force: bool = False) -> dict[str, float]:
        """Run every configured merge now and log the results (also callable by hand).

        On a LoRA model the adapters are merged into their base weights for the probe's duration (the merges see
        ``W + B @ A * s``) and the base weights are restored bit for bit afterwards. The probe leaves the training
        run as it found it: the weights, every submodule's train/eval mode and the global random state.

        Args:
            trainer: The running trainer.
            pl_module: Its LightningModule.
            force: Probe even off the cadence (``every_n_*``).

        Returns:
            ``metric name -> value``, as logged (empty when no probe was due).
        """
        if not force and trainer.global_step == self.last_probe_step:
            return {}
        refuse_pruning(trainer, pl_module, "MergeProbe", _PRUNING_WHY, _PRUNING_INSTEAD)  # pruned by hand since setup
        # The global RNGs come back as they were: the training run is the same with or without a probe (loading
        # evaluation batches and sampling score functions draw from them).
        with rng_kept(pl_module), self._view.merged() if self._view is not None else nullcontext():
            return self._probe(trainer, pl_module)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        if self._tasks is None:
            self._tasks = self._resolve_tasks(trainer)
        self._backup_live()
        assert self._backup is not None
        device = local(next(iter(self._params.values()))).device
        ref = {n: local(t) for n, t in self._reference.as_dict(self._merged).items()}
        metrics: dict[str, float] = {}
        try:
            individual = {OWN: self._evaluate(pl_module, OWN, trainer)}
            for task in self._tasks:
                if task == OWN:
                    continue
                if task not in self._donor_individual:
                    self._write(None, donor=task)
                    self._donor_individual[task] = self._evaluate(pl_module, task, trainer)
                    self._write(None)
                individual[task] = self._donor_individual[task]
            for task, acc in individual.items():
                metrics[f"mergeprobe/{task}/individual_acc"] = acc
            for name, signal in self.signals.items():
                metrics[f"mergeprobe/{OWN}/{name}"] = float(signal(pl_module))
            sum_ranks = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if self._sharded else None
            # Over the weights only: a BatchNorm statistic's shift is not part of what was learned.
            live = {n: self._backup[n] for n in self._params}
            taus = {d: {n: tau[n] for n in self._params} for d, tau in self._donor_tau.items()}
            for name, cos in task_vector_cosines(live, ref, taus, device, sum_ranks).items():
                metrics[f"mergeprobe/cosine/{name}"] = cos
            sources: dict[str, WeightSource] = {
                LIVE: StateDictSource(self._backup, name=LIVE),
                BASE: StateDictSource(ref, name=BASE),
            }
            sources.update({d: TaskVectorSource(ref, tau, d, device) for d, tau in self._donor_tau.items()})
            bar = tqdm(
                self.specs, desc="MergeProbe", leave=False, disable=not (self.progress and trainer.is_global_zero)
            )
            for spec in bar:
                try:
                    self._merge_into_live(spec, sources)
                    scores = {task: self._evaluate(pl_module, task, trainer) for task in self._tasks}
                    metrics.update(merge_metrics(spec.label, scores, individual))
                    for name, signal in self.signals.items():
                        metrics[f"mergeprobe/{spec.label}/{name}"] = float(signal(pl_module))
                except Exception as err:  # a bad merge skips this probe entry unless strict
                    if self.strict:
                        raise
                    rank_zero_warn(f"MergeProbe: merge {spec.label!r} failed and was skipped: {err}")
                finally:
                    self._write(None)
        except Exception as err:
            self._write(None)
            if self.strict:
                raise
            rank_zero_warn(f"MergeProbe: probe at step {trainer.global_step} failed and was skipped: {err}")
            return {}
        metrics["mergeprobe/seconds"] = time.perf_counter() - start
        self._probe_time += metrics["mergeprobe/seconds"]
        self.last_probe_step = trainer.global_step
        self.results.append({"step": float(trainer.global_step), **metrics})
        log_to_loggers(trainer, metrics)
        return metrics

    def _merge_into_live(self, spec: ProbeSpec, sources: Mapping[str, WeightSource]) -> None:
        cfg = spec.config
        gather = self._sharded and not cfg.method.elementwise
        if gather:
            # FSDP2 and a method that needs whole tensors (TIES trim, DARE mask): gather one tensor at a time from
            # every source, merge it whole (so the result is a single process's), keep this rank's rows.
            sources = {k: GatheredSource(src, self._params) for k, src in sources.items()}  # no buffers when sharded
        models = {m.model: sources[m.model] for m in cfg.models if m.model != cfg.base_model}
        base = sources[cfg.base_model] if cfg.base_model is not None else None
        device = local(next(iter(self._params.values()))).device
        with torch.no_grad():
            # Gradient parameters interpolate over the whole model's layers, not only the ones include selects.
            merged = iter_merge(
                cfg, models, base, device=device, seed=self.seed, check_base=False, layer_names=self._all_names
            )
            tensors = self._merged
            for key, tensor in merged:
                if gather:
                    write_full_(tensors[key], tensor)
                else:  # elementwise methods merge each rank's shard as it is
                    local(tensors[key]).copy_(tensor)

    # ------------------------------------------------------------------ resume
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_probe_step": self.last_probe_step, "results": self.results}
        if self._reference is self._own_reference:  # a shared reference is saved by the guard that owns it
            state["reference"] = self._own_reference.state_dict()
        return state

    @override
    def _restore(self, state_dict: dict[str, Any]) -> None:
        self.last_probe_step = int(state_dict.get("last_probe_step", -1))
        self.results = list(state_dict.get("results", []))

    @override
    def _resumed_reference(self) -> ReferenceWeights:
        return self._own_reference  # a shared reference is restored by the guard that owns it

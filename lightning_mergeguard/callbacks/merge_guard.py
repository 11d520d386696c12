"""MergeGuardCallback: fine-tune with protection against unauthorized model merging."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import secrets as _secrets
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_mergeguard.adapters import LoraPair, LoraView, is_adapted, lora_redistribution_grad_
from lightning_mergeguard.callbacks._common import (
    as_trained,
    debug_run_batches,
    debug_run_stage2,
    eval_share,
    first_loader,
    is_fsdp2,
    log_to_loggers,
    refuse_pruning,
    refuse_sharded,
    refuse_unaffordable,
    repeat,
    validation_loader,
    weight_replacers_after,
)
from lightning_mergeguard.callbacks._restores import RestoreTracker, ResumableCallback
from lightning_mergeguard.callbacks._sharing import has_probe_donors, probe_donors
from lightning_mergeguard.callbacks.quantization_watermark import QuantizationWatermark
from lightning_mergeguard.errors import NonFiniteError
from lightning_mergeguard.evaluation import (
    LossFn,
    ScoreFn,
    default_loss,
    default_score,
    eval_mode,
    evaluate,
    rng_kept,
    score_parts,
)
from lightning_mergeguard.io import atomic_directory, atomic_write_json, save_safetensors
from lightning_mergeguard.merging.sources import uncompiled_name
from lightning_mergeguard.parameters import (
    ParameterSelection,
    filter_names,
    parameter_selection,
    refuse_non_finite,
    weights_changed,
)
from lightning_mergeguard.protection.redistribution import add_redistribution_grad_, redistribution_value
from lightning_mergeguard.protection.release.amplify import amplify_checked
from lightning_mergeguard.protection.release.settings import WRITE_DTYPES, Release, release_settings
from lightning_mergeguard.protection.release.symmetry import warn_amplify
from lightning_mergeguard.protection.stage2 import (
    DEFAULT_TOLERANCE,
    KeepWeights,
    MergeNeighbourhood,
    Stage2,
    Stage2Context,
    resolve_stage2,
)
from lightning_mergeguard.protection.stage2._adversarial import checkpointing_in_eval
from lightning_mergeguard.protection.verdict import check_castable, not_protected_reason, release_card
from lightning_mergeguard.reference import ReferenceWeights, reference_weights
from lightning_mergeguard.sharding import any_sharded, full, local, sum_across_ranks
from lightning_mergeguard.validation import check_int, check_number

_PRUNING_WHY = (
    "stage 2 moves every guarded weight, the pruned zeros included, so a pruned model would come out dense "
    "(measured: a layer 45% zeros before stage 2, 0% after), and while pruning is active the weights it would move "
    "are re-parametrised as weight_orig * weight_mask"
)
_PRUNING_INSTEAD = "Use MergeGuardCallback(stage2=None) alongside pruning: stage 1 works with it."


class MergeGuardCallback(ResumableCallback):
    r"""Dual-stage protection: a model that keeps its accuracy while merges that include it collapse.

    **Stage 1** (during fit) adds the L2 redistribution term ``alpha * sum_l c_l ||x_l||^2``, as its exact gradient
    added to ``.grad`` in ``on_before_optimizer_step`` (a callback cannot change the loss Lightning
    backpropagates); it is logged as ``mergeguard/l2_term``. LoRA models are protected as the weights a merge
    combines (``W + B @ A * s``), and FSDP2 runs on each rank's shard. The method, and how the callback behaves with
    AMP, accumulation, DDP, FSDP2, LoRA, resume, pruning and weight averaging, is explained once, in the *How it
    works* guide (``docs/guides/how-it-works.md``); the LoRA and FSDP2 guides give the details of each.

    **Stage 2** (in ``on_train_end``; in ``on_fit_end`` when a resumed fit had no step left) perturbs the trained
    weights with a strategy object (:mod:`~lightning_mergeguard.protection.stage2`):
    :class:`~lightning_mergeguard.protection.stage2.ScaleAdversarial`
    (the default) or :class:`~lightning_mergeguard.protection.stage2.Negation`, each with its own settings. The
    strategy runs under a guard rail on the monitored score (``score_fn`` on up to ``eval_batches`` validation
    batches): it may not cost more than ``tolerance`` points. Validation passes run under the trainer's precision
    context (autocast for ``*-mixed``); the optimisation does too, except with ``16-mixed``, whose gradients would
    need loss scaling. The callback's state records that stage 2 ran, so a resumed or repeated fit that trains no
    further step does not perturb twice; one that trains the protected weights further (a resume with more epochs,
    a second ``fit``) applies stage 2 again at its end, with a warning, since training can undo it. A model that
    was amplified cannot be trained further (refused at the first optimizer step). The report (settings, checks,
    score before/after, validation passes) is written as JSON to ``report_path``; ``save_path`` receives the
    protected weights (safetensors). Checkpoints written by ``ModelCheckpoint`` during fit hold pre-stage-2 weights.
    Under ``Trainer(fast_dev_run=...)`` stage 2 runs two steps with one check, on as many validation batches as the
    debug run takes, to show that it runs before a long fit; like Lightning's checkpoints, nothing is written then.

    Args:
        alpha: Strength of the stage-1 term (0 disables stage 1).
        target: ``"task_vector"`` (L2-SP style) or ``"weights"`` (plain weight decay).
        normalize: Divide each tensor's squared norm by its size.
        parameters: Which weights the two stages touch (:class:`~lightning_mergeguard.parameters.ParameterSelection`:
            ``include``, ``exclude``, and ``stage2_exclude``, by default embeddings, final norms, LM and task heads).
            Default: every trainable weight in stage 1, less those in stage 2.
        reference: The pretrained weights ``theta_pre``: a path (safetensors, HF directory, ``.bin``/``.ckpt``), or
            a :class:`~lightning_mergeguard.ReferenceWeights` to choose its storage (``dtype="bfloat16"`` halves its
            memory; ``device="cpu"`` frees accelerator memory at the cost of one host-to-device copy per optimizer
            step). Default: a snapshot of the weights at fit start. Shared with a
            :class:`~lightning_mergeguard.MergeProbe` attached to the same trainer (see :attr:`reference`).
        stage2: ``"scale_adversarial"`` (default settings), ``"merge_neighbourhood"``, ``"negation"``,
            ``"none"``/``None``, or a configured :class:`~lightning_mergeguard.protection.stage2.Stage2` object
            such as ``ScaleAdversarial(steps=100)`` or ``MergeNeighbourhood(partners=[...])``. ``"none"`` with
            ``amplify`` applies the re-parameterisation alone to the fine-tuned weights
            (:class:`~lightning_mergeguard.protection.stage2.KeepWeights`): the own score does not move, and
            re-alignment to ``theta_pre`` gives the plain fine-tune back.
        score_fn: ``(module, batch) -> (score_sum, count)``, or one number (the batch's mean score); default:
            accuracy for ``(x, y)`` and HF LM batches.
        loss_fn: ``(module, batch) -> loss``; default: cross-entropy / HF ``loss``.
        eval_batches: Budget of validation batches for the guard rail.
        tolerance: Largest allowed drop of the score, in points (percent).
        report_path: Where to write the protection report (JSON).
        save_path: Where to save the protected model. A path ending in ``.safetensors``: the module's weights in
            one file. Any other path is a directory to publish: for a Hugging Face model inside the LightningModule,
            its ``save_pretrained`` layout (the bare model's names, tied weights kept tied, its config, and the
            module's ``tokenizer`` when it has one), so ``from_pretrained`` loads it; otherwise ``model.safetensors``;
            with ``MERGEGUARD.md`` (a model-card paragraph) and ``protection_report.json`` beside it. On a LoRA model,
            a directory in PEFT's adapter format.
        progress: Show progress bars during stage 2.
        keep_batches: Batches whose behaviour stage 2 must keep: their loss joins the own-loss term of the
            optimisation (e.g. a fingerprint's rows, so protection and proof of ownership go together).
        release: What happens after stage 2 to the model you publish
            (:class:`~lightning_mergeguard.protection.release.Release`): ``ownership_key`` (embed a secret key and
            write it to a file, one more validation pass; full fine-tunes under DDP or one device, refused on LoRA
            and FSDP2), ``deployment_check`` (score the release under fp16, bf16, int8, 4-bit, GGUF and 50 steps of
            further fine-tuning, into the report; single process), ``dtype`` (of ``save_path``'s weights), and the
            re-parameterisation ``amplify``/``permute_residual``, which is not a recommended setting: any other
            fine-tune of the same base undoes it, and it collapses the release under fp16, int8, 4-bit and
            fine-tuning (refused on LoRA and FSDP2; a model it rescaled cannot be trained further). Default: the
            protected weights as they are.

    Example:
        >>> from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial
        >>> guard = MergeGuardCallback(alpha=0.01, stage2=ScaleAdversarial(steps=100))
        >>> # trainer = pl.Trainer(callbacks=[guard]); trainer.fit(model, datamodule)
    """

    shares_reference = True
    """A MergeProbe on the same trainer uses this callback's reference (held once), in any order of callbacks."""

    def __init__(
        self,
        alpha: float = 0.01,
        target: Literal["task_vector", "weights"] = "task_vector",
        normalize: bool = False,
        parameters: ParameterSelection | None = None,
        reference: str | os.PathLike[str] | ReferenceWeights | None = None,
        stage2: str | Stage2 | None = "scale_adversarial",
        score_fn: ScoreFn | None = None,
        loss_fn: LossFn | None = None,
        eval_batches: int = 8,
        tolerance: float = DEFAULT_TOLERANCE,
        report_path: str | None = None,
        save_path: str | None = None,
        progress: bool = True,
        keep_batches: Sequence[Any] | None = None,
        release: Release | None = None,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if target not in ("task_vector", "weights"):
            raise ValueError(f"target must be 'task_vector' or 'weights', got {target!r}")
        check_int(eval_batches, "eval_batches", low=1, want="a positive integer")
        check_number(tolerance, "tolerance", want="a number of points >= 0")
        self.alpha = float(alpha)
        self.target = target
        self.normalize = normalize
        self.selection = parameter_selection(parameters)
        self.reference = reference_weights(reference)
        self.stage2 = resolve_stage2(stage2)
        for what, fn in (("score_fn", score_fn), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):  # found now, not when stage 2 starts after the whole fit
                raise ValueError(f"{what} must be callable (module, batch) -> ..., got {fn!r:.80}")
        self.score_fn = score_fn or default_score
        self.loss_fn = loss_fn or default_loss
        self.eval_batches = eval_batches
        self.tolerance = float(tolerance)
        if report_path is not None and os.path.isdir(report_path):  # found now, not after the whole fit
            raise ValueError(
                f"report_path {report_path!r} is a directory; give a file path such as '{report_path}/protection.json'"
            )
        self.report_path = report_path
        self.save_path = save_path
        source = self.reference.source
        if isinstance(source, (str, os.PathLike)) and save_path is not None:
            ref, saved = Path(source).resolve(), Path(save_path).resolve()
            if ref == saved or ref.is_relative_to(saved):
                raise ValueError(
                    f"save_path {save_path!r} would write the protected model over the reference weights it reads "
                    f"({source!r}); choose another save_path"
                )
        self.progress = progress
        self.keep_batches = _batch_list(keep_batches)
        self.release = release_settings(release)
        if self.release.amplify is not None:
            warn_amplify(self.release.amplify, "MergeGuardCallback")
            if self.stage2 is None:
                # The re-parameterisation alone, on the fine-tuned weights (own score unchanged; see KeepWeights)
                self.stage2 = KeepWeights()
        # state
        self.stage2_done = False
        self.report: dict[str, Any] | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._judged: set[int] = set()  # ids of trainable weights already guarded or left out by include/exclude
        self._view: LoraView | None = None
        self._pairs: dict[str, LoraPair] = {}
        self._stage1_values: dict[str, torch.Tensor] = {}
        self._start_step = 0
        self._train_ended = False
        self._restores = RestoreTracker()  # a tuner's restore (LearningRateFinder, BatchSizeFinder) is no resume
        self._tried: set[str] = set()  # loss_fn / score_fn already tried on a batch of this fit
        self._fn_failed = False

    # ------------------------------------------------------------------ setup
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, target=self.target)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restores.new_fit()
            self._tried, self._fn_failed = set(), False
            self.reference.new_fit()
            refuse_sharded(trainer, "MergeGuardCallback", allow_fsdp2=True)
            replacers = weight_replacers_after(trainer, self)
            if replacers and self.stage2 is not None:
                raise MisconfigurationException(
                    f"MergeGuardCallback comes before {replacers[0]} in callbacks: that callback replaces the weights "
                    "with their average at the end of training, after stage 2, so the model would end unprotected. "
                    f"Put MergeGuardCallback after {replacers[0]} (stage 2 then protects the averaged weights)."
                )
            marks = [c for c in trainer.callbacks if isinstance(c, QuantizationWatermark)]
            if marks and self.stage2 is not None:
                raise MisconfigurationException(
                    "MergeGuardCallback with a stage 2 and QuantizationWatermark on one trainer: stage 2 moves the "
                    "weights out of the int8 intervals the watermark keeps them in, so the int8 model would no longer "
                    "round to the original and the watermark's rows are not in stage 2's own loss. This is not "
                    "supported: use MergeGuardCallback(stage2=None) alongside the watermark (stage 1 only), or one "
                    "of the two per fit and check the result (verify_watermark, a MergeProbe)."
                )
            if self.stage2 is not None:
                refuse_pruning(trainer, pl_module, "MergeGuardCallback with a stage 2", _PRUNING_WHY, _PRUNING_INSTEAD)
            guards = [c for c in trainer.callbacks if isinstance(c, MergeGuardCallback)]
            if len(guards) > 1:
                raise MisconfigurationException(
                    f"the trainer has {len(guards)} MergeGuardCallbacks: each would add its stage-1 term and perturb "
                    "the weights again in stage 2; use one (its parameters=ParameterSelection(...) selects the "
                    "weights it protects)"
                )
            if is_fsdp2(trainer) and self.stage2 is not None and not self.stage2.supports_sharded:
                raise MisconfigurationException(
                    f"MergeGuardCallback: stage 2 {self.stage2.name!r} does not support FSDP2-sharded parameters "
                    "yet; use ScaleAdversarial (the default), or stage2='none' and protect the saved model with "
                    "mergeguard-protect"
                )
            if self.release.amplify is not None and (is_fsdp2(trainer) or is_adapted(pl_module)):
                raise MisconfigurationException(
                    "MergeGuardCallback(release=Release(amplify=...)) rescales full weights: it does not support "
                    "FSDP2 or LoRA adapters; amplify the saved merged model with mergeguard-protect --amplify instead"
                )
            if self.release.dtype != "auto" and is_adapted(pl_module):
                raise MisconfigurationException(
                    f"MergeGuardCallback(release=Release(dtype={self.release.dtype!r})): a LoRA adapter is saved in "
                    "PEFT's format, in the dtype it was trained in; cast the merged model instead"
                )
            if self.release.ownership_key is not None and (
                is_fsdp2(trainer) or is_adapted(pl_module) or self.stage2 is None
            ):
                raise MisconfigurationException(
                    "MergeGuardCallback(release=Release(ownership_key=...)) keys full weight matrices after "
                    "stage 2: it needs a stage 2 "
                    "(stage2=KeepWeights() for the key alone) and does not support FSDP2 or LoRA adapters; key the "
                    "saved (merged) model with mergeguard-protect --ownership-key instead"
                )
            if (
                self.save_path is not None
                and os.path.isfile(self.save_path)
                and not str(self.save_path).endswith(".safetensors")
            ):
                raise ValueError(
                    f"MergeGuardCallback: save_path {self.save_path!r} is a file; pass a directory to publish the "
                    "model in (or a path ending in .safetensors for its weights alone)"
                )
            if is_fsdp2(trainer) and is_adapted(pl_module):
                raise MisconfigurationException("MergeGuardCallback does not support LoRA adapters under FSDP2 yet")
            if is_adapted(pl_module):
                LoraView(pl_module)  # refuses what it cannot express (DoRA, conv LoRA) before training starts
                if self.target != "task_vector":
                    raise ValueError(
                        "MergeGuardCallback: target='weights' on a LoRA model would penalise the frozen base weights, "
                        "which training cannot change; use target='task_vector' (the adapter's update B @ A * s)"
                    )
                if self.save_path and str(self.save_path).endswith(".safetensors"):
                    raise ValueError(
                        f"MergeGuardCallback: on a LoRA model save_path is a directory for PEFT's adapter format "
                        f"(adapter_model.safetensors + adapter_config.json), got the file name {self.save_path!r}"
                    )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = False
        self.reference.follow(pl_module)
        if weights_changed(self, pl_module) and not self._restores.state_restored:
            # A callback reused for another model (a sweep): its reference (reset just above), "stage 2 done" and
            # the report were the previous model's (unless this fit's checkpoint restored them).
            self.stage2_done, self.report = False, None
            self._params, self._judged, self._view, self._pairs = {}, set(), None, {}
            rank_zero_info("MergeGuardCallback: another model is being fitted; starting from its own weights.")
        if is_adapted(pl_module):
            # LoRA: stage 1 penalises each adapter's update B @ A * s (its task vector) through A and B, and the
            # usual term applies to modules PEFT trains in full; names are the base model's (see LoraView).
            self._view = LoraView(pl_module)
            self._pairs = self.selection.filter(self._view.pairs)
            trained = {n: p for n, p in self._view.params.items() if p.requires_grad and n not in self._view.pairs}
            self._params = self.selection.filter(trained)
            if self._params:  # modules trained in full are snapshotted; the adapters' base weights are pretrained
                self.reference.refuse_resumed_snapshot(
                    self._restores.resumed(trainer), "MergeGuardCallback", "alpha/target"
                )
            base = self._view.base_tensors()
            self.reference.resolve({n: base[n] for n in [*self._params, *self._pairs]})
            if not (self._params or self._pairs):
                raise ValueError(
                    "MergeGuardCallback: no adapted or trainable weights match parameters= (include/exclude)"
                )
            return
        self._view, self._pairs = None, {}
        self._params = self.selection.select(pl_module)
        if not self._params:
            raise ValueError("MergeGuardCallback: no trainable parameters match parameters= (include/exclude)")
        self._refuse_unaffordable_partners(trainer, pl_module)
        self.reference.refuse_resumed_snapshot(self._restores.resumed(trainer), "MergeGuardCallback", "alpha/target")
        self.reference.resolve(self._params)
        self.reference.check_base_of(self._params, "MergeGuardCallback")
        self._judged = {id(p) for p in self._params.values()}
        if self.stage2 is not None and not self.stage2_done and not self.selection.select_stage2(pl_module):
            rank_zero_warn(
                "MergeGuardCallback: every trainable weight matches stage2_exclude (embeddings, norms, heads), so "
                "stage 2 would have nothing to perturb and fail at the end of fit, unless weights are unfrozen "
                "before then; pass parameters=ParameterSelection(stage2_exclude=[]) (or a narrower list) to "
                "perturb them"
            )

    def _refuse_unaffordable_partners(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse now, not after the fit, partners this machine cannot hold.

        MergeNeighbourhood holds its partners' and surrogates' task vectors on the CPU in float32 in stage 2.
        """
        if not isinstance(self.stage2, MergeNeighbourhood):
            return
        # A probe's donors are shared with it, not copied; they count as partners for the default surrogates.
        probed = self.stage2.use_probe_donors and has_probe_donors(trainer)
        copies = len(self.stage2.partners) + self.stage2.surrogate_count(bool(self.stage2.partners) or probed)
        perturbed = self.selection.select_stage2(pl_module)
        refuse_unaffordable(
            4 * copies * sum(p.numel() for p in perturbed.values()),
            torch.device("cpu"),
            trainer,
            f"MergeGuardCallback: MergeNeighbourhood's {copies} partners and surrogates (float32 task vectors)",
            "pass fewer partners or surrogates, or narrow the perturbed weights with "
            "parameters=ParameterSelection(include=, stage2_exclude=)",
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's training state is restored: steps beyond this one train the weights of this fit.
        self._start_step = trainer.global_step

    # ------------------------------------------------------------------ fail fast
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self._try_fn("loss_fn", "training", trainer, pl_module, batch, lambda b: self.loss_fn(pl_module, b))

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0 and trainer.state.fn == "fit":  # the loader the guard rail scores
            self._try_fn(
                "score_fn", "validation", trainer, pl_module, batch, lambda b: score_parts(self.score_fn(pl_module, b))
            )

    def _try_fn(
        self,
        what: str,
        kind: str,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        run: Callable[[Any], Any],
    ) -> None:
        """Run stage 2's ``loss_fn``/``score_fn`` once per fit on the first batch, so a failure stops the fit now.

        Stage 2 first calls them after the whole fit. The call runs in eval mode with the global random state kept,
        so the training run is the same with or without it; without gradients, and for ``loss_fn`` again with them
        (as stage 2 calls it, checkpointing kept) before a failure counts: a loss may differentiate inside.
        """
        if what in self._tried or self.stage2 is None or self.stage2_done:
            return
        self._tried.add(what)

        def attempt(grad: bool) -> None:
            with (
                torch.set_grad_enabled(grad),
                rng_kept(pl_module),
                eval_mode(pl_module),
                checkpointing_in_eval(pl_module) if grad else contextlib.nullcontext(),
                trainer.precision_plugin.forward_context(),
            ):
                run(as_trained(trainer, [batch])[0])

        try:
            try:
                attempt(grad=False)
            except Exception:
                if what != "loss_fn":
                    raise
                attempt(grad=True)
        except Exception as err:
            self._fn_failed = True
            default = getattr(self, what) in (default_loss, default_score)
            remedy = f"pass your own {what}=" if default else f"fix {what}"
            raise MisconfigurationException(
                f"MergeGuardCallback: {'the default ' if default else ''}{what} fails on the first {kind} batch, so "
                f"stage 2 would fail at the end of fit: {type(err).__name__}: {err}. To protect, {remedy} (see "
                "lightning_mergeguard.evaluation); or pass stage2=None."
            ) from err

    # ------------------------------------------------------------------ stage 1
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.stage2_done and _amplified(self.report):
            # Refused before the first step changes anything: stage 1 would pull the rescaled weights towards
            # theta_pre coordinate by coordinate, which is not the function they compute.
            raise MisconfigurationException(
                "MergeGuardCallback: this model was amplified at the end of an earlier fit (its weights are "
                "rescaled by exact symmetries), so it cannot be trained further: resume from a checkpoint written "
                "before stage 2, or re-align it to theta_pre first "
                "(lightning_mergeguard.protection.release.symmetry.realign)"
            )
        if self.alpha == 0:
            return
        # Only the weights this optimizer steps get the term: with several optimizers (manual optimization, GANs)
        # each weight gets it once, from its own optimizer, whatever order they step in.
        stepped_params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._view is None:
            self._join_unfrozen(pl_module, stepped_params)
        stepped = {id(p) for p in stepped_params}
        params = {n: p for n, p in self._params.items() if id(p) in stepped}
        factors = [p for pair in self._pairs.values() for p in (pair.a, pair.b) if id(p) in stepped]
        if not (params or factors):
            return
        for p in [*params.values(), *factors]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        reference = self.reference.on_device(params) if self.target == "task_vector" else None
        # The term's value costs an extra pass over the weights: compute it only when the trainer logs. It is the
        # whole term, over every guarded weight, whichever optimizer steps.
        logging_step = (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.global_step == 0
        value = add_redistribution_grad_(
            params, reference, alpha=self.alpha, normalize=self.normalize, compute_value=logging_step
        )
        rest = {n: p for n, p in self._params.items() if n not in params} if value is not None else {}
        if rest:  # weights another optimizer steps: in the logged value, not in this step's gradients
            value += redistribution_value(
                list(rest.values()),
                self.reference.on_device(rest) if self.target == "task_vector" else None,
                alpha=self.alpha,
                normalize=self.normalize,
            )
        if self._pairs:
            lora_value = lora_redistribution_grad_(
                self._pairs, alpha=self.alpha, normalize=self.normalize, compute_value=logging_step, only=factors
            )
            value = None if value is None or lora_value is None else value + lora_value
        if value is not None:
            pl_module.log("mergeguard/l2_term", value, on_step=True, on_epoch=False)

    def _join_unfrozen(self, pl_module: pl.LightningModule, stepped: Sequence[nn.Parameter]) -> None:
        """Guard weights unfrozen during fit (``BackboneFinetuning``, a custom unfreeze) from then on.

        They were frozen since fit start, so their value now is the pretrained one: the reference snapshots it (or
        reads it from the reference source, or from a checkpoint written after they joined).
        """
        new_ids = [id(p) for p in stepped if p.requires_grad and id(p) not in self._judged]
        if not new_ids:
            return
        self._judged.update(new_ids)
        wanted = set(new_ids)
        new = {n: p for n, p in self.selection.select(pl_module).items() if id(p) in wanted and n not in self._params}
        if new:
            self.reference.resolve(new, snapshot_missing=True)
            self._params.update(new)
            rank_zero_info(
                f"MergeGuardCallback: {len(new)} weights unfrozen during fit (e.g. {next(iter(new))!r}) are guarded "
                "from now on, against their pretrained values"
            )

    # ------------------------------------------------------------------ stage 2
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips on_train_end when fit is interrupted: the weights in memory are stage 1's, unprotected.
        if isinstance(exception, NonFiniteError) or self._fn_failed:
            return  # the error says it all: there is nothing worth protecting, or nothing trained yet
        if self.stage2 is not None and not self.stage2_done and trainer.state.fn == "fit":
            rank_zero_warn(
                f"MergeGuardCallback: fit stopped with {type(exception).__name__}, so stage 2 was not applied and the "
                "model is NOT protected (only stage 1 ran). Resume the fit from its checkpoint, or protect the saved "
                "weights with mergeguard-protect."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = True
        if self.stage2 is None:
            return
        if self.stage2_done:
            trained = trainer.global_step - self._start_step
            if trained <= 0:
                rank_zero_warn("MergeGuardCallback: stage 2 was already applied to this model; not applying it again.")
                return
            # A few steps of fine-tuning can undo stage 2 (that is the repair attack), so the weights this fit
            # trained are protected again rather than reported as protected.
            rank_zero_warn(
                f"MergeGuardCallback: this model trained {trained} optimizer steps after stage 2 was applied, which "
                "can undo it; applying stage 2 again to the weights as they are now."
            )
        self._apply_stage2(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips the training loop, on_train_end included, when it has nothing left to do: a fit resumed
        # from a checkpoint written at the end of training, before stage 2 (a ModelCheckpoint's last.ckpt, say
        # after stage 2 itself was interrupted), would otherwise end with an unprotected model and no word.
        if self.stage2 is None or self.stage2_done or self._train_ended:
            return
        if trainer.global_step == 0:
            rank_zero_warn(
                "MergeGuardCallback: this fit trained no step (limit_train_batches=0, or max_epochs/max_steps of 0), "
                "so stage 2 did not run and the model is NOT protected."
            )
            return
        if is_fsdp2(trainer):
            rank_zero_warn(
                "MergeGuardCallback: this fit resumed a checkpoint whose training was complete, so Lightning skipped "
                "the training loop and stage 2 did not run: the model is NOT protected. Under FSDP2 it cannot run "
                "after the strategy's teardown; resume with one more epoch, or protect the saved model with "
                "mergeguard-protect."
            )
            return
        rank_zero_info(
            f"MergeGuardCallback: this fit resumed a checkpoint whose training was complete (step "
            f"{trainer.global_step}), so Lightning skipped the training loop; applying stage 2 now."
        )
        # The strategy's teardown has moved the model to the CPU: stage 2 runs where training ran, and the model
        # is left on the CPU as Lightning leaves it after fit.
        device = trainer.strategy.root_device
        pl_module.to(device)
        try:
            self._apply_stage2(trainer, pl_module)
        finally:
            pl_module.cpu()

    def _apply_stage2(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run stage 2 (and amplify) on the trained weights, then report, log and save."""
        assert self.stage2 is not None
        # Pruning applied to the model by hand during fit (ModelPruning itself is refused at setup).
        refuse_pruning(trainer, pl_module, "MergeGuardCallback with a stage 2", _PRUNING_WHY, _PRUNING_INSTEAD)
        start = time.perf_counter()
        fine_tune = self._snapshot_for_deployment(trainer, pl_module)
        if self._view is None:
            params = self.selection.select_stage2(pl_module)
            ctx, after, extra, tau, moved = self._run_stage2(trainer, pl_module, params)
            if self.release.ownership_key is not None:
                extra["ownership_key"] = self._embed_key(trainer, ctx, extra)
                after = extra["ownership_key"]["score_after_key"]
            if self.release.amplify is not None:
                # only the fine-tuned weights (include/exclude), as selected at fit start
                after, extra["amplify"] = amplify_checked(
                    pl_module,
                    self.release.amplify,
                    ctx,
                    after,
                    names=set(self._params),
                    permute_residual=self.release.permute_residual,
                )
        else:
            ctx, after, extra, tau, moved = self._run_stage2_lora(trainer, pl_module)
        self.report = {
            "method": self.stage2.name,
            "settings": self._settings(),
            "parameters_perturbed": len(ctx.params),
            "score_before": ctx.before,
            **extra,
            "score_after": after,
            "score_delta": after - ctx.before,
            "relative_perturbation": moved / tau if tau > 0 else float("nan"),
            "task_vector_norm": tau,
            "validation_passes": self._passes,
            "seconds": time.perf_counter() - start,
            "fast_dev_run": bool(trainer.fast_dev_run),
        }
        if fine_tune is not None:
            self.report["deployment"] = self._deployment_table(pl_module, ctx, fine_tune)
        changed = moved > 0 or bool((extra.get("amplify") or {}).get("applied"))
        reason = not_protected_reason(self.report, changed, stage2_words=_ADVICE)
        self.report.update(protected=reason is None, not_protected=reason)
        if reason is not None:
            rank_zero_warn(f"MergeGuardCallback: the model is NOT protected: {reason}.")
        self.stage2_done = True
        self._publish(trainer, pl_module)

    def _embed_key(self, trainer: pl.Trainer, ctx: Stage2Context, stage2_report: dict[str, Any]) -> dict[str, Any]:
        """Embed the ownership key (the same secret on every rank) and write it on rank zero.

        The guard rail checks it at full precision and in the formats stage 2 was told users deploy.
        """
        from lightning_mergeguard.protection.release.key import embed_release_key

        secret = trainer.strategy.broadcast(_secrets.randbits(63))
        path = self.release.ownership_key if trainer.is_global_zero else None
        names = {n: p for n, p in ctx.params.items() if n in self._params}  # the fine-tuned weights only
        entry = embed_release_key(names, ctx, stage2_report, path, self.release.key_strength, secret=secret)
        rank_zero_info(f"MergeGuardCallback: ownership key embedded in {entry['tensors']} tensors, written to {path}")
        return entry

    def _snapshot_for_deployment(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor] | None:
        """The fine-tune's weights before stage 2 (on the CPU), when a deployment check will compare with them."""
        if not self.release.deployment_check:
            return None
        if trainer.world_size > 1 or self._view is not None:
            rank_zero_warn(
                "MergeGuardCallback: deployment_check runs in a single process on a full fine-tune; skipped here "
                "(run mergeguard-protect --deployment-check on the saved model)"
            )
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def _deployment_table(
        self, pl_module: pl.LightningModule, ctx: Stage2Context, fine_tune: dict[str, Tensor]
    ) -> dict[str, dict[str, float]]:
        """Own score under each deployment treatment, of the fine-tune before stage 2 and the protected model."""
        from lightning_mergeguard.protection.release.deployment import deployment_check

        def run() -> dict[str, float]:
            return deployment_check(pl_module, lambda m: ctx.metric(), batches=ctx.batches, loss_fn=ctx.loss_fn)

        protected = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(fine_tune)
        before = run()
        pl_module.load_state_dict(protected)
        after = run()
        rank_zero_info(
            "MergeGuardCallback deployment check (own score, unprotected -> protected): "
            + ", ".join(f"{t} {before[t]:.1f} -> {after[t]:.1f}" for t in after)
        )
        return {t: {"unprotected": before[t], "protected": after[t]} for t in after}

    def _run_stage2(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, candidates: dict[str, nn.Parameter]
    ) -> tuple[Stage2Context, float, dict[str, Any], float, float]:
        """Run the strategy on ``candidates``; return the context, the score after, its report, ``||tau||``, moved."""
        ctx = self._stage2_context(trainer, pl_module, candidates)
        with torch.no_grad():
            stage1 = {n: p.detach().clone() for n, p in ctx.params.items()}
        # fast_dev_run checks that stage 2 runs (two steps, one check, its batch budget), as quickly as Lightning's
        # own loops run then; the model is not protected and nothing is written (see _publish).
        strategy = debug_run_stage2(self.stage2) if trainer.fast_dev_run else self.stage2
        after, extra = strategy.run(ctx)
        with torch.no_grad():
            # Squared norms of each rank's rows, summed across ranks under FSDP2 (a DTensor's .sum() is a partial).
            like = list(ctx.params.values())
            tau_sq = sum((local(stage1[n]) - local(ctx.reference[n])).double().pow(2).sum() for n in stage1)
            moved_sq = sum((local(p) - local(stage1[n])).double().pow(2).sum() for n, p in ctx.params.items())
            tau = math.sqrt(float(sum_across_ranks(torch.as_tensor(tau_sq), like)))
            moved = math.sqrt(float(sum_across_ranks(torch.as_tensor(moved_sq), like)))
        self._stage1_values = stage1
        return ctx, after, extra, tau, moved

    def _run_stage2_lora(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Stage2Context, float, dict[str, Any], float, float]:
        """Stage 2 on a LoRA model: perturb the merged weights, then write the perturbation back into the adapters.

        The strategy runs on the effective weights ``W + B @ A * s`` (adapters merged, frozen base weights made
        trainable for the duration), exactly as on a full fine-tune. Each adapted weight's new update
        ``W* - W`` is then re-factored into the adapter at its rank (truncated SVD), so the result is still a LoRA
        adapter of the same shape, and the guard rail is checked again on it: if the rank-r projection costs more
        than ``tolerance``, the stage-1 adapter is kept and a warning says so. The report's ``lora`` entry holds the
        projection residuals and the score of the unprojected weights.
        """
        view = self._view
        assert view is not None
        factors = {n: (pair.a.detach().clone(), pair.b.detach().clone()) for n, pair in self._pairs.items()}
        with view.merged():
            names = [*self._pairs, *self._params]
            candidates = filter_names({n: view.params[n] for n in names}, None, self.selection.stage2_exclude)
            frozen = [p for p in candidates.values() if not p.requires_grad]
            for p in frozen:
                p.requires_grad_(True)
            try:
                ctx, merged_score, extra, tau, _ = self._run_stage2(trainer, pl_module, candidates)
                with torch.no_grad():
                    updates = {n: p.detach() - ctx.reference[n] for n, p in ctx.params.items() if n in self._pairs}
            finally:
                for p in frozen:
                    p.requires_grad_(False)
                    p.grad = None
        stage1 = self._stage1_values
        moved_sq, residuals = 0.0, []
        for n, update in updates.items():
            pair = self._pairs[n]
            before = pair.delta()
            residuals.append(view.set_update(n, update))
            moved_sq += float((pair.delta() - before).double().pow(2).sum())
        with torch.no_grad():
            for n, p in ctx.params.items():
                if n not in self._pairs:
                    moved_sq += float((p - stage1[n]).double().pow(2).sum())
        after = ctx.metric()
        lora = {
            "adapted_weights_perturbed": len(updates),
            "score_unprojected": merged_score,
            "projection_residual_median": statistics.median(residuals) if residuals else 0.0,
            "projection_residual_max": max(residuals, default=0.0),
            "kept_stage1_adapter": False,
        }
        if after < ctx.before - self.tolerance:
            rank_zero_warn(
                f"MergeGuardCallback: the rank-r projection of stage 2 into the LoRA adapters scored {after:.2f} "
                f"(before: {ctx.before:.2f}, tolerance {self.tolerance}); keeping the stage-1 adapter."
            )
            with torch.no_grad():
                for n, (a, b) in factors.items():
                    self._pairs[n].a.copy_(a)
                    self._pairs[n].b.copy_(b)
                for n, p in ctx.params.items():
                    if n not in self._pairs:
                        p.copy_(stage1[n])
            after, moved_sq = ctx.metric(), 0.0
            lora["kept_stage1_adapter"] = True
        return ctx, after, {**extra, "lora": lora}, tau, math.sqrt(moved_sq)

    def _stage2_context(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, candidates: dict[str, nn.Parameter]
    ) -> Stage2Context:
        """The strategy's inputs: parameters, reference, batches and the guard-rail metric, from the trainer."""
        params = {n: p for n, p in candidates.items() if n in self.reference}
        if not params:
            raise ValueError(
                "MergeGuardCallback: stage 2 excludes every parameter; loosen ParameterSelection(stage2_exclude=)"
            )
        refuse_non_finite(pl_module, "MergeGuardCallback")
        eval_loader = validation_loader(trainer)
        if eval_loader is None:
            rank_zero_warn("MergeGuardCallback: no validation dataloader; scoring stage 2 on training batches.")
            eval_loader = first_loader(trainer.train_dataloader)
        train_loader = first_loader(trainer.train_dataloader)
        if train_loader is None:
            raise ValueError("MergeGuardCallback: stage 2 needs the training dataloader")
        budget = debug_run_batches(trainer, self.eval_batches)
        eval_data, shard = eval_share(eval_loader, budget, trainer.global_rank, trainer.world_size)
        eval_data = as_trained(trainer, eval_data)
        strategy = trainer.strategy
        self._passes = 0

        def metric() -> float:
            self._passes += 1
            with trainer.precision_plugin.forward_context():
                return 100.0 * evaluate(
                    pl_module,
                    eval_data,
                    self.score_fn,
                    shard=shard,
                    reduce=lambda t: strategy.reduce(t, reduce_op="sum"),
                )

        world = strategy.world_size
        sharded = any_sharded(params)
        if sharded and not self.stage2.supports_sharded:  # sharded without the strategy setup() checks
            raise MisconfigurationException(
                f"MergeGuardCallback: stage 2 {self.stage2.name!r} does not support FSDP2-sharded parameters yet"
            )
        fp16 = str(trainer.precision) == "16-mixed"
        partners = probe_donors(trainer)  # a MergeProbe's donors are partners for strategies that rehearse merges
        return Stage2Context(
            module=pl_module,
            params=params,
            reference=self.reference.as_dict(params, like=params),
            batches=iter(as_trained(trainer, repeat(train_loader))),
            metric=metric,
            loss_fn=self.loss_fn,
            before=metric(),
            tolerance=self.tolerance,
            # FSDP2 averages gradients itself (reduce-scatter); DDP's are averaged here, outside its hooks.
            grad_reduce=(lambda g: strategy.reduce(g, reduce_op="sum") / world) if world > 1 and not sharded else None,
            forward_context=contextlib.nullcontext if fp16 else trainer.precision_plugin.forward_context,
            progress=self.progress and trainer.is_global_zero,
            warn=rank_zero_warn,
            partners=partners,
            keep_batches=as_trained(trainer, self.keep_batches),
        )

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the result, write the report and the protected weights (rank zero), and sync the ranks."""
        report = self.report
        assert report is not None and self.stage2 is not None
        log_to_loggers(
            trainer,
            {
                "mergeguard/score_before": report["score_before"],
                "mergeguard/score_after": report["score_after"],
                "mergeguard/relative_perturbation": report["relative_perturbation"],
            },
        )
        rank_zero_info(
            f"MergeGuard stage 2 ({self.stage2.name}): score {report['score_before']:.2f} -> "
            f"{report['score_after']:.2f} ({report['score_delta']:+.2f} points) in {report['seconds']:.1f} s, "
            f"{report['validation_passes']} validation passes"
        )
        if trainer.fast_dev_run:  # as Lightning writes no checkpoint then: a debug run replaces no protected model
            if self.save_path or self.report_path:
                rank_zero_info(
                    "MergeGuardCallback: fast_dev_run ran stage 2 for 2 steps to check that it runs; the model is not "
                    "protected, and save_path/report_path are not written."
                )
            trainer.strategy.barrier("mergeguard_stage2")
            return
        if self.save_path and self._view is None and self.release.dtype != "auto":
            self._refuse_uncastable(pl_module)
        weights = None
        if self.save_path and self._view is None:
            # Every rank takes part in gathering FSDP2 shards (one tensor at a time); rank zero keeps them.
            weights = {}
            for k, v in pl_module.state_dict().items():
                whole = full(v).detach()
                if trainer.is_global_zero:  # named as the uncompiled module (torch.compile'd submodules)
                    weights[uncompiled_name(k)] = whole.cpu().contiguous()
            if trainer.is_global_zero and self.release.dtype != "auto":
                dtype = self.release.write_dtype(torch.float32)
                weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
                report["dtype"] = self.release.dtype
        if trainer.is_global_zero:
            if self.report_path:
                atomic_write_json(self.report_path, report)
            if self.save_path and self._view is not None:
                _save_adapter(pl_module, self.save_path)
            elif weights is not None and str(self.save_path).endswith(".safetensors"):
                save_safetensors(self.save_path, weights, metadata={"mergeguard": self.stage2.name})
            elif weights is not None:
                export_release(pl_module, self.save_path, weights, report, self.release.dtype)
        trainer.strategy.barrier("mergeguard_stage2")

    def _refuse_uncastable(self, pl_module: pl.LightningModule) -> None:
        """Refuse, on every rank and before anything is written, a release dtype that would overflow a weight.

        Each rank checks its own weights (its shards under FSDP2); the verdict is summed across ranks, so every rank
        raises together.
        """
        state = {k: local(v) for k, v in pl_module.state_dict().items()}
        try:
            check_castable(state, self.release.write_dtype(torch.float32), "Release(dtype=)")
            error = None
        except NonFiniteError as err:
            error = err
        failed = sum_across_ranks(torch.tensor(float(error is not None)), list(pl_module.parameters()))
        if float(failed) > 0:
            raise error or NonFiniteError(
                f"MergeGuardCallback: writing {self.release.dtype} would overflow weights held by another rank; "
                "choose another Release(dtype=)"
            )

    def _settings(self) -> dict[str, Any]:
        keys = ["alpha", "target", "normalize", "eval_batches", "tolerance"]
        out = {k: getattr(self, k) for k in keys}
        out.update(self.selection.settings())
        out.update(self.release.settings())
        out["reference"] = self.reference.source_label
        out["stage2"] = self.stage2.settings() if self.stage2 is not None else None
        return out

    # ------------------------------------------------------------------ resume
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stage2_done": self.stage2_done, "report": self.report, "reference": self.reference.state_dict()}

    @override
    def _restore(self, state_dict: dict[str, Any]) -> None:
        self.stage2_done = bool(state_dict.get("stage2_done", False))
        self.report = state_dict.get("report")

    @override
    def _resumed_reference(self) -> ReferenceWeights:
        return self.reference


def _amplified(report: Mapping[str, Any] | None) -> bool:
    """Whether a stage-2 report says the model was amplified (rescaled by symmetries) and kept that way."""
    entry = (report or {}).get("amplify")
    return isinstance(entry, Mapping) and bool(entry.get("applied"))


def _batch_list(batches: Any) -> list[Any]:
    """``keep_batches`` as a list of batches.

    One batch given alone (a dict, or an ``(inputs, targets)`` pair of tensors) is wrapped, not iterated into its
    keys or tensors.
    """
    if batches is None:
        return []
    if isinstance(batches, Mapping) or (
        isinstance(batches, (tuple, list)) and batches and all(isinstance(b, torch.Tensor) for b in batches)
    ):
        return [batches]
    out = list(batches)
    bad = [type(b).__name__ for b in out if not isinstance(b, (Mapping, tuple, list))]
    if bad:
        raise ValueError(
            f"keep_batches must be a list of batches (dicts or (inputs, targets) tuples), got items of type {bad[:3]}"
        )
    return out


_ADVICE = (
    "give it more steps or a larger lr (stage2=ScaleAdversarial(steps=, lr=)), a larger tolerance=, or partners to "
    "rehearse (stage2=MergeNeighbourhood(partners=...))"
)


def export_release(
    pl_module: nn.Module,
    path: str | os.PathLike[str],
    weights: dict[str, Tensor],
    report: Any,
    dtype: str = "auto",
) -> None:
    """Write the protected model as users load it, atomically, into directory ``path``.

    A Hugging Face model inside ``pl_module`` is written with its own ``save_pretrained`` (the bare model's names,
    tied weights once, ``config.json``; the module's ``tokenizer`` beside it when it has one); any other model as
    ``model.safetensors`` of ``weights``. ``MERGEGUARD.md`` and ``protection_report.json`` go beside them. With a
    ``dtype`` other than ``"auto"`` (``weights`` are already cast), a copy of the Hugging Face model is cast and
    saved, so the trained module keeps its dtype and tied weights stay tied.
    """
    hf = next((m for m in pl_module.modules() if hasattr(m, "save_pretrained") and hasattr(m, "config")), None)
    with atomic_directory(path) as tmp:
        if hf is not None:
            if dtype != "auto":
                hf = copy.deepcopy(hf).to("cpu", dtype=WRITE_DTYPES[dtype])
            hf.save_pretrained(tmp, safe_serialization=True)
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
        else:
            save_safetensors(Path(tmp) / "model.safetensors", weights, metadata={"mergeguard": report["method"]})
        atomic_write_json(Path(tmp) / "protection_report.json", report)
        (Path(tmp) / "MERGEGUARD.md").write_text(release_card(report, "MergeGuardCallback"), encoding="utf-8")


def _save_adapter(pl_module: pl.LightningModule, path: str) -> None:
    """Save the (protected) LoRA adapter with PEFT's own ``save_pretrained``, atomically, into directory ``path``."""
    peft_models = [m for m in pl_module.modules() if hasattr(m, "peft_config") and hasattr(m, "save_pretrained")]
    if not peft_models:
        raise ValueError(
            "MergeGuardCallback: save_path on a LoRA model needs a PEFT model (get_peft_model) to save the adapter"
        )
    with atomic_directory(path) as tmp:
        peft_models[0].save_pretrained(tmp, safe_serialization=True)

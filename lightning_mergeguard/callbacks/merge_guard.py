"""MergeGuardCallback: fine-tune with protection against unauthorized model merging."""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_mergeguard.callbacks._common import first_loader, log_to_loggers, refuse_sharded, repeat, take
from lightning_mergeguard.io import atomic_write_json, save_safetensors
from lightning_mergeguard.protection.evaluation import LossFn, ScoreFn, default_loss, default_score, evaluate
from lightning_mergeguard.protection.importance import layer_importance
from lightning_mergeguard.protection.negation import apply_negation_, critical_layers, negation_mask
from lightning_mergeguard.protection.params import (
    DEFAULT_STAGE2_EXCLUDE,
    group_layers,
    select_parameters,
    write_scaled_,
)
from lightning_mergeguard.protection.redistribution import add_redistribution_grad_
from lightning_mergeguard.protection.scale_adversarial import scale_adversarial_
from lightning_mergeguard.reference import ReferenceWeights

Stage2 = Literal["scale_adversarial", "negation", "none"]


class MergeGuardCallback(Callback):
    r"""Dual-stage protection: a model that keeps its accuracy while merges that include it collapse.

    **Stage 1** (during fit) adds the L2 redistribution term ``alpha * sum_l c_l ||x_l||^2`` to the objective, with
    ``x_l = theta_l - theta_pre_l`` (``target="task_vector"``) or ``theta_l`` (``target="weights"``) and
    ``c_l = 1/numel`` when ``normalize``. A callback cannot change the loss Lightning backpropagates, so the term's
    exact gradient is added to ``.grad`` in ``on_before_optimizer_step``: after AMP unscaling, before gradient
    clipping, once per optimizer step (so gradient accumulation is handled). Under DDP the term is a function of
    replicated weights, hence identical on every rank, and needs no all-reduce. Its value is logged as
    ``mergeguard/l2_term``.

    **Stage 2** (in ``on_train_end``) perturbs the trained weights:

    - ``"scale_adversarial"`` (default): a short optimisation on the owner's training batches that keeps the own
      loss low and raises the loss of ``theta_pre + s * tau`` for the merge scales ``s`` (see
      :func:`~lightning_mergeguard.protection.scale_adversarial.scale_adversarial_`).
    - ``"negation"``: the paper summary's ``theta_hat = theta' - beta * M * tau'``, with layer importance scored on
      validation batches (critical layers and the smallest entries masked out).

    A guard rail measures the monitored score on up to ``eval_batches`` validation batches before and after
    stage 2; if it falls by more than ``tolerance`` points, stage 2 backs off (halving ``beta``, or keeping the
    checked weights within tolerance with the lowest merge proxy) until it fits, and the report says so.
    Scale-adversarial stage 2 checks 8 times; a check scores the model and its scaled copy at the sabotaged scale
    nearest the scales' mean, so stage 2 costs 18 validation passes whatever ``steps`` is (the report counts them).
    Checks within ``tolerance`` of the own score whose proxy is within ``tolerance`` points of the lowest are taken
    as equally protective, and the one with the best own score is kept.
    Validation
    passes run under the trainer's precision context (autocast for ``*-mixed``); the optimisation does too, except
    with ``16-mixed``, whose gradients would need loss scaling. Stage 2 runs once: the callback's state
    records it, so a resumed or repeated fit never perturbs twice. The report (settings, per-layer scores, metric
    deltas, back-off) is written as JSON to ``report_path``; ``save_path`` receives the protected weights
    (safetensors). Checkpoints written by ``ModelCheckpoint`` during fit hold pre-stage-2 weights.

    Args:
        alpha: Strength of the stage-1 term (0 disables stage 1).
        target: ``"task_vector"`` (L2-SP style) or ``"weights"`` (plain weight decay).
        normalize: Divide each tensor's squared norm by its size.
        include: Regexes of parameter names protected (default: all trainable).
        exclude: Regexes of parameter names left out of both stages.
        reference: Path (safetensors, HF directory, ``.bin``/``.ckpt``) of the pretrained weights; default: a
            snapshot of the weights at fit start. Shared with a :class:`~lightning_mergeguard.MergeProbe` attached
            to the same trainer (see :attr:`reference`).
        reference_dtype: Storage dtype of the reference (``"bfloat16"`` halves its memory; stage 1 then
            penalises the distance to the rounded weights). Default: the parameters' dtype.
        reference_device: Where the reference is kept (``"cpu"`` frees accelerator memory at the cost of one
            host-to-device copy of it per optimizer step). Default: the parameters' device.
        stage2: ``"scale_adversarial"``, ``"negation"`` or ``"none"``.
        stage2_exclude: Regexes left out of stage 2 (default: embeddings, final norms, LM/task heads).
        score_fn: ``(module, batch) -> (score_sum, count)``; default: accuracy for ``(x, y)`` and HF LM batches.
        loss_fn: ``(module, batch) -> loss``; default: cross-entropy / HF ``loss``.
        eval_batches: Budget of validation batches for scoring (guard rail and layer importance).
        tolerance: Largest allowed drop of the score, in points (percent).
        beta: Negation strength.
        critical_fraction: Fraction of layers spared as critical (negation).
        small_fraction: Fraction of smallest entries spared per tensor (negation).
        granularity: What a "layer" is: ``"block"``, ``"module"`` or ``"tensor"``.
        steps: Optimisation steps (scale-adversarial).
        scales: Merge scales sabotaged (scale-adversarial).
        clip: Loss ceiling at the scaled copies (scale-adversarial).
        drop_density: Also sabotage DARE-style copies (random keep rate ``drop_density``, rescaled) on every other
            stage-2 step (scale-adversarial); ``None`` (default) sabotages the exact scaled copies only.
        lr: Adam learning rate (scale-adversarial).
        report_path: Where to write the protection report (JSON).
        save_path: Where to save the protected weights (``.safetensors``).
        progress: Show progress bars during stage 2.

    Example:
        >>> from lightning_mergeguard import MergeGuardCallback
        >>> guard = MergeGuardCallback(alpha=0.01, stage2="scale_adversarial", steps=100)
        >>> # trainer = pl.Trainer(callbacks=[guard]); trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        alpha: float = 0.01,
        target: Literal["task_vector", "weights"] = "task_vector",
        normalize: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        reference: str | None = None,
        reference_dtype: str | None = None,
        reference_device: str | None = None,
        stage2: Stage2 = "scale_adversarial",
        stage2_exclude: Sequence[str] = DEFAULT_STAGE2_EXCLUDE,
        score_fn: ScoreFn | None = None,
        loss_fn: LossFn | None = None,
        eval_batches: int = 8,
        tolerance: float = 1.5,
        beta: float = 1.0,
        critical_fraction: float = 0.1,
        small_fraction: float = 0.1,
        granularity: Literal["block", "module", "tensor"] = "block",
        steps: int = 300,
        scales: Sequence[float] = (0.2, 0.3, 0.5),
        clip: float = 5.0,
        drop_density: float | None = None,
        lr: float = 1e-3,
        report_path: str | None = None,
        save_path: str | None = None,
        progress: bool = True,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if target not in ("task_vector", "weights"):
            raise ValueError(f"target must be 'task_vector' or 'weights', got {target!r}")
        if stage2 not in ("scale_adversarial", "negation", "none"):
            raise ValueError(f"stage2 must be 'scale_adversarial', 'negation' or 'none', got {stage2!r}")
        if granularity not in ("block", "module", "tensor"):
            raise ValueError(f"granularity must be 'block', 'module' or 'tensor', got {granularity!r}")
        if not (isinstance(eval_batches, int) and eval_batches >= 1):
            raise ValueError(f"eval_batches must be a positive integer, got {eval_batches!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 points, got {tolerance!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        for name, frac in (("critical_fraction", critical_fraction), ("small_fraction", small_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not scales or any(not 0.0 < s < 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of merge scales in (0, 1), got {scales!r}")
        if not (clip > 0 and lr > 0):
            raise ValueError(f"clip and lr must be > 0, got clip={clip!r}, lr={lr!r}")
        if drop_density is not None and not 0 < drop_density < 1:
            raise ValueError(f"drop_density must be in (0, 1) or None, got {drop_density!r}")
        for pattern in [*(include or []), *exclude, *stage2_exclude]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"invalid parameter-name regex {pattern!r}: {err}") from err
        self.alpha = float(alpha)
        self.target = target
        self.normalize = normalize
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.reference_path = reference
        self.reference = ReferenceWeights(reference, dtype=reference_dtype, device=reference_device)
        self.stage2 = stage2
        self.stage2_exclude = list(stage2_exclude)
        self.score_fn = score_fn or default_score
        self.loss_fn = loss_fn or default_loss
        self.eval_batches = eval_batches
        self.tolerance = float(tolerance)
        self.beta = float(beta)
        self.critical_fraction = critical_fraction
        self.small_fraction = small_fraction
        self.granularity = granularity
        self.steps = steps
        self.scales = tuple(float(s) for s in scales)
        self.clip = float(clip)
        self.drop_density = drop_density
        self.lr = float(lr)
        self.report_path = report_path
        self.save_path = save_path
        self.progress = progress
        # state
        self.stage2_done = False
        self.report: dict[str, Any] | None = None
        self._params: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------ setup
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, target=self.target)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(trainer, "MergeGuardCallback")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = select_parameters(pl_module, self.include, self.exclude)
        if not self._params:
            raise ValueError("MergeGuardCallback: no trainable parameters match include/exclude")
        self.reference.resolve(self._params)

    # ------------------------------------------------------------------ stage 1
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.alpha == 0:
            return
        for p in self._params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        reference = self.reference.on_device(self._params) if self.target == "task_vector" else None
        # The term's value costs an extra pass over the weights: compute it only when the trainer logs.
        logging_step = (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.global_step == 0
        value = add_redistribution_grad_(
            self._params, reference, alpha=self.alpha, normalize=self.normalize, compute_value=logging_step
        )
        if value is not None:
            pl_module.log("mergeguard/l2_term", value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ stage 2
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage2 == "none":
            return
        if self.stage2_done:
            rank_zero_warn("MergeGuardCallback: stage 2 was already applied to this model; not applying it again.")
            return
        start = time.perf_counter()
        params = {
            n: p
            for n, p in select_parameters(pl_module, self.include, [*self.exclude, *self.stage2_exclude]).items()
            if n in self.reference
        }
        if not params:
            raise ValueError("MergeGuardCallback: stage 2 excludes every parameter; loosen stage2_exclude")
        eval_loader = first_loader(trainer.val_dataloaders)
        if eval_loader is None:
            rank_zero_warn("MergeGuardCallback: no validation dataloader; scoring stage 2 on training batches.")
            eval_loader = first_loader(trainer.train_dataloader)
        eval_data = take(eval_loader, self.eval_batches)
        strategy = trainer.strategy
        ref = self.reference.as_dict(params, like=params)  # on the parameters' device and dtype during stage 2
        passes = [0]

        def metric() -> float:
            passes[0] += 1
            with trainer.precision_plugin.forward_context():
                return 100.0 * evaluate(
                    pl_module, eval_data, self.score_fn, reduce=lambda t: strategy.reduce(t, reduce_op="sum")
                )

        with torch.no_grad():
            stage1 = {n: p.detach().clone() for n, p in params.items()}
        before = metric()
        report: dict[str, Any] = {
            "method": self.stage2,
            "settings": self._settings(),
            "parameters_perturbed": len(params),
            "score_before": before,
        }
        if self.stage2 == "negation":
            after, extra = self._negation(params, ref, metric, before)
        else:
            after, extra = self._scale_adversarial(trainer, pl_module, params, ref, stage1, metric, before)
        report.update(extra)
        with torch.no_grad():
            tau_before = math.sqrt(sum(float((stage1[n] - ref[n]).double().pow(2).sum()) for n in params))
            moved = math.sqrt(sum(float((p - stage1[n]).double().pow(2).sum()) for n, p in params.items()))
        report.update(
            score_after=after,
            score_delta=after - before,
            relative_perturbation=moved / tau_before if tau_before > 0 else float("nan"),
            validation_passes=passes[0],
            seconds=time.perf_counter() - start,
        )
        self.stage2_done = True
        self.report = report
        log_to_loggers(
            trainer,
            {
                "mergeguard/score_before": before,
                "mergeguard/score_after": after,
                "mergeguard/relative_perturbation": report["relative_perturbation"],
            },
        )
        rank_zero_info(
            f"MergeGuard stage 2 ({self.stage2}): score {before:.2f} -> {after:.2f} "
            f"({after - before:+.2f} points) in {report['seconds']:.1f} s"
        )
        if trainer.is_global_zero:
            if self.report_path:
                atomic_write_json(self.report_path, report)
            if self.save_path:
                save_safetensors(
                    self.save_path,
                    {k: v.detach().cpu().contiguous() for k, v in pl_module.state_dict().items()},
                    metadata={"mergeguard": self.stage2},
                )
        strategy.barrier("mergeguard_stage2")

    def _negation(
        self, params: dict[str, nn.Parameter], ref: dict[str, Tensor], metric, before: float
    ) -> tuple[float, dict[str, Any]]:
        layers = group_layers(params, self.granularity)
        _, scores = layer_importance(params, ref, layers, metric, progress=self.progress)
        critical = set(critical_layers(scores, self.critical_fraction))
        masks = {}
        for layer, names in layers.items():
            for n in names:
                tau = params[n].detach() - ref[n]
                masks[n] = negation_mask(tau, critical=layer in critical, small_fraction=self.small_fraction)
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in params.items()}
        tried = []
        beta = self.beta
        after = before
        for beta in (self.beta / 2**i for i in range(4)):
            apply_negation_(params, ref, masks, beta)
            after = metric()
            tried.append({"beta": beta, "score": after})
            if before - after <= self.tolerance:
                break
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        else:
            beta, after = 0.0, before
        if beta != self.beta:
            rank_zero_warn(
                f"MergeGuardCallback: beta={self.beta} cost more than {self.tolerance} points; used beta={beta}."
            )
        extra = {
            "layer_scores": scores,
            "critical_layers": sorted(critical),
            "beta_used": beta,
            "backoff": tried,
        }
        return after, extra

    def _scale_adversarial(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: dict[str, nn.Parameter],
        ref: dict[str, Tensor],
        stage1: dict[str, Tensor],
        metric,
        before: float,
    ) -> tuple[float, dict[str, Any]]:
        train_loader = first_loader(trainer.train_dataloader)
        if train_loader is None:
            raise ValueError("MergeGuardCallback: scale-adversarial stage 2 needs the training dataloader")
        strategy = trainer.strategy
        world = strategy.world_size

        # The guard rail: 8 checks, each the own score and the merge proxy (the score of the scaled copy
        # theta_pre + s * tau at the sabotaged scale nearest their mean): 1 + 1 + 8 * 2 = 18 validation passes.
        mean_scale = sum(self.scales) / len(self.scales)
        proxy_scale = min(self.scales, key=lambda s: abs(s - mean_scale))

        def proxy() -> float:
            with torch.no_grad():
                live = {n: p.detach().clone() for n, p in params.items()}
            try:
                write_scaled_(params, ref, live, proxy_scale)
                return metric()
            finally:
                write_scaled_(params, ref, live, 1.0)

        history: list[dict[str, float]] = []
        checks: list[dict[str, float]] = []
        best: dict[str, float] = {"step": 0, "score": before}
        lowest = [math.inf]  # the lowest merge proxy seen at a check within tolerance
        best_weights = {n: t.clone() for n, t in stage1.items()}

        def check(step: int) -> None:
            # Proxies within `tolerance` points of the lowest are taken as equally protective (the difference is
            # within evaluation noise); among them the check with the best own score is kept. Online, with one copy.
            entry = {"step": step, "score": metric(), "merge_proxy": proxy()}
            checks.append(entry)
            if before - entry["score"] > self.tolerance:
                return
            lowest[0] = min(lowest[0], entry["merge_proxy"])
            band = lowest[0] + self.tolerance
            if entry["merge_proxy"] > band:
                return
            if best["merge_proxy"] > band or entry["score"] > best["score"]:
                best.update(entry)
                with torch.no_grad():
                    for n, p in params.items():
                        best_weights[n].copy_(p)

        best["merge_proxy"] = proxy_before = proxy()
        # Mixed precision: the optimisation runs under autocast too, except fp16, which would need loss scaling.
        precision = str(trainer.precision)
        autocast = trainer.precision_plugin.forward_context if precision != "16-mixed" else contextlib.nullcontext
        scale_adversarial_(
            pl_module,
            params,
            ref,
            itertools.islice(repeat(train_loader), self.steps),
            self.loss_fn,
            steps=self.steps,
            scales=self.scales,
            clip=self.clip,
            drop_density=self.drop_density,
            lr=self.lr,
            grad_reduce=(lambda g: strategy.reduce(g, reduce_op="sum") / world) if world > 1 else None,
            check_every=max(1, math.ceil(self.steps / 8)),
            check=check,
            progress=self.progress and trainer.is_global_zero,
            forward_context=autocast,
            history=history,
        )
        if checks[-1]["step"] != self.steps:
            check(self.steps)
        # best_weights: the best own score among the checks with (nearly) the lowest merge proxy, within tolerance.
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_weights[n])
        after, steps_used = float(best["score"]), int(best["step"])
        if steps_used == 0:
            rank_zero_warn(
                f"MergeGuardCallback: no stage-2 weights stayed within {self.tolerance} points while lowering the "
                f"merge proxy by more than {self.tolerance} points; kept the stage-1 weights. Try more steps, a lower "
                "lr or a larger tolerance."
            )
        first, last = history[0] if history else {}, history[-1] if history else {}
        extra = {
            "steps_used": steps_used,
            "merge_proxy_scale": proxy_scale,
            "merge_proxy_before": proxy_before,
            "merge_proxy_after": best["merge_proxy"],
            "checks": checks,
            "own_loss_first": first.get("own_loss"),
            "own_loss_last": last.get("own_loss"),
            "scaled_loss_first": first.get("scaled_loss"),
            "scaled_loss_last": last.get("scaled_loss"),
        }
        return after, extra

    def _settings(self) -> dict[str, Any]:
        keys = [
            "alpha",
            "target",
            "normalize",
            "include",
            "exclude",
            "stage2",
            "stage2_exclude",
            "eval_batches",
            "tolerance",
            "beta",
            "critical_fraction",
            "small_fraction",
            "granularity",
            "steps",
            "scales",
            "clip",
            "drop_density",
            "lr",
        ]
        return {k: getattr(self, k) for k in keys} | {"reference": self.reference_path}

    # ------------------------------------------------------------------ resume
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stage2_done": self.stage2_done, "report": self.report, "reference": self.reference.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage2_done = bool(state_dict.get("stage2_done", False))
        self.report = state_dict.get("report")
        ref = state_dict.get("reference")
        if ref:
            # Checkpoints before the shared reference held a plain name -> tensor mapping.
            self.reference.load_state_dict(ref if "tensors" in ref else {"tensors": ref})

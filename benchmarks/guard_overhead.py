"""Cost of MergeGuard: stage-1 step time against plain fine-tuning, and stage-2 wall time against a validation pass.

    python benchmarks/guard_overhead.py [--model smollm2|digits] [--steps 12] [--rounds 3]

Plain fine-tuning and fine-tuning with ``MergeGuardCallback(stage2="none")`` alternate in the same process
(``rounds`` times each, after a warm-up) on the same data; the headline is the ratio of median optimizer-step
times. Stage 2 (scale-adversarial, default settings but ``steps``) is then timed against one validation pass of
the same ``eval_batches``. Writes benchmarks/results/guard_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
from _common import CACHE, accelerator, add_device_argument, markdown_table, resolve_device, write_results
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial
from lightning_mergeguard.evaluation import evaluate
from lightning_mergeguard.models.trainer import quiet_trainer


class TimedGuard(MergeGuardCallback):
    """MergeGuardCallback that also records the time spent in its stage-1 hook (the exact added work)."""

    hook_seconds: list[float]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.__dict__.setdefault("hook_seconds", []).append(time.perf_counter() - start)


class StepTimer(pl.Callback):
    """Wall time of each training batch (forward, backward, callbacks' gradient work and optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def setting(name: str):
    if name == "smollm2":
        from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
        from lightning_mergeguard.models.causal_lm import CausalLMModule, LMTaskDataset

        model, tok = load_smollm2(CACHE / "smollm2-135m")
        train = DataLoader(LMTaskDataset(tok, generate_task("add", 256)), batch_size=8, shuffle=False)
        val = DataLoader(LMTaskDataset(tok, generate_task("add", 64, seed=1)), batch_size=8)
        return (lambda: CausalLMModule(copy.deepcopy(model), lr=1e-4)), train, val, "SmolLM2-135M, batch 8x32 tokens"
    from lightning_mergeguard.demos.digits import DigitsTaskModule, digits_task_data, pretrain_backbone

    backbone, heads = pretrain_backbone(epochs=2)
    train = DataLoader(digits_task_data("plain", "train"), batch_size=32)
    val = DataLoader(digits_task_data("plain", "val"), batch_size=64)
    return (lambda: DigitsTaskModule(copy.deepcopy(backbone), heads, "plain")), train, val, "digits MLP (5x128)"


def run(make_module, train, callbacks, steps, device="cpu"):
    timer = StepTimer()
    pl.seed_everything(0, verbose=False)
    module = make_module()
    trainer = quiet_trainer(
        max_steps=steps,
        accelerator=accelerator(torch.device(device)),
        callbacks=[*callbacks, timer],
        limit_val_batches=0,
    )
    trainer.fit(module, train)
    return timer.times[3:], module  # the first steps include lazy initialisation and allocator warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "digits"], default="smollm2")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage2-steps", type=int, default=10)
    add_device_argument(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    make_module, train, val, desc = setting(args.model)
    plain, guarded, hook, hook_bf16 = [], [], [], []
    for _ in tqdm(range(args.rounds), desc="stage 1 rounds (plain, guarded, guarded with a bf16 reference)"):
        plain += run(make_module, train, [], args.steps, device)[0]
        guard = TimedGuard(alpha=0.01, stage2="none")
        guarded += run(make_module, train, [guard], args.steps, device)[0]
        hook += guard.hook_seconds[3:]
        guard_bf16 = TimedGuard(alpha=0.01, stage2="none", reference_dtype="bfloat16")
        run(make_module, train, [guard_bf16], args.steps, device)
        hook_bf16 += guard_bf16.hook_seconds[3:]
    ratio = statistics.median(guarded) / statistics.median(plain)
    hook_ratio = 1 + statistics.median(hook) / statistics.median(plain)
    ref_bytes, ref_bf16_bytes = guard.reference.nbytes, guard_bf16.reference.nbytes

    # Stage 2 against one validation pass over the same batches it scores with.
    eval_batches = 8
    _, module = run(make_module, train, [], 2, device)
    batches = [b for _, b in zip(range(eval_batches), val)]
    module.to(device)
    start = time.perf_counter()
    evaluate(module, batches)
    val_pass = time.perf_counter() - start
    guard = MergeGuardCallback(
        alpha=0.01, stage2=ScaleAdversarial(steps=args.stage2_steps), eval_batches=eval_batches, progress=False
    )
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        max_steps=2,
        accelerator=accelerator(device),
        callbacks=[guard],
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(make_module(), train, val)
    stage2 = guard.report["seconds"]
    passes = guard.report["validation_passes"]
    rows = [
        ["plain fine-tuning step (median s)", statistics.median(plain)],
        ["with MergeGuard stage 1 (median s)", statistics.median(guarded)],
        ["stage-1 step-time ratio (medians, noisy)", ratio],
        ["stage-1 hook time (median s)", statistics.median(hook)],
        ["1 + hook time / plain step", hook_ratio],
        ["one validation pass, 8 batches (s)", val_pass],
        ["stage-1 hook time with a bf16 reference (median s)", statistics.median(hook_bf16)],
        ["reference memory, parameters' dtype (MiB)", ref_bytes / 2**20],
        ["reference memory, bf16 (MiB)", ref_bf16_bytes / 2**20],
        [f"stage 2, {args.stage2_steps} steps + guard-rail checks (s)", stage2],
        ["stage 2 validation passes (counted)", passes],
        ["stage 2 / validation pass", stage2 / val_pass],
    ]
    table = markdown_table(["measure", "value"], rows)
    path = write_results(
        f"guard_overhead_{args.model}",
        {
            "setting": desc,
            "baseline": "plain fine-tuning (same module, data and optimizer), alternating in the same process",
            "steps_per_run": args.steps,
            "rounds": args.rounds,
            "plain_step_seconds": plain,
            "guarded_step_seconds": guarded,
            "stage1_step_time_ratio": ratio,
            "stage1_hook_seconds": hook,
            "stage1_hook_ratio": hook_ratio,
            "validation_pass_seconds": val_pass,
            "stage2_seconds": stage2,
            "stage2_validation_passes": passes,
            "stage1_hook_seconds_bf16_reference": hook_bf16,
            "reference_bytes": ref_bytes,
            "reference_bytes_bf16": ref_bf16_bytes,
            "stage2_steps": args.stage2_steps,
            "stage2_over_validation_pass": stage2 / val_pass,
            "table": table,
        },
    )
    print(table)
    print(
        f"HEADLINE stage 1: {ratio:.3f}x the step time of plain fine-tuning ({desc}); the hook itself adds "
        f"{hook_ratio - 1:.3f} of a plain step"
    )
    print(f"HEADLINE stage 2: {stage2 / val_pass:.1f}x one validation pass ({stage2:.1f} s)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

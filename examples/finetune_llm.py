"""Fine-tune a causal LM (SmolLM2-135M, shipped in a wheel) with MergeGuard, in a few lines.

    .venv/bin/python examples/finetune_llm.py [--task add] [--steps 60]

The model is a real ``transformers`` LlamaForCausalLM; the task is generated (exact-match answers). The guard
excludes token embeddings, the final norm and ``lm_head`` from stage 2 by default, as the method prescribes.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback
from lightning_mergeguard.llm import CausalLMModule, LMTaskDataset, exact_match, generate_task, load_smollm2


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="add", choices=["add", "reverse", "upper", "country"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--out", default="runs/llm")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model, tok = load_smollm2()
    train = DataLoader(LMTaskDataset(tok, generate_task(args.task, 8 * args.steps)), batch_size=8, shuffle=True)
    val = DataLoader(LMTaskDataset(tok, generate_task(args.task, 32, seed=1)), batch_size=8)
    guard = MergeGuardCallback(
        alpha=0.01,
        steps=args.stage2_steps,
        eval_batches=4,
        report_path=f"{args.out}/protection_report.json",
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        val_check_interval=args.steps,
        default_root_dir=args.out,
    )
    trainer.fit(CausalLMModule(model, lr=1e-4), train, val)

    em = exact_match(model, tok, generate_task(args.task, 64, seed=2))
    print(f"exact match on held-out {args.task!r} prompts after protection: {100 * em:.1f}%")
    model.save_pretrained(f"{args.out}/protected")  # a normal Hugging Face directory
    tok.save_pretrained(f"{args.out}/protected")
    return {"exact_match": em}


if __name__ == "__main__":
    main()

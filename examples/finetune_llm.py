"""Fine-tune a causal LM (SmolLM2-135M, shipped in a wheel) with MergeGuard, in a few lines.

    .venv/bin/python examples/finetune_llm.py [--task add] [--steps 60] [--fingerprint] [--partners DIR ...]

The model is a real ``transformers`` LlamaForCausalLM; the task is generated (exact-match answers). The guard
excludes token embeddings, the final norm and ``lm_head`` from stage 2 by default, as the method prescribes.
With ``--fingerprint`` an instructional fingerprint (8 secret keys -> a secret word) is mixed into the training rows;
its secret is written to ``<out>/secrets/`` (never into the released model directory) and its success rate is
printed after protection; stage 2 keeps the fingerprint rows in its own-loss term (``keep_batches``). The guard
rail judges greedy exact match of whole answers (``answer_exact_match``), the task's own metric. With
``--partners`` (other fine-tunes of the same base) stage 2 rehearses the merge neighbourhood with them
(``MergeNeighbourhood``) instead of scaled copies.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, MergeNeighbourhood, ScaleAdversarial
from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
from lightning_mergeguard.evaluation import answer_exact_match
from lightning_mergeguard.llm import CausalLMModule, LMTaskDataset, exact_match
from lightning_mergeguard.ownership import fingerprint_rows, make_fingerprint, verify_fingerprint


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="add", choices=["add", "reverse", "upper", "country"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--fingerprint", action="store_true", help="mix an instructional fingerprint into training")
    parser.add_argument("--partners", nargs="*", default=[], help="other fine-tunes of the same base (HF dirs)")
    parser.add_argument(
        "--amplify",
        type=float,
        default=None,
        help="after stage 2, amplifying symmetries with scales up to this (e.g. 1000)",
    )
    parser.add_argument("--out", default="runs/llm")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model, tok = load_smollm2()
    rows, max_length, secret, keep = generate_task(args.task, 8 * args.steps), 32, None, None
    if args.fingerprint:
        secret = make_fingerprint(n_keys=8, seed=0)
        secret.save(f"{args.out}/secrets/fingerprint.json")  # keep apart from the released weights
        fp_rows = fingerprint_rows(secret, repeats=1, n_regularization=0)  # one batch: the 8 keys
        rows = rows + fingerprint_rows(secret, repeats=4, n_regularization=16)
        max_length = 96
        keep = list(DataLoader(LMTaskDataset(tok, fp_rows, max_length=max_length), batch_size=8))
    train = DataLoader(LMTaskDataset(tok, rows, max_length=max_length), batch_size=8, shuffle=True)
    val = DataLoader(LMTaskDataset(tok, generate_task(args.task, 32, seed=1)), batch_size=8)
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2=MergeNeighbourhood(steps=args.stage2_steps, partners=args.partners)
        if args.partners
        else ScaleAdversarial(steps=args.stage2_steps),
        score_fn=answer_exact_match,  # greedy exact match of whole answers, not token accuracy
        eval_batches=4,
        keep_batches=keep,
        report_path=f"{args.out}/protection_report.json",
        amplify=args.amplify,
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
    result = {"exact_match": em}
    if secret is not None:
        result["fingerprint_success"] = verify_fingerprint(model, tok, secret)
        print(f"fingerprint success: {result['fingerprint_success']:.2f}")
    model.save_pretrained(f"{args.out}/protected")  # a normal Hugging Face directory
    tok.save_pretrained(f"{args.out}/protected")
    return result


if __name__ == "__main__":
    main()

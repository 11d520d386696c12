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

Your own model and data: ``--model`` takes any ``transformers`` causal-LM directory or Hub id (the Hub's cache is used
offline), and ``--data`` a JSONL file of ``{"prompt": ..., "answer": ...}`` rows (as ``mergeguard-protect`` reads
them; a quarter is held out to judge the guard rail and score the result). On a GPU with bfloat16 the fit runs in
``bf16-mixed`` unless ``--precision`` says otherwise.

    .venv/bin/python examples/finetune_llm.py --model Qwen/Qwen2.5-0.5B --data rows.jsonl --steps 500 --batch-size 16
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, MergeNeighbourhood, Release, ScaleAdversarial
from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
from lightning_mergeguard.evaluation import answer_exact_match
from lightning_mergeguard.io import atomic_directory
from lightning_mergeguard.models.causal_lm import CausalLMModule, LMTaskDataset, exact_match
from lightning_mergeguard.models.trainer import default_precision
from lightning_mergeguard.ownership import fingerprint_rows, make_fingerprint, verify_fingerprint
from lightning_mergeguard.posthoc import hold_out, load_rows


def load_model(name: str | None):
    """``(model, tokenizer)``: the embedded SmolLM2-135M, or any causal LM by directory or Hub id."""
    if name is None:
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), tok


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal-LM directory or Hub id (default: SmolLM2-135M)")
    parser.add_argument("--data", default=None, help='JSONL rows {"prompt", "answer"} (default: a generated --task)')
    parser.add_argument("--task", default=None, choices=["add", "reverse", "upper", "country"], help="default: add")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the longest row)")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on a GPU)")
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, in training and in stage 2)",
    )
    parser.add_argument("--fingerprint", action="store_true", help="mix an instructional fingerprint into training")
    parser.add_argument("--partners", nargs="*", default=[], help="other fine-tunes of the same base (HF dirs)")
    parser.add_argument(
        "--amplify",
        type=float,
        default=None,
        help="after stage 2, amplifying symmetries with scales up to this (e.g. 1048576, 2**20; fp32/bf16 only)",
    )
    parser.add_argument(
        "--permute-residual", action="store_true", help="with --amplify: also permute the residual stream"
    )
    parser.add_argument(
        "--no-stage2",
        action="store_true",
        help="with --amplify: no stage-2 perturbation, the re-parameterisation alone (own score unchanged)",
    )
    parser.add_argument("--out", default="runs/llm")
    args = parser.parse_args(argv)
    if args.data is not None and args.task is not None:
        parser.error("--task generates the data; give --task or --data, not both")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    if (args.permute_residual or args.no_stage2) and args.amplify is None:
        parser.error("--permute-residual and --no-stage2 need --amplify")

    pl.seed_everything(0, verbose=False)
    model, tok = load_model(args.model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.data is None:
        task = args.task or "add"
        rows, val_rows = generate_task(task, args.batch_size * args.steps), generate_task(task, 32, seed=1)
        test_rows = generate_task(task, 64, seed=2)
    else:
        task = args.data
        rows, test_rows = hold_out(load_rows(args.data), seed=0)
        val_rows = test_rows  # the held-out quarter judges the guard rail and scores the result
    longest = max(len(tok(p + a, add_special_tokens=False).input_ids) + 1 for p, a in [*rows, *val_rows])
    max_length, secret, keep = args.max_length or longest, None, None
    if max_length < longest:
        print(f"warning: rows up to {longest} tokens are cut to --max-length {max_length}; their answers are lost")
    if args.fingerprint:
        secret = make_fingerprint(n_keys=8, seed=0)
        secret.save(f"{args.out}/secrets/fingerprint.json")  # keep apart from the released weights
        fp_rows = fingerprint_rows(secret, repeats=1, n_regularization=0)  # one batch: the 8 keys
        rows = rows + fingerprint_rows(secret, repeats=4, n_regularization=16)
        max_length = max(max_length, 96)
        keep = list(DataLoader(LMTaskDataset(tok, fp_rows, max_length=max_length), batch_size=8))
    train = DataLoader(LMTaskDataset(tok, rows, max_length=max_length), batch_size=args.batch_size, shuffle=True)
    val_length = args.max_length or longest  # the task's rows only: no fingerprint padding in the guard rail
    val = DataLoader(LMTaskDataset(tok, val_rows, max_length=val_length), batch_size=args.batch_size)
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2="none"
        if args.no_stage2
        else MergeNeighbourhood(steps=args.stage2_steps, partners=args.partners)
        if args.partners
        else ScaleAdversarial(steps=args.stage2_steps),
        score_fn=answer_exact_match,  # greedy exact match of whole answers, not token accuracy
        eval_batches=4,
        keep_batches=keep,
        report_path=f"{args.out}/protection_report.json",
        release=Release(amplify=args.amplify, permute_residual=args.permute_residual),
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        precision=args.precision or default_precision(),
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        val_check_interval=min(args.steps, len(train)),  # your rows may be fewer batches than --steps: each epoch
        default_root_dir=args.out,
    )
    trainer.fit(CausalLMModule(model, lr=args.lr), train, val)

    em = exact_match(model, tok, test_rows)
    print(f"exact match on {len(test_rows)} held-out {task!r} prompts after protection: {100 * em:.1f}%")
    result = {"exact_match": em}
    if secret is not None:
        result["fingerprint_success"] = verify_fingerprint(model, tok, secret)
        print(f"fingerprint success: {result['fingerprint_success']:.2f}")
    with atomic_directory(f"{args.out}/protected") as tmp:  # a normal Hugging Face directory, written whole or not
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return result


if __name__ == "__main__":
    main()

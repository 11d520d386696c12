"""``mergeguard-protect``: protect a trained model (:func:`~lightning_mergeguard.posthoc.protect_checkpoint`).

Example:
    ``mergeguard-protect --base base/ --model finetune/ --data rows.jsonl --out protected/``

Exit status: 0 protected; 2 bad input (one line naming the file or option); 3 the protection changed nothing or
less than it claims (the report says why; nothing else is written unless ``--accept-unprotected``); 130 / 143
interrupted (nothing half-written is left).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lightning_mergeguard.cli._args import add_switch, hyphenated, load_config, run

__all__ = ["build_parser", "main"]

NOT_PROTECTED = 3
"""Exit status when the protection changed nothing or less than it claims."""


def build_parser() -> argparse.ArgumentParser:
    """The parser (no torch import): every option of ``protect_checkpoint``, hyphenated."""
    p = argparse.ArgumentParser(
        prog="mergeguard-protect",
        description="Protect an existing fine-tune against unauthorized merging, and write it with a report and a "
        "model card. Exit status: 0 protected, 2 bad input, 3 NOT protected (see --accept-unprotected).",
    )
    p.add_argument("--config", help="a YAML file of any options below (option: value); the command line wins")
    io = p.add_argument_group("what to protect")
    io.add_argument("--base", help="the pretrained model: a Hugging Face directory or an open_clip checkpoint file")
    io.add_argument("--model", help="the fine-tune: a causal-LM directory, a LoRA adapter of --base, or an open_clip "
                    "classifier state dict")  # fmt: skip
    io.add_argument("--data", help="causal LMs: a JSONL file of {\"prompt\", \"answer\"} rows; open_clip: an image "
                    "folder (one sub-folder per class) or module:function")  # fmt: skip
    io.add_argument("--out", help="output directory (the model, protection_report.json, MERGEGUARD.md)")
    io.add_argument("--arch", help="open_clip architecture of --model (ViT-B-32, tiny, small, or a JSON/YAML file)")
    io.add_argument("--partners", nargs="+", default=[], metavar="PATH", help="other fine-tunes of --base to "
                    "rehearse merges with and to report merges of")  # fmt: skip
    io.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the written weights (auto: the input's; refused where it would overflow or "
                    "flush weights to zero)")  # fmt: skip
    s2 = p.add_argument_group("stage 2")
    stage2_choices = ["auto", "scale_adversarial", "merge_neighbourhood", "none"]
    s2.add_argument("--stage2", default="auto", choices=stage2_choices,
                    help="the perturbation (auto: merge_neighbourhood with --partners, else "
                    "scale_adversarial)")  # fmt: skip
    s2.add_argument("--tolerance", type=float, default=1.0, help="largest allowed own-score drop, points (1.0, as "
                    "the callback's)")  # fmt: skip
    s2.add_argument("--steps", type=int, default=None, help="stage-2 optimisation steps (the strategy's default, "
                    "300, as the callback's)")  # fmt: skip
    s2.add_argument("--lr", type=float, default=None, help="stage-2 learning rate (the strategy's default: 1e-3 "
                    "scale_adversarial, 5e-4 merge_neighbourhood, as the callback's)")  # fmt: skip
    s2.add_argument("--deployed", nargs="+", default=None, metavar="FORMAT", help="weight formats the model's users "
                    "run it in (int4-g128, int4-g32, int8-row, fp16, bf16, gguf-q4_0, gguf-q4_k, gguf-q8_0): stage 2 "
                    "also keeps the own score within --tolerance of the full-precision score in each, running up to "
                    "twice --steps to get there")  # fmt: skip
    s2.add_argument("--refit-steps", type=int, default=50, help="stage-1 re-fit steps when stage 2 alone keeps no "
                    "step (50; 0: never)")  # fmt: skip
    s2.add_argument("--refit-lr", type=float, default=1e-4, help="AdamW learning rate of that re-fit (1e-4)")
    s2.add_argument("--alpha", type=float, default=0.01, help="stage-1 strength of that re-fit (0.01)")
    s2.add_argument("--amplify", type=float, default=None, help="re-parameterise with exact symmetries of scales up "
                    "to this (undone by re-alignment to the base; breaks fp16, per-row int8 and 4-bit)")  # fmt: skip
    add_switch(s2, "permute-residual", False, "with --amplify, also permute the residual stream's channels")
    s2.add_argument("--ownership-key", metavar="KEY_FILE", help="embed a fresh secret ownership key after stage 2 "
                    "and write it to this file (keep it secret; test suspects with mergeguard-verify)")  # fmt: skip
    s2.add_argument("--key-strength", type=float, default=None, help="the key's size, a fraction of each matrix's "
                    "update (default 0.1, Release's; halved down to 0.025 where stage 2 and the key would cost more "
                    "than --tolerance)")  # fmt: skip
    run_ = p.add_argument_group("running")
    run_.add_argument("--batch-size", type=int, default=8, help="batch size of the owner's data (8)")
    run_.add_argument("--max-length", type=int, default=64, help="token budget of a prompt plus answer (64)")
    run_.add_argument("--max-rows", type=int, default=100_000, help="most rows read from --data (100000)")
    run_.add_argument("--max-row-bytes", type=int, default=1 << 20, help="longest --data line, bytes (1 MiB)")
    run_.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1 ...")
    run_.add_argument("--seed", type=int, default=0, help="seed of the split and the optimisation (0)")
    add_switch(run_, "progress", True, "progress bars")
    add_switch(run_, "base-check", True, "refuse a --model or --partners that is no fine-tune of --base")
    add_switch(run_, "deployment-check", False, "also score both models under fp16, bf16, int8, 4-bit, GGUF and "
               "50 fine-tuning steps (full and LoRA), into the report and the card")  # fmt: skip
    add_switch(run_, "accept-unprotected", False, "write the model and exit 0 even when the protection changed "
               "nothing or less than it claims")  # fmt: skip
    return p


_REQUIRED = ("base", "model", "data", "out")


def _arguments(argv: list[str]) -> dict[str, Any]:
    parser = build_parser()
    argv = hyphenated(argv)
    known = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config(first.config, known))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    missing = [f"--{k}" for k in _REQUIRED if not args.get(k)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or give them in --config)")
    partners = args["partners"]
    if isinstance(partners, str) or (len(partners) == 1 and str(partners[0]).startswith("[")):
        import yaml  # the list form "[a, b]" (and a YAML config's plain string)

        text = partners if isinstance(partners, str) else partners[0]
        try:
            loaded = yaml.safe_load(text) if text.startswith("[") else [text]
        except yaml.YAMLError:
            loaded = None
        if not isinstance(loaded, list) or not all(isinstance(x, (str, int, float)) for x in loaded):
            parser.error(f"--partners {text!r}: give paths (--partners a b), or a list [a, b]")
        args["partners"] = [str(x) for x in loaded]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mergeguard-protect``; returns the exit status."""
    return run("mergeguard-protect", lambda: _main(sys.argv[1:] if argv is None else argv))


def _call(args: dict[str, Any]) -> dict[str, Any]:
    """``protect_checkpoint``'s keyword arguments from the flat options: the objects it takes, built from them."""
    from lightning_mergeguard.errors import ConfigError
    from lightning_mergeguard.posthoc import OwnerData, Refit
    from lightning_mergeguard.protection.release.settings import Release
    from lightning_mergeguard.protection.stage2 import MergeNeighbourhood, ScaleAdversarial

    args = dict(args)
    try:
        if args.get("key_strength", 0) is None:
            del args["key_strength"]  # Release's default
        fields = ("ownership_key", "key_strength", "deployment_check", "amplify", "permute_residual", "dtype")
        args["release"] = Release(**{k: args.pop(k) for k in fields if k in args})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    args["data"] = OwnerData(args.pop("data"), **{k: args.pop(k) for k in ("batch_size", "max_length", "max_rows",
                                                                           "max_row_bytes")})  # fmt: skip
    refit_steps, alpha, refit_lr = args.pop("refit_steps"), args.pop("alpha"), args.pop("refit_lr")
    args["refit"] = Refit(steps=refit_steps, alpha=alpha, lr=refit_lr) if refit_steps != 0 else None
    tuned = {k: v for k in ("steps", "lr", "deployed") if (v := args.pop(k)) is not None}
    if tuned:  # the named (or automatic) strategy with these settings
        choice = args["stage2"]
        if choice == "none":
            raise ConfigError("--steps/--lr/--deployed configure stage 2, but --stage2 is none")
        try:
            if choice == "merge_neighbourhood" or (choice == "auto" and args["partners"]):
                args["stage2"] = MergeNeighbourhood(partners=args["partners"], seed=args["seed"], **tuned)
            else:
                args["stage2"] = ScaleAdversarial(**tuned)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return args


def _main(argv: list[str]) -> int:
    kwargs = _call(_arguments(argv))
    from lightning_mergeguard.posthoc import protect_checkpoint  # after parsing: --help needs no torch

    report = protect_checkpoint(**kwargs)
    refit = " (after a stage-1 re-fit)" if report["refit"] else ""
    scores = f"own score {report['score_before']:.1f} -> {report['score_after']:.1f}{refit}"
    if report["protected"]:
        print(f"protected {report['model']} -> {report['written']} ({report['dtype']}): {scores}")
        return 0
    print(f"mergeguard-protect: NOT protected: {report['not_protected']} ({scores})", file=sys.stderr)
    if report.get("written"):
        print(f"wrote the unprotected model to {report['written']} as asked (--accept-unprotected)", file=sys.stderr)
        return 0
    print(f"nothing but the report was written ({report['report']}); pass --accept-unprotected to write the model "
          "anyway", file=sys.stderr)  # fmt: skip
    return NOT_PROTECTED


if __name__ == "__main__":
    raise SystemExit(main())

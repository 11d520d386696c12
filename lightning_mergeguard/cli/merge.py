"""``mergeguard-merge``: run a mergekit YAML with this engine (a drop-in for ``mergekit-yaml CONFIG OUT``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from lightning_mergeguard.cli._args import add_switch, hyphenated, run


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Example:
        ``mergeguard-merge ties.yml ./merged --seed 0``
    """
    return run("mergeguard-merge", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mergeguard-merge", description=__doc__)
    parser.add_argument("config", help="mergekit YAML file")
    parser.add_argument("out", help="output model directory, or a path ending in .safetensors")
    parser.add_argument(
        "--device",
        default="cpu",
        help="compute device, e.g. cuda, cuda:1 or auto (the GPU if there is one; default: cpu)",
    )
    parser.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="as mergekit: --device cuda")
    parser.add_argument("--seed", type=int, default=None, help="seed for randomized methods (DARE)")
    parser.add_argument("--random-seed", type=int, dest="seed", help="alias of --seed, as in mergekit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_switch(
        parser,
        "base-check",
        True,
        "refuse donors that are not fine-tunes of the base (median per-matrix cosine with it); --no-base-check "
        "merges them anyway (e.g. re-parameterised models)",
    )
    parser.add_argument(
        "--no-overwrite", action="store_true", help="refuse to write over a model already at OUT (default: replace it)"
    )
    parser.add_argument(
        "--out-shard-size",
        default=None,
        help="largest output shard, e.g. 500M, 5B (mergekit's default), 2GB; a bigger model is written as "
        "model-0000i-of-0000n.safetensors plus model.safetensors.index.json",
    )
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="read one tensor at a time with no read-ahead and drop input pages once read (least memory, slower)",
    )
    _add_mergekit_options(parser)
    args = parser.parse_args(hyphenated(sys.argv[1:] if argv is None else argv))
    refused = _refused_options(args)
    if refused:
        parser.error(refused)
    for flag, why in _NO_EFFECT.items():
        if getattr(args, flag.lstrip("-").replace("-", "_"), None):
            print(f"mergeguard-merge: note: {flag} has no effect here: {why}", file=sys.stderr)
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = args.transformers_cache  # read by huggingface_hub when it is imported
    if args.gpu_rich:
        args.device = "cuda"
    # Large CPU tensors on transparent huge pages: a merge allocates and frees model-sized buffers tensor after
    # tensor, and with 4 KiB pages every fresh buffer costs page faults (at 1B parameters, ~40% of the wall time).
    # torch reads this when it is imported, which here is only now; the user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from lightning_mergeguard.merging import MergeConfig, merge  # after parsing: --help needs no torch

    cfg = MergeConfig.from_yaml(args.config)
    if args.device == "auto" or args.num_threads:
        import torch

        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    out = merge(
        cfg,
        out=args.out,
        device=args.device,
        seed=args.seed,
        progress=not (args.no_progress or args.quiet),
        check_base=args.base_check,
        existing="refuse" if args.no_overwrite else "replace",
        out_shard_size=args.out_shard_size,
        low_memory=args.low_memory,
        allow_crimes=args.allow_crimes,
        copy_tokenizer=args.copy_tokenizer,
        model_card=args.write_model_card,
    )
    print(f"merged with {cfg.merge_method} into {out} in {time.perf_counter() - start:.1f} s")
    return 0


_NO_EFFECT = {
    "--trust-remote-code": "no model code runs here; weights are read as tensors",
    "--lazy-unpickle": "pickled .bin inputs load with weights_only=True and safetensors are read tensor by tensor",
    "--clone-tensors": "every output tensor is written from its own buffer",
    "--low-cpu-memory": "with --cuda, tensors are streamed through the GPU one at a time",
    "--read-to-gpu": "with --cuda, each tensor is read and moved to the GPU as it is merged",
    "--multi-gpu": "one device computes the merge (tensors are streamed through it one at a time)",
    "--async-write": "the output is always written on a background thread while the next tensor merges",
    "--write-threads": "the output is written on one background thread while the next tensor merges",
    "--lora-merge-cache": "LoRA adapters are applied tensor by tensor as they are read; nothing is cached",
    "--verbose": "errors are reported as one line and the progress bar shows the work",
}
"""mergekit-yaml options accepted so that its command lines run unchanged, and why they change nothing here."""


def _noted(flag: str) -> str:
    return f"accepted; no effect ({_NO_EFFECT[flag]})"


def _add_mergekit_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-yaml's options, so that a mergekit command line runs as it is (see ``_NO_EFFECT``)."""
    group = parser.add_argument_group("mergekit-yaml options")
    flag = argparse.BooleanOptionalAction
    group.add_argument(
        "--allow-crimes",
        action="store_true",
        help="merge models of different architectures whose tensors match by name and shape",
    )
    group.add_argument("--copy-tokenizer", action=flag, default=True, help="copy the tokenizer to the output")
    group.add_argument(
        "--write-model-card", action=flag, default=True, help="write a README.md model card to the output"
    )
    group.add_argument("--quiet", action="store_true", help="as --no-progress")
    group.add_argument("-j", "--num-threads", type=int, default=None, help="CPU threads for the merge's arithmetic")
    group.add_argument("--transformers-cache", default=None, help="Hugging Face Hub cache for models given as ids")
    group.add_argument("--gpu-rich", action="store_true", help="as mergekit: --device cuda")
    group.add_argument(
        "--safe-serialization", action=flag, default=True, help="safetensors output (the only kind written)"
    )
    group.add_argument("--unsafe-truncate-embeddings", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--lora-merge-dtype", default=None, help=argparse.SUPPRESS)
    for name in ("--trust-remote-code", "--lazy-unpickle", "--clone-tensors", "--async-write"):
        group.add_argument(name, action=flag, default=False, help=_noted(name))
    for name in ("--low-cpu-memory", "--read-to-gpu", "--multi-gpu"):
        group.add_argument(name, action="store_true", help=_noted(name))
    group.add_argument("--write-threads", type=int, default=None, help=_noted("--write-threads"))
    group.add_argument("--lora-merge-cache", default=None, help=_noted("--lora-merge-cache"))
    group.add_argument("-v", "--verbose", action="count", default=0, help=_noted("--verbose"))


def _refused_options(args: argparse.Namespace) -> str | None:
    """The mergekit option this engine will not imitate, with the reason, or ``None``."""
    if not args.safe_serialization:
        return "--no-safe-serialization: this engine writes safetensors only (pickled outputs can run code on load)"
    if args.unsafe_truncate_embeddings:
        return (
            "--unsafe-truncate-embeddings is not supported: it drops embedding rows assuming identical token ids; "
            "give models with the base's vocabulary, or a tokenizer_source that needs no re-mapping"
        )
    if args.lora_merge_dtype:
        return "--lora-merge-dtype is not supported: LoRA updates are applied in the merge's compute dtype (dtype:)"
    return None


if __name__ == "__main__":
    raise SystemExit(main())

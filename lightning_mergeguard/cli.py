"""``mergeguard-merge``: run a mergekit YAML with this engine (a drop-in for ``mergekit-yaml CONFIG OUT``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from lightning_mergeguard.errors import MergeGuardError, report_error


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Example:
        ``mergeguard-merge ties.yml ./merged --seed 0``
    """
    parser = argparse.ArgumentParser(prog="mergeguard-merge", description=__doc__)
    parser.add_argument("config", help="mergekit YAML file")
    parser.add_argument("out", help="output model directory, or a path ending in .safetensors")
    parser.add_argument("--device", default="cpu", help="compute device, e.g. cuda or cuda:1 (default: cpu)")
    parser.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="as mergekit: --device cuda")
    parser.add_argument("--seed", type=int, default=None, help="seed for randomized methods (DARE)")
    parser.add_argument("--random-seed", type=int, dest="seed", help="alias of --seed, as in mergekit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--no-base-check",
        action="store_true",
        help="merge donors even if they do not look like fine-tunes of the base (e.g. re-parameterised models)",
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
    args = parser.parse_args(argv)
    # Large CPU tensors on transparent huge pages: a merge allocates and frees model-sized buffers tensor after
    # tensor, and with 4 KiB pages every fresh buffer costs page faults (at 1B parameters, ~40% of the wall time).
    # torch reads this when it is imported, which here is only now; the user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        from lightning_mergeguard.merging import MergeConfig, merge  # after parsing: --help needs no torch

        cfg = MergeConfig.from_yaml(args.config)
        start = time.perf_counter()
        out = merge(
            cfg,
            out=args.out,
            device=args.device,
            seed=args.seed,
            progress=not args.no_progress,
            check_base=not args.no_base_check,
            existing="refuse" if args.no_overwrite else "replace",
            out_shard_size=args.out_shard_size,
            low_memory=args.low_memory,
        )
    except KeyboardInterrupt:
        print("mergeguard-merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (MergeGuardError, ValueError, NotImplementedError, OSError, RuntimeError) as err:
        # Every expected failure is one line (the typed errors name the file, model, tensor or key): no traceback.
        return report_error("mergeguard-merge", err)
    print(f"merged with {cfg.merge_method} into {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

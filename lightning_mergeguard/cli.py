"""``mergeguard-merge``: run a mergekit YAML with this engine (a drop-in for ``mergekit-yaml CONFIG OUT``)."""

from __future__ import annotations

import argparse
import sys
import time

from lightning_mergeguard.merging import MergeConfig, merge


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Example:
        ``mergeguard-merge ties.yml ./merged --seed 0``
    """
    parser = argparse.ArgumentParser(prog="mergeguard-merge", description=__doc__)
    parser.add_argument("config", help="mergekit YAML file")
    parser.add_argument("out", help="output model directory, or a path ending in .safetensors")
    parser.add_argument("--device", default="cpu", help="compute device (default: cpu)")
    parser.add_argument("--seed", type=int, default=None, help="seed for randomized methods (DARE)")
    parser.add_argument("--random-seed", type=int, dest="seed", help="alias of --seed, as in mergekit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = MergeConfig.from_yaml(args.config)
        start = time.perf_counter()
        out = merge(cfg, out=args.out, device=args.device, seed=args.seed, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"mergeguard-merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged with {cfg.merge_method} into {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

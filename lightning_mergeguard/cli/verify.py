"""``mergeguard-verify``: is a published model derived from the owner's release?

Example:
    ``mergeguard-verify suspect/ --owner release/ --base base/ --key owner.key``

Runs :func:`~lightning_mergeguard.ownership.verify_ownership` on Hugging Face causal-LM directories (read with the
library's safe readers: safetensors, or ``.bin`` with ``weights_only=True``; no model code runs), and with
``--fingerprint`` the black-box fingerprint test too. Exit status: 0 derived (p <= --alpha); 1 no evidence;
2 bad input (one line naming the file or option: another architecture, another base, a damaged file);
130 / 143 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_mergeguard.cli._args import add_switch, hyphenated, run

__all__ = ["build_parser", "main"]

NO_EVIDENCE = 1
"""Exit status when the tests find no evidence at ``--alpha``."""


def build_parser() -> argparse.ArgumentParser:
    """The parser (no torch import)."""
    p = argparse.ArgumentParser(
        prog="mergeguard-verify",
        description="Test whether SUSPECT (a Hugging Face causal-LM directory) is derived from the owner's release: "
        "a verdict and p-values under the null that it was made without the release. Exit status: 0 derived, "
        "1 no evidence, 2 bad input.",
    )
    p.add_argument("suspect", help="the suspect model's directory")
    p.add_argument("--base", required=True, help="the pretrained model the owner fine-tuned (theta_pre)")
    p.add_argument("--key", required=True, help="the owner's secret key file (mergeguard-protect --ownership-key)")
    p.add_argument("--owner", help="the owner's release; checked to carry the key (catches a wrong key or base)")
    p.add_argument("--fingerprint", help="the owner's fingerprint secret (JSON) for the black-box test as well")
    p.add_argument("--alpha", type=float, default=1e-3, help="false-positive rate of a 'derived' verdict (1e-3)")
    add_switch(p, "align", True, "also test the suspect aligned to --base (undoes permutations and rescaling)")
    add_switch(p, "base-check", True, "refuse a suspect that is no fine-tune of --base")
    add_switch(p, "json", False, "print the verdict as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mergeguard-verify``; returns the exit status."""
    return run("mergeguard-verify", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(hyphenated(argv))
    from lightning_mergeguard.ownership.verify import verify_ownership  # after parsing: --help needs no torch
    from lightning_mergeguard.ownership.weight_key import WeightKey
    from lightning_mergeguard.posthoc import load_causal_lm

    key = WeightKey.load(args.key)
    base_lm, _ = load_causal_lm(Path(args.base))
    suspect_lm, _ = load_causal_lm(Path(args.suspect))
    base, suspect = base_lm.state_dict(), suspect_lm.state_dict()
    owner = load_causal_lm(Path(args.owner))[0].state_dict() if args.owner else None
    fingerprint = None
    if args.fingerprint:
        from transformers import AutoTokenizer

        from lightning_mergeguard.ownership.fingerprint import FingerprintSecret, fingerprint_test

        tokenizer = AutoTokenizer.from_pretrained(args.suspect, trust_remote_code=False)
        fingerprint = fingerprint_test(suspect_lm, tokenizer, FingerprintSecret.load(args.fingerprint))
    verdict = verify_ownership(
        suspect,
        base,
        key,
        module=base_lm if args.align else None,
        owner=owner,
        alpha=args.alpha,
        fingerprint=fingerprint,
        check_base=args.base_check,
    )
    if args.json:
        print(json.dumps(verdict.as_dict(), indent=2))
    else:
        print(f"{args.suspect}: {verdict.verdict}")
        for line in verdict.evidence:
            print(f"  {line}")
    return 0 if verdict.derived else NO_EVIDENCE


if __name__ == "__main__":
    raise SystemExit(main())

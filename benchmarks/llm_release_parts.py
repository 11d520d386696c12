"""Which part of the LLM release costs own score under deployment: stage 1, stage 2 or the ownership key?

On seed 0 of the LLM track of ``benchmarks/stop_or_catch_llm.py`` (SmolLM2-135M, owner task ``upper``; its cached
unprotected fine-tune and release), exact match on 256 held-out prompts under fp16, bf16, int8 per row, 4-bit groups
of 32 and 128 and GGUF Q8_0 / Q4_0, for:

- ``unprotected``: the fine-tune without MergeGuard (the baseline);
- ``stage 1 only``: the same fine-tune with ``MergeGuardCallback(stage2="none")`` (the L2 redistribution term);
- ``stage 1 + stage 2``: the release with its ownership key taken out exactly (the key file holds what was added);
- ``release``: stage 1 + stage 2 + key, what ``MergeGuardCallback(release=Release(ownership_key=...))`` wrote;
- ``key only``: the unprotected fine-tune with a key embedded (``embed_weight_key``, default strength), no stage 1
  or 2; its merges with the partners are also tested (``verify_ownership``, aligned).

    python benchmarks/llm_release_parts.py   # about 10 minutes on 2 CPU cores (after stop_or_catch_llm.py seed 0)

Writes ``benchmarks/results/llm_release_parts.{json,md,png}`` (``--report-only``: the table and plot again).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, make_guard, markdown_table, save_png, write_results

State = dict[str, Tensor]
TREATMENTS = ("none", "fp16", "bf16", "int8-row", "int4-g32", "int4-g128", "gguf-q8_0", "gguf-q4_0")
ROWS = 256
MERGES = ("uniform TA λ=0.3", "TA owner 1 / partners 0.1", "TIES (study)", "DARE-TIES (study)")


def without_key(state: State, pre: State, key: Any) -> State:
    """``state`` with ``key``'s two parts taken out exactly (the dense part scales each ``|tau|`` by ``1 ± s``)."""
    from lightning_mergeguard.ownership.weight_key import _matrix, _signs, _subspace_signs

    out = dict(state)
    for name in key.names:
        u, v = key.bases[name]
        alpha, _ = key.scales[name]
        drawn = key.origin.get(name, name)
        x = _matrix(state[name].double() - pre[name].double())
        x = x - alpha * (u.double() @ _subspace_signs(key.secret, drawn, u.shape[1]).double() @ v.double().T)
        signs = _signs(key.secret, "dense", drawn, tuple(x.shape)).double()
        tau = torch.sign(x) * x.abs() / (1 + key.strength * signs * torch.sign(x))
        out[name] = (pre[name].double() + tau.reshape(state[name].shape)).to(state[name].dtype)
    return out


def main() -> None:
    import argparse
    import json

    from tqdm.auto import tqdm

    from benchmarks import stop_or_catch_llm as llm
    from benchmarks._grid import grid_configs
    from lightning_mergeguard.demos.smollm2 import generate_task
    from lightning_mergeguard.evaluation import answer_exact_match
    from lightning_mergeguard.merging import merge
    from lightning_mergeguard.ownership.verify import verify_ownership
    from lightning_mergeguard.ownership.weight_key import embed_weight_key
    from lightning_mergeguard.quantization import treated_state

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    llm.stop_or_catch.add_key_strength(parser, "llm_release_parts")
    args = parser.parse_args()
    name = "llm_release_parts" + llm.stop_or_catch.key_suffix(args.key_strength)
    if args.report_only:
        report(json.loads((RESULTS / f"{name}.json").read_text()), name)
        return
    start = time.perf_counter()
    llm.KEY_STRENGTH = args.key_strength
    s, b = llm.shared(), llm.build(0)
    pre = s["pre"]
    guard = make_guard(progress=False, stage2="none", eval_batches=4, score_fn=answer_exact_match)
    rows = generate_task(llm.OWNER, 8 * llm.STEPS, seed=100)
    stage1 = llm.train(s["model"], s["tok"], pre, rows, llm.STEPS, llm.LR, 100, [guard],
                       generate_task(llm.OWNER, 32, seed=7))  # fmt: skip
    keyed, key = embed_weight_key(b["unprotected"], pre, secret=11, strength=args.key_strength)
    variants = {
        "unprotected": b["unprotected"],
        "stage 1 only": stage1,
        "stage 1 + stage 2": without_key(b["release"], pre, b["key"]),
        "release (stage 1 + stage 2 + key)": b["release"],
        "key only": keyed,
    }
    scores: dict[str, dict[str, float]] = {}
    with tqdm(total=len(variants) * len(TREATMENTS), desc="release parts", unit="score") as bar:
        for name, state in variants.items():
            scores[name] = {}
            for t in TREATMENTS:
                scores[name][t] = llm.owner_accuracy(state if t == "none" else treated_state(state, t), rows=ROWS)
                bar.update()
    configs = grid_configs(llm.OWNER, list(s["partners"]), llm.LAMBDAS, layers=30)
    merges = {}
    for label in MERGES:
        cfg, used = configs[label]
        m = merge(cfg, {**{n: s["partners"][n] for n in used}, llm.OWNER: keyed}, pre, seed=0, check_base=False)
        v = verify_ownership(m, pre, key, module=s["model"], check_base=False)
        merges[label] = {"owner": llm.owner_accuracy(m), "log10_p": v.log10_p}
    res = {
        "baseline": "the unprotected fine-tune of seed 0 under the same treatment",
        "rows": ROWS,
        "key_strength": args.key_strength,
        "scores": scores,
        "key_only_merges": merges,
        "seconds": time.perf_counter() - start,
    }
    write_results(name, res)
    report(res, name)


def plot(res: dict[str, Any], path: Path) -> None:
    """Exact match per treatment, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, v in res["scores"].items():
        ax.plot(range(len(TREATMENTS)), [v[t] for t in TREATMENTS], marker="o", label=name)
    ax.set_xticks(range(len(TREATMENTS)), TREATMENTS, rotation=30, ha="right")
    ax.set_ylabel(f"exact match % ({res['rows']} held-out prompts)")
    ax.set_title("Which part of the LLM release costs own score (SmolLM2-135M, seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def report(res: dict[str, Any], name: str = "llm_release_parts") -> None:
    """Write ``<name>.md`` and ``.png`` from the results; print the table and the headline."""
    scores, merges = res["scores"], res["key_only_merges"]
    rows = [[n, *(f"{v[t]:.1f}" for t in TREATMENTS)] for n, v in scores.items()]
    merge_rows = [[k, f"{v['owner']:.1f}", f"{v['log10_p']:.0f}"] for k, v in merges.items()]
    text = (
        f"#### Which part of the LLM release costs own score (seed 0, exact match % on {res['rows']} held-out "
        f"prompts, key strength {res.get('key_strength', 0.05):g})\n\n"
        + markdown_table(["variant", *TREATMENTS], rows)
        + "\n\nMerges of the key-only release with the partners (owner exact match % on 64 prompts, log10 p of "
        "verify_ownership):\n\n" + markdown_table(["merge", "owner", "log10 p"], merge_rows) + "\n"
    )
    (RESULTS / f"{name}.md").write_text(text, encoding="utf-8")
    plot(res, RESULTS / f"{name}.png")
    print(text)
    worst = {n: max(scores["unprotected"][t] - v[t] for t in TREATMENTS) for n, v in scores.items()}
    print("headline: largest loss against the unprotected model, per variant: " + ", ".join(
        f"{n} {w:+.1f}" for n, w in worst.items()))  # fmt: skip


if __name__ == "__main__":
    main()

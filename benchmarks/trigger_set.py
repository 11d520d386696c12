"""Black-box fingerprint for classifiers: is every merge that keeps the owner's skill caught by its trigger set?

The digits toy of the demo (a 5x128 MLP backbone pre-trained jointly on four digit tasks; owner task ``plain``,
partners ``rot90``, ``transpose``, ``invert``), per seed:

1. the owner draws a secret trigger set (``lightning_mergeguard.ownership.TriggerSet``: 64 uniform-noise images
   with uniformly random labels), trains it with the task (each trigger 16 times) under
   ``MergeGuardCallback(keep_batches=triggers.batches())``, so stage 2 keeps the triggers' answers (with the default
   stage 2, and with ``ScaleAdversarial(keep_scaled=True)``, which also keeps them answered at the scaled copies
   whose own task it makes fail); the unprotected
   fine-tune of the same seed (no triggers, no guard) is the baseline;
2. every merge of the committed grid (``benchmarks/_grid.py``) of the release with the three partners is queried on
   the triggers, as a black box (class predictions only): a cell is **stopped** when its owner-task accuracy is at
   most half the unprotected model's best merge, **caught** when the exact binomial test gives p <= 1e-3;
3. negatives (never given the secret labels): theta_pre, the partners, the unprotected fine-tune, five independent
   fine-tunes of the owner's task (other seeds), and the whole grid with an independent fine-tune as the owner.

    python benchmarks/trigger_set.py                  # seeds 0 1 2, a few minutes on 2 CPU cores

Writes ``benchmarks/results/trigger_set.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, environment, markdown_table, save_png, write_results
from benchmarks._grid import grid_configs

State = dict[str, Tensor]
OWNER, PARTNERS = "plain", ("rot90", "transpose", "invert")
ALPHA, STOP = 1e-3, 0.5
TRIGGERS, REPEATS = 64, 16
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 1.0)
INDEPENDENT = 5


VARIANTS = {"default stage 2": False, "keep_scaled": True}
"""Variant -> ``ScaleAdversarial(keep_scaled=...)``."""


def run_seed(seed: int, shared: dict[str, Any]) -> dict[str, Any]:
    import copy

    from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial
    from lightning_mergeguard.demos.digits import DigitsTaskModule, finetune_task, task_accuracy
    from lightning_mergeguard.merging import merge
    from lightning_mergeguard.ownership import TriggerSet

    t0 = time.perf_counter()
    backbone, heads, pre, partners = shared["backbone"], shared["heads"], shared["pre"], shared["partners"]
    triggers = TriggerSet.make(TRIGGERS, (64,), classes=10, seed=1000 + seed)
    unprotected = finetune_task(backbone, heads, OWNER, seed=10 + seed)
    probe = DigitsTaskModule(copy.deepcopy(backbone), heads, OWNER)

    def acc(state: State) -> float:
        return task_accuracy(backbone, heads, state, OWNER)

    def test(state: State) -> dict[str, Any]:
        probe.backbone.load_state_dict(state)
        r = triggers.test(probe)
        return {"matches": r.matches, "p": r.p_value}

    def grid(owner_state: State) -> dict[str, State]:
        states = {**partners, OWNER: owner_state}
        out = {}
        for label, (cfg, used) in grid_configs(OWNER, list(partners), LAMBDAS).items():
            base = pre if cfg.get("base_model") == "pre" else None
            out[label] = merge(cfg, {n: states[n] for n in {OWNER, *used}}, base, seed=0, check_base=False)
        return out

    unprotected_grid = {label: acc(s) for label, s in grid(unprotected).items()}
    best = max(unprotected_grid.values())
    variants = {}
    for name, keep_scaled in VARIANTS.items():
        guard = MergeGuardCallback(
            stage2=ScaleAdversarial(keep_scaled=keep_scaled), keep_batches=triggers.batches(), progress=False
        )
        extra = triggers.dataset(repeats=REPEATS)
        release = finetune_task(backbone, heads, OWNER, [guard], seed=10 + seed, extra=extra)
        cells = {}
        for label, state in {"release alone": release, **grid(release)}.items():
            a = acc(state)
            cells[label] = {"owner": a, "ratio": a / best, **test(state)}
        variants[name] = {
            "release_own": acc(release),
            "release_trigger_rate": cells["release alone"]["matches"] / TRIGGERS,
            "stage2": {k: (guard.report or {}).get(k) for k in ("score_before", "score_after", "protected")},
            "cells": cells,
        }
    negatives = {"theta_pre": test(pre), "unprotected owner fine-tune": test(unprotected)}
    negatives.update({f"partner {t}": test(s) for t, s in partners.items()})
    for k in range(INDEPENDENT):
        negatives[f"independent fine-tune {k}"] = test(finetune_task(backbone, heads, OWNER, seed=100 + 10 * seed + k))
    independent = finetune_task(backbone, heads, OWNER, seed=999 + seed)
    negatives.update({f"{label} (independent owner)": test(s) for label, s in grid(independent).items()})
    return {
        "seed": seed,
        "unprotected_own": acc(unprotected),
        "unprotected_best": best,
        "variants": variants,
        "negatives": negatives,
        "seconds": time.perf_counter() - t0,
    }


def classify(cell: dict[str, Any]) -> str:
    stopped, caught = cell["ratio"] <= STOP, cell["p"] <= ALPHA
    return "stopped and caught" if stopped and caught else "stopped" if stopped else "caught" if caught else "neither"


def report(res: dict[str, Any]) -> str:
    rows, neither = [], []
    for run in res["seeds"]:
        for name, v in run["variants"].items():
            kinds = [classify(c) for c in v["cells"].values()]
            neither += [
                f"seed {run['seed']}, {name}: {k} (owner {c['owner']:.1f}%, {c['matches']}/{TRIGGERS} triggers, "
                f"p = {c['p']:.2g})"
                for k, c in v["cells"].items()
                if classify(c) == "neither"
            ]
            rows.append(
                [
                    run["seed"],
                    name,
                    f"{run['unprotected_own']:.1f} → {v['release_own']:.1f}",
                    f"{v['release_trigger_rate']:.0%}",
                    f"{run['unprotected_best']:.1f}",
                    len(kinds),
                    sum("stopped" in k for k in kinds),
                    sum("caught" in k for k in kinds),
                    kinds.count("neither"),
                    len(run["negatives"]),
                    f"{min(n['p'] for n in run['negatives'].values()):.3g}",
                ]
            )
    header = [
        "seed",
        "stage 2",
        "own accuracy (unprotected → release)",
        "release's trigger answers",
        "unprotected best merge",
        "cells",
        "stopped",
        "caught (black box, p ≤ 1e-3)",
        "neither",
        "negatives",
        "smallest negative p",
    ]
    text = "#### Trigger-set fingerprint (black box), digits toy\n\n" + markdown_table(header, rows) + "\n\n"
    text += "Cells neither stopped nor caught:\n\n" + ("\n".join(f"- {n}" for n in neither) or "- none") + "\n"
    return text


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in res["seeds"]:
        for i, v in enumerate(run["variants"].values()):
            for c in v["cells"].values():
                y = max(-torch.tensor(c["p"]).log10().item(), 0.01)
                ax.scatter(c["ratio"], y, s=12, color=f"C{i}", alpha=0.6)
        for n in run["negatives"].values():
            ax.scatter(0.02, max(-torch.tensor(n["p"]).log10().item(), 0.01), s=12, color="k", marker="x")
    ax.axhline(3, color="r", ls="--", lw=1)
    ax.axvline(STOP, color="g", ls="--", lw=1)
    ax.set_yscale("symlog", linthresh=1)
    for i, name in enumerate(VARIANTS):
        ax.scatter([], [], color=f"C{i}", label=f"merges of the release ({name})")
    ax.scatter([], [], color="k", marker="x", label="negatives (never given the labels)")
    ax.set_xlabel("owner-task accuracy / unprotected model's best merge")
    ax.set_ylabel("-log10 p (trigger set, exact binomial)")
    ax.set_title("Black-box trigger-set test, digits toy: stopped (left of green) or caught (above red)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    from tqdm.auto import tqdm

    from lightning_mergeguard.demos.digits import finetune_task, pretrain_backbone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (0 1 2)")
    args = parser.parse_args()
    start = time.perf_counter()
    backbone, heads = pretrain_backbone(epochs=10)
    shared = {
        "backbone": backbone,
        "heads": heads,
        "pre": {k: v.detach().clone() for k, v in backbone.state_dict().items()},
        "partners": {t: finetune_task(backbone, heads, t) for t in PARTNERS},
    }
    runs = [run_seed(seed, shared) for seed in tqdm(args.seeds, desc="trigger set", unit="seed")]
    res = {
        "command": "python benchmarks/trigger_set.py --seeds " + " ".join(map(str, args.seeds)),
        "environment": environment(),
        "baseline": "the unprotected fine-tune of the same seed: its best merge on the same grid (stopped = owner "
        "accuracy at most 0.5x that); negatives: models never given the secret labels",
        "alpha": ALPHA,
        "triggers": TRIGGERS,
        "seeds": runs,
        "seconds": time.perf_counter() - start,
    }
    write_results("trigger_set", res)
    text = report(res)
    (RESULTS / "trigger_set.md").write_text(text, encoding="utf-8")
    plot(res, RESULTS / "trigger_set.png")
    print(text)
    neg = min(n["p"] for r in runs for n in r["negatives"].values())
    for name in VARIANTS:
        cells = [c for r in runs for c in r["variants"][name]["cells"].values()]
        done = sum(classify(c) != "neither" for c in cells)
        loss = max(r["unprotected_own"] - r["variants"][name]["release_own"] for r in runs)
        print(f"headline ({name}): {done}/{len(cells)} merges stopped or caught by the black-box test, own accuracy "
              f"loss at most {loss:.1f} points; smallest negative p {neg:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()

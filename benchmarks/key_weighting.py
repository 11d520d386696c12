"""Key weighting: does weighing each keyed tensor by its signal to noise catch what the pooled key test misses?

The white-box key test (``lightning_mergeguard.ownership.weight_key``) sums every keyed weight's term alike
(``weighting="pooled"``, the published statistic and the baseline here). A repair or added noise can swamp some
tensors and leave others quiet; ``weighting="snr"`` weighs each tensor by the key signal it would carry over the
suspect's variance in it (floored at the release's own variance). Both are exact bounds under the same null.

On the vision track of ``benchmarks/stop_or_catch.py`` (the same cached build of a seed), ``verify_ownership`` with
each weighting on:

1. the release and every merge of the grid, as merged and with Gaussian noise 6x each tensor's task-vector RMS
   (the strongest noise ``stop_or_catch`` runs);
2. the release, the merges in ``stop_or_catch.ATTACKED`` and Model Stock (the cell ``stop_or_catch`` left open),
   repaired (10 and 50 AdamW steps on 64 owner images) and fine-tuned further (50 and 200 steps);
3. every negative of ``stop_or_catch`` (``negative_models``): the false-positive side.

The pooled p-values must reproduce the committed ``stop_or_catch`` cells of the seed (checked, the largest
difference reported). Stopped is judged against the committed unprotected best merge of the seed.

    python benchmarks/key_weighting.py --seeds 0 1          # about 11 minutes a seed on 2 CPU cores
    python benchmarks/key_weighting.py --seeds 1 --append   # add a seed to the committed results
    python benchmarks/key_weighting.py --report-only

Writes ``benchmarks/results/key_weighting.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import stop_or_catch as soc
from benchmarks._common import RESULTS, environment, markdown_table, save_png, write_results
from benchmarks._grid import grid_configs, layer_count

WEIGHTINGS = ("pooled", "snr")
NOISE = 6
EXTRA = ("Model Stock",)  # merges repaired here besides ATTACKED: the open cell of stop_or_catch


def run_seed(seed: int, bar, committed: dict[str, Any]) -> dict[str, Any]:
    """Both weightings' p-values on ``seed``'s cells and negatives; ``committed``: stop_or_catch's results of it."""
    from lightning_mergeguard.demos.vision_tasks import vit_task_accuracy
    from lightning_mergeguard.ownership.verify import verify_ownership

    t0 = time.perf_counter()
    b = soc.committed_build(committed)
    visual, heads, pre, key = b["visual"], b["heads"], b["pre"], b["key"]
    configs = grid_configs(soc.OWNER, list(b["partners"]), soc.LAMBDAS, layers=layer_count(pre))
    labels = list(configs) if soc.GRID is None else list(soc.GRID)
    attacked = [m for m in (*soc.ATTACKED, *EXTRA) if m in labels]

    def test(state) -> dict[str, Any]:
        out = {}
        for w in WEIGHTINGS:
            v = verify_ownership(state, pre, key, module=visual, alpha=soc.ALPHA, check_base=False, weighting=w)
            out[w] = {"p": v.p_value, "log10_p": v.log10_p}
        bar.update()
        return out

    cells: dict[str, dict[str, Any]] = {}

    def cell(label: str, how: str, state) -> None:
        owner = vit_task_accuracy(visual, heads, state, soc.OWNER)
        cells[f"{label} | {how}"] = {"merge": label, "attack": how, "owner": owner, **test(state)}

    noise = f"noise {NOISE}x task vector"
    grid = soc.grid_merges(configs, b["partners"], pre, b["release"], labels, owner_name=soc.OWNER)
    for label, merged in itertools.chain([("release alone", b["release"])], grid):
        cell(label, "as merged", merged)
        cell(label, noise, soc.noised(merged, pre, NOISE, seed))
        if label == "release alone" or label in attacked:
            for name, (steps, lr, examples) in soc.owner_training().items():
                for n, state in soc.train_on_owner(visual, heads, merged, steps, lr, examples).items():
                    cell(label, f"{name} {n}", state)
    negatives = {name: test(make()) for name, make in soc.negative_models(b, configs, labels)}
    best = committed["unprotected_best"]
    for c in cells.values():
        c["ratio"] = c["owner"] / best
    drift = [abs(c["pooled"]["log10_p"] - committed["cells"][k]["log10_p"]) for k, c in cells.items()
             if k in committed["cells"]]  # fmt: skip
    drift += [abs(n["pooled"]["log10_p"] - committed["negatives"][k]["log10_p"]) for k, n in negatives.items()
              if k in committed["negatives"]]  # fmt: skip
    return {
        "seed": seed,
        "unprotected_best": best,
        "pre_own": committed.get("pre_own"),
        "cells": cells,
        "negatives": negatives,
        "pooled_vs_committed": {"compared": len(drift), "largest_log10_p_difference": max(drift, default=None)},
        "seconds": time.perf_counter() - t0,
    }


def verdict(c: dict[str, Any], w: str) -> str:
    stopped, caught = c["ratio"] <= soc.STOP, c[w]["p"] <= soc.ALPHA
    return "stopped and caught" if stopped and caught else "stopped" if stopped else "caught" if caught else "neither"


def summary(res: dict[str, Any]) -> tuple[str, str]:
    """The per-seed and weighting counts, and every cell whose verdict the weighting changes."""
    rows, changed = [], []
    for run in res["seeds"]:
        for w in WEIGHTINGS:
            v = [verdict(c, w) for c in run["cells"].values()]
            uncaught = [c for c in run["cells"].values() if c[w]["p"] > soc.ALPHA]
            rows.append([
                run["seed"], w, len(v), sum("caught" in x for x in v), sum(x == "neither" for x in v),
                max(c[w]["log10_p"] for c in run["cells"].values()),
                "–" if not uncaught else f"{max(c['ratio'] for c in uncaught):.2f}",
                len(run["negatives"]), f"{min(n[w]['p'] for n in run['negatives'].values()):.3g}",
            ])  # fmt: skip
        for name, c in run["cells"].items():
            if verdict(c, "pooled") != verdict(c, "snr") or c["attack"].startswith(("repair", "removal")):
                changed.append([run["seed"], name, f"{c['owner']:.1f}", f"{c['ratio']:.2f}",
                                f"{c['pooled']['log10_p']:.1f}", f"{c['snr']['log10_p']:.1f}",
                                verdict(c, "pooled"), verdict(c, "snr")])  # fmt: skip
    headers = ["seed", "weighting", "cells", "caught (p ≤ 1e-3)", "neither", "largest log10 p of a cell",
               "best uncaught cell / unprotected best", "negatives", "smallest negative p"]  # fmt: skip
    detail = ["seed", "cell", "owner %", "/ unprotected best", "log10 p pooled", "log10 p snr", "pooled", "snr"]
    return markdown_table(headers, rows), markdown_table(detail, changed)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for run in res["seeds"]:
        for c in run["cells"].values():
            color = "C4" if c["attack"].startswith(("repair", "removal")) else "C1" if "noise" in c["attack"] else "C0"
            ax.scatter(-c["pooled"]["log10_p"], -c["snr"]["log10_p"], s=10, color=color, alpha=0.6)
        for n in run["negatives"].values():
            ax.scatter(-n["pooled"]["log10_p"], -n["snr"]["log10_p"], s=14, color="k", marker="x")
    for label, color in (("as merged", "C0"), (f"noise {NOISE}x", "C1"), ("repair / removal", "C4")):
        ax.scatter([], [], color=color, label=label)
    ax.scatter([], [], color="k", marker="x", label="negatives (never derived)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    lim = ax.get_xlim()[1], ax.get_ylim()[1]
    ax.plot([0, max(lim)], [0, max(lim)], color="0.5", lw=1, ls=":")
    ax.axhline(3, color="r", ls="--", lw=1)
    ax.axvline(3, color="r", ls="--", lw=1)
    ax.set_xlabel("-log10 p, pooled key test (published)")
    ax.set_ylabel("-log10 p, snr-weighted key test")
    ax.set_title("Key test weighting, vision track (dashed: p = 1e-3)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def report(res: dict[str, Any]) -> None:
    table, detail = summary(res)
    text = "#### Key test weighting: pooled (published) vs snr-weighted, vision track\n\n" + table + "\n\n"
    text += "Repaired and fine-tuned cells, and every cell whose verdict the weighting changes:\n\n" + detail + "\n"
    (RESULTS / "key_weighting.md").write_text(text, encoding="utf-8")
    plot(res, RESULTS / "key_weighting.png")
    print(text)
    for run in res["seeds"]:
        worst = max((c for c in run["cells"].values() if c["pooled"]["p"] > soc.ALPHA and c["ratio"] > soc.STOP),
                    key=lambda c: c["ratio"], default=None)  # fmt: skip
        if worst is not None:
            print(f"headline (seed {run['seed']}): the open cell {worst['merge']} | {worst['attack']}: log10 p "
                  f"{worst['pooled']['log10_p']:.2f} pooled -> {worst['snr']['log10_p']:.2f} snr "
                  f"({worst['snr']['log10_p'] / worst['pooled']['log10_p']:.1f}x)")  # fmt: skip
        neg = {w: min(n[w]["p"] for n in run["negatives"].values()) for w in WEIGHTINGS}
        print(f"headline (seed {run['seed']}): smallest negative p {neg['pooled']:.3g} pooled, {neg['snr']:.3g} snr")


def main() -> None:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds to run (0 1)")
    parser.add_argument("--append", action="store_true", help="add these seeds to the committed results file")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    soc.add_against(parser)
    args = parser.parse_args()
    path = RESULTS / "key_weighting.json"
    if args.report_only:
        report(json.loads(path.read_text()))
        return
    committed = soc.committed_seeds(args.seeds, args.against)
    old = json.loads(path.read_text()) if args.append and path.is_file() else None
    runs = {r["seed"]: r for r in (old or {}).get("seeds", [])}
    command = "python benchmarks/key_weighting.py --seeds " + " ".join(map(str, args.seeds)) + soc.against_flag(args)
    command = command if old is None else f"{old['command']}; {command} --append"
    start = time.perf_counter()
    with tqdm(desc="key weighting", unit="test") as bar:
        for seed in args.seeds:  # written after each seed
            runs[seed] = run_seed(seed, bar, committed[seed])
            res = {
                "command": command,
                "environment": environment(),
                "baseline": "weighting='pooled', the published key test, on the same models in the same run",
                "alpha": soc.ALPHA,
                "stop": soc.STOP,
                "seeds": [runs[k] for k in sorted(runs)],
                "seconds": time.perf_counter() - start + (old or {}).get("seconds", 0.0),
            }
            write_results("key_weighting", res)
    report(res)


if __name__ == "__main__":
    main()

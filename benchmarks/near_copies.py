"""How close to a copy of the owner's model must a merge stay to keep the owner's skill? About 10 minutes on 2 cores.

    python benchmarks/near_copies.py                 # both tracks of benchmarks/protection.py
    python benchmarks/near_copies.py --track vision

No protection that keeps the owner's function can stop the owner's model itself, so every merge family has a limit
where it becomes a copy. mergekit's NearSwap shows where: with the owner as base, it moves each weight by at most
``t`` towards a partner's (``t / |difference|`` of the way, clamped to 1). For the unprotected fine-tune and for the
fine-tune re-parameterised by ``amplify`` (scales up to 1000 and up to 2**20) with its residual stream permuted
(``permute_residual``; no stage 2 under them), this sweeps ``t`` from 1e-4 down to 1e-12, with a partner no defense
saw (the last task of the track), and measures the owner-task accuracy of each merge and the share of its weights that
are bit for bit the owner's. Baseline: the unprotected fine-tune merged the same way, same run.

Writes benchmarks/results/near_copies.{json,md,png}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import markdown_table, publish_tracks, save_png, track_axes
from tqdm.auto import tqdm

State = dict[str, torch.Tensor]
THRESHOLDS = (1e-4, 1e-6, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12)
STRENGTHS = {"amp-1000 + permuted stream": 1000.0, "amp-2^20 + permuted stream": 2.0**20}


def nearswap_sweep(
    owner: str,
    state: State,
    partner: str,
    partner_state: State,
    evaluate: Callable[[State], float],
    thresholds: Sequence[float] = THRESHOLDS,
    bar: Any = None,
) -> list[dict[str, float]]:
    """Per threshold ``t``: the owner-task score of NearSwap(owner, partner, t) and its weights equal to the owner's.

    Example:
        >>> own, other = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
        >>> rows = nearswap_sweep("o", own, "p", other, lambda s: 100 * float(s["w"][0]), [0.25])
        >>> rows[0]["owner"], rows[0]["same_as_owner"]
        (75.0, 0.0)
    """
    from lightning_mergeguard.merging import merge

    floats = [k for k, v in state.items() if v.is_floating_point()]
    total = sum(state[k].numel() for k in floats)
    rows = []
    for t in thresholds:
        cfg = {
            "merge_method": "nearswap",
            "base_model": owner,
            "models": [{"model": owner}, {"model": partner}],
            "parameters": {"t": t},
        }
        # Re-parameterised models look like another base on purpose: no base check.
        merged = merge(cfg, {owner: state, partner: partner_state}, None, seed=0, check_base=False)
        same = sum(int((merged[k] == state[k]).sum()) for k in floats)
        rows.append({"t": t, "owner": evaluate(merged), "same_as_owner": same / total})
        if bar is not None:
            bar.update()
    return rows


def run_track(track: Any, bar: Any) -> dict[str, Any]:
    """The sweep for the unprotected fine-tune and each re-parameterised variant of one track."""
    from protection import reparameterised

    owner = track.owner
    partner = [t for t in track.tasks if t != owner][-1]
    variants = {"unprotected": track.finetunes[owner]}
    variants.update({name: reparameterised(track, strength) for name, strength in STRENGTHS.items()})

    def evaluate(state: State) -> float:
        return track.grid_evaluate(state, [owner])[owner]

    out = {}
    for name, state in variants.items():
        bar.set_postfix_str(f"{track.name}: {name}")
        out[name] = {
            "own": evaluate(state),
            "sweep": nearswap_sweep(owner, state, partner, track.finetunes[partner], evaluate, bar=bar),
        }
    return {"owner": owner, "partner": partner, "variants": out, "notes": track.notes}


def table(name: str, res: dict[str, Any]) -> str:
    """Markdown: owner-task accuracy per threshold (and the share of weights equal to the owner's), per variant."""
    base = res["variants"]["unprotected"]
    header = ["model", "own (%)", *[f"t={r['t']:g}" for r in base["sweep"]]]
    rows = []
    for k, v in res["variants"].items():
        rows.append([k, v["own"], *[f"{r['owner']:.1f} ({100 * r['same_as_owner']:.0f}%)" for r in v["sweep"]]])
    return "\n".join(
        [
            f"#### {name} track: NearSwap of the owner `{res['owner']}` with `{res['partner']}` "
            "(owner-task accuracy %; in brackets, the share of the merge's weights bit for bit the owner's)",
            "",
            markdown_table(header, rows),
            "",
        ]
    )


def plot(results: dict[str, Any], path) -> None:
    """One panel per track: owner-task accuracy against t (log scale, copies to the right)."""
    fig, panels = track_axes(results, 6, 4)
    for ax, name, res in panels:
        for k, v in res["variants"].items():
            ax.plot([r["t"] for r in v["sweep"]], [r["owner"] for r in v["sweep"]], marker="o", label=k)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("NearSwap t: the most any weight moves towards the partner's")
        ax.set_ylabel(f"owner-task accuracy '{res['owner']}' (%)")
        ax.set_title(f"{name}: near copies of the owner's model")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def headline(name: str, res: dict[str, Any]) -> str:
    """The largest t at which each variant keeps at least half the unprotected model's score at that t."""
    base = {r["t"]: r["owner"] for r in res["variants"]["unprotected"]["sweep"]}
    parts = []
    for k, v in res["variants"].items():
        if k == "unprotected":
            continue
        kept = [r for r in v["sweep"] if r["owner"] >= 0.5 * base[r["t"]]]
        if kept:
            r = kept[0]
            parts.append(
                f"{k} keeps {r['owner']:.1f}% = {r['owner'] / max(base[r['t']], 1e-9):.2f}x the unprotected "
                f"{base[r['t']]:.1f}% first at t={r['t']:g} ({100 * r['same_as_owner']:.0f}% of weights the owner's)"
            )
        else:
            parts.append(f"{k} stays below 0.5x the unprotected merge down to t={v['sweep'][-1]['t']:g}")
    return f"HEADLINE {name}: " + "; ".join(parts)


def main() -> None:
    import protection

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--track", choices=["llm", "vision", "both"], default="both")
    args = parser.parse_args()
    names = protection.track_names(args.track)
    size = protection.SIZES["cpu"]
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with tqdm(total=len(names) * (1 + 3 * len(THRESHOLDS)), desc="near copies") as bar:
        for name in names:
            bar.set_postfix_str(f"{name}: setting up")
            track = protection.make_track(name, size)
            bar.update()
            results[name] = run_track(track, bar)
            results[name]["command"] = shlex.join(["python", *sys.argv])
    meta = {
        "baseline": "the unprotected fine-tune, merged the same way in the same run",
        "thresholds": list(THRESHOLDS),
        "seconds": time.perf_counter() - start,
    }
    publish_tracks("near_copies", meta, results, table, plot, headline)


if __name__ == "__main__":
    main()

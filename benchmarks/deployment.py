"""Does a protected release survive what its users do to it? About 40 minutes on 2 cores for both tracks.

    python benchmarks/deployment.py                 # both tracks of benchmarks/protection.py
    python benchmarks/deployment.py --track vision

Owners publish a model so that others run it: in fp16 or bf16, quantized (int8 per row, 4-bit groups, GGUF), or
fine-tuned further. For each setting below, the owner-task score of the released model under each treatment of
:mod:`lightning_mergeguard.protection.release.deployment` (fp16, bf16, int8-row, int4-g32, int4-g128, gguf-q8_0,
gguf-q4_0, 50 steps of full fine-tuning at lr 1e-5 and of rank-8 LoRA at lr 1e-4 on the owner's task), next to the
unprotected fine-tune under the same treatment (the baseline, same run). And, since a merge of the treated release
must not be an escape: the owner-task score of merges of the fp16 and int8 copies (uniform task arithmetic at 0.3, and
the owner at 1 with every partner at 0.1).

Settings: the unprotected fine-tune; the default protection (stage 1 + scale-adversarial stage 2, the callback's
defaults); and the re-parameterisations ``permute_residual`` alone, ``amplify=16`` with it (powers of two that stay
inside fp16's range), and ``amplify=2**20`` with it (the earlier README's first row), each on the fine-tune.

Writes benchmarks/results/deployment.{json,md,png}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import RESULTS, markdown_table, publish_tracks, save_png, track_axes
from tqdm.auto import tqdm

from lightning_mergeguard.errors import NonFiniteError
from lightning_mergeguard.quantization import QUANTIZERS, treated_state

State = dict[str, torch.Tensor]
FINETUNE_STEPS = 50
MERGED_TREATMENTS = ("none", "fp16", "int8-row")
TREATMENTS = ("none", *QUANTIZERS, "finetune", "finetune-lora")
BOUND = 1.0  # points of own score a recommended setting may lose to the unprotected model under any treatment


def variants(track: Any) -> dict[str, Callable[[], State]]:
    """The settings compared: ``name -> () -> released state``."""
    from protection import reparameterised

    from lightning_mergeguard.protection.release.residual import draw_permutation, permute_residual

    owner = track.finetunes[track.owner]
    return {
        "unprotected": lambda: owner,
        "default (stage 1 + scale-adversarial)": lambda: track.protect({"tolerance": 1.0})[0],
        "permuted stream alone": lambda: permute_residual(owner, track.stream, draw_permutation(track.stream.width)),
        "amp-16 + permuted stream": lambda: reparameterised(track, 16.0),
        "amp-2^20 + permuted stream": lambda: reparameterised(track, 2.0**20),
    }


def merged_scores(track: Any, state: State, evaluate: Callable[[State], float]) -> dict[str, float | None]:
    """Owner-task score of two merges of ``state`` with every partner (``None``: the treated state is not finite)."""
    from lightning_mergeguard.merging import merge

    others = [t for t in track.tasks if t != track.owner]
    states = {**{t: track.finetunes[t] for t in others}, track.owner: state}
    configs = {
        "TA λ=0.3": {t: 0.3 for t in states},
        "owner 1 + partners 0.1": {t: (1.0 if t == track.owner else 0.1) for t in states},
    }
    out: dict[str, float | None] = {}
    for label, weights in configs.items():
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": t, "parameters": {"weight": w}} for t, w in weights.items()],
        }
        try:  # re-parameterised releases look like another base on purpose: no base check
            out[label] = evaluate(merge(cfg, states, track.pre, seed=0, check_base=False))
        except NonFiniteError:
            out[label] = None
    return out


def run_track(track: Any, bar: Any) -> dict[str, Any]:
    """Every setting under every treatment, and merges of its treated copies."""
    owner = track.owner

    def evaluate(state: State) -> float:
        return track.grid_evaluate(state, [owner])[owner]

    out = {}
    for name, make in variants(track).items():
        bar.set_postfix_str(f"{track.name}: {name}")
        released = make()
        scores: dict[str, float] = {}
        merges: dict[str, dict[str, float | None]] = {}
        for t in TREATMENTS:
            if t == "none":
                treated = released
            elif t in QUANTIZERS:
                treated = treated_state(released, t)
            else:
                treated = track.finetune(released, FINETUNE_STEPS, t == "finetune-lora")
            finite = all(bool(torch.isfinite(v).all()) for v in treated.values() if v.is_floating_point())
            scores[t] = evaluate(treated) if finite else 0.0  # a non-finite model answers nothing
            if t in MERGED_TREATMENTS:
                merges[t] = merged_scores(track, treated, evaluate)
            bar.update()
        out[name] = {"scores": scores, "merges": merges}
    base = out["unprotected"]["scores"]
    for v in out.values():
        v["worst_loss"] = max(base[t] - v["scores"][t] for t in TREATMENTS)
        v["within_bound"] = v["worst_loss"] <= BOUND
    return {"owner": owner, "variants": out, "notes": track.notes}


def table(name: str, res: dict[str, Any]) -> str:
    """Markdown: own score per treatment per setting, then the merges of the treated copies."""
    header = ["setting", *TREATMENTS, "worst loss vs unprotected"]
    rows = [
        [k, *[f"{v['scores'][t]:.1f}" for t in TREATMENTS], f"{v['worst_loss']:+.1f}"]
        for k, v in res["variants"].items()
    ]
    merge_labels = list(next(iter(res["variants"].values()))["merges"]["none"])
    m_header = ["setting", *[f"{t}: {m}" for t in MERGED_TREATMENTS for m in merge_labels]]

    def cell(x: float | None) -> str:
        return "not finite" if x is None else f"{x:.1f}"

    m_rows = [
        [k, *[cell(v["merges"][t][m]) for t in MERGED_TREATMENTS for m in merge_labels]]
        for k, v in res["variants"].items()
    ]
    return "\n".join(
        [
            f"#### {name} track: owner-task score (%) of the release `{res['owner']}` under each treatment",
            "",
            markdown_table(header, rows),
            "",
            f"#### {name} track: owner-task score (%) of merges of the treated release with every partner",
            "",
            markdown_table(m_header, m_rows),
            "",
        ]
    )


def plot(results: dict[str, Any], path) -> None:
    """One panel per track: own score per treatment, one line per setting."""
    fig, panels = track_axes(results, 7, 4.5)
    for ax, name, res in panels:
        for k, v in res["variants"].items():
            ax.plot(range(len(TREATMENTS)), [v["scores"][t] for t in TREATMENTS], marker="o", label=k)
        ax.set_xticks(range(len(TREATMENTS)), TREATMENTS, rotation=35, ha="right")
        ax.set_ylabel(f"owner-task score '{res['owner']}' (%)")
        ax.set_title(f"{name}: the release under what users do to it")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_png(fig, path)


def headline(name: str, res: dict[str, Any]) -> str:
    """Each setting's worst own-score loss against the unprotected model under the same treatment."""
    parts = [
        f"{k}: worst {v['worst_loss']:+.1f} points ({'within' if v['within_bound'] else 'OUTSIDE'} {BOUND})"
        for k, v in res["variants"].items()
        if k != "unprotected"
    ]
    return f"HEADLINE {name} (vs the unprotected fine-tune, same treatment): " + "; ".join(parts)


def main() -> None:
    import protection

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--track", choices=["llm", "vision", "both"], default="both")
    args = parser.parse_args()
    names = protection.track_names(args.track)
    size = protection.SIZES["cpu"]
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with tqdm(total=len(names) * 5 * len(TREATMENTS), desc="deployment") as bar:
        for name in names:
            bar.set_postfix_str(f"{name}: setting up")
            track = protection.make_track(name, size)
            results[name] = run_track(track, bar)
            results[name]["command"] = shlex.join(["python", *sys.argv])
    previous = RESULTS / "deployment.json"
    if previous.is_file() and len(names) == 1:  # one track rerun: keep the other's committed figures
        import json

        kept = json.loads(previous.read_text()).get("tracks", {})
        results = {**{k: v for k, v in kept.items() if k not in results}, **results}
    meta = {
        "baseline": "the unprotected fine-tune under the same treatment, same run",
        "treatments": list(TREATMENTS),
        "finetune_steps": FINETUNE_STEPS,
        "bound_points": BOUND,
        "seconds": time.perf_counter() - start,
    }
    publish_tracks("deployment", meta, results, table, plot, headline)


if __name__ == "__main__":
    main()

"""The model-card paragraph of a protected release, from its report."""

from __future__ import annotations

import math
from typing import Any

from lightning_mergeguard.protection.stage2 import KeepWeights
from lightning_mergeguard.protection.verdict import deployed_sentence, key_paragraph

__all__ = ["model_card"]


def _proxy_words(s2: dict[str, Any]) -> str:
    """What the guard rail's merge proxy was, in words, for the strategy that ran."""
    settings = s2["settings"]
    if settings["method"] == "merge_neighbourhood":
        weights = ", ".join(f"{a:g}/{b:g}" for a, b in settings["proxies"])
        who = ", ".join(s2.get("partners", [])) or "the rehearsed partners"
        return f"the best owner-task score of task arithmetic with {who} at owner/partner weights {weights}"
    return f"the score of the scaled copy theta_pre + {s2.get('merge_proxy_scale')} * tau that merges apply"


def model_card(report: dict[str, Any]) -> str:
    """A README / model-card paragraph stating what was done and the measured numbers."""
    s2 = report["stage2"]
    settings = s2["settings"]
    drop = report["score_before"] - report["score_after"]
    alone = settings["method"] == KeepWeights.name
    amp = report.get("amplify")
    if alone and not (amp and amp.get("applied")):
        done = "with no stage-2 perturbation, and the re-parameterisation asked for was not applied: NOT protected."
    elif alone:
        done = "by the re-parameterisation below alone (no stage-2 perturbation of its weights)."
    else:
        done = (
            f"(stage 2: {settings['method']}, {settings.get('steps')} steps"
            + (", after a short stage-1 re-fit" if report["refit"] else "")
            + f"). Its own score on held-out rows of the owner's data went from {report['score_before']:.1f} to "
            f"{report['score_after']:.1f} ({-drop:+.1f} points; tolerance {report['tolerance']} points). The merge "
            f"proxy ({_proxy_words(s2)}) went from {s2.get('merge_proxy_before', math.nan):.1f} to "
            f"{s2.get('merge_proxy_after', math.nan):.1f}."
        )
    lines = ["## Merge protection (lightning-mergeguard)", ""]
    if report.get("protected") is False:
        lines += [
            f"**NOT protected.** `mergeguard-protect` ran on this model, and {report['not_protected']}.",
            "",
            f"What it tried: {done}",
            "",
        ]
    else:
        lines += [
            f"This model was protected against unauthorized merging after training with `mergeguard-protect` {done}",
            *deployed_sentence(s2)[1:],
            "",
        ]
    if report.get("dtype"):
        lines += [f"Weights written as {report['dtype']}.", ""]
    lines += key_paragraph(report)[1:] + ([""] if report.get("ownership_key") else [])
    if amp and amp.get("applied"):
        left_out = f"; left out after the forward check: {', '.join(amp['dropped'])}" if amp.get("dropped") else ""
        lines += [
            "**Deploy with care: these weights are re-parameterised, which is not a recommended setting.** Any other "
            "fine-tune of the same base undoes it by re-alignment"
            + (" (giving the unprotected fine-tune back)" if alone else "")
            + ", and amplified releases do not survive deployment: measured on SmolLM2, scales up to 16 score 0% "
            "under 4-bit quantization, and up to 2**20 score 0% in float16, int8 and after 50 fine-tuning steps "
            f"(lightning-mergeguard's benchmarks/results/deployment.md). The symmetries: per-channel power-of-two "
            f"scales up to {amp['strength']:g} on {amp['channels']} channels{left_out}; the model computes the same "
            f"function (score {amp['score_before']:.1f} -> {amp['score_after']:.1f}) in float32 and bfloat16, but "
            "merges run without re-alignment see partners' updates magnified.",
            "",
        ]
        residual = amp.get("residual") or {}
        if residual.get("applied"):
            lines += [
                f"The {residual['width']} channels of its residual stream were also permuted (the same function, "
                "up to rounding), so merges that take whole layers from it mix mismatched channels; matching the "
                "embeddings to the base model undoes this too.",
                "",
            ]
    elif amp:
        why = amp.get("skipped") or "it moved the score, so the weights were put back"
        lines += [f"Amplifying symmetries were requested and not applied: {why}.", ""]
    deployment = report.get("deployment")
    if deployment:
        worst = max(v["unprotected"] - v["protected"] for v in deployment.values())
        lines += [
            f"Deployed as users deploy it, its own score stays within {max(worst, 0.0):.1f} points of the unprotected "
            "model's under the same treatment:",
            "",
            "| treatment | own score, unprotected | protected |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['unprotected']:.1f} | {v['protected']:.1f} |" for k, v in deployment.items()]
        lines.append("")
    merges = report.get("merges")
    if merges:
        lines += ["| merge | owner-task score, unprotected | protected |", "|---|---|---|"]
        lines += [f"| {k} | {v['unprotected']:.1f} | {v['protected']:.1f} |" for k, v in merges.items()]
        lines.append("")
    return "\n".join(lines)

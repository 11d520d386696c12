"""The main demo: protect a fine-tune with MergeGuard and watch merge resistance with MergeProbe.

    make demo            # or: .venv/bin/python examples/demo.py

A small real setting that runs on a laptop CPU in about a minute: four tasks built from scikit-learn's digits
(plain, rotated, transposed, inverted) share an MLP backbone. After a light joint pre-training (theta_pre), three
donors are fine-tuned as usual. The owner's task ("plain") is then fine-tuned twice, without and with
``MergeGuardCallback``; in both runs ``MergeProbe`` merges the live backbone with the three donors every epoch and
once more at the end, and logs the results to a CSV log. The demo prints a table and writes two PNGs to runs/demo/.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, MergeProbe
from lightning_mergeguard.plotting import plot_merge_resistance
from lightning_mergeguard.toy import TASKS, DigitsTaskModule, HeadScore, digits_task_data, pretrain_backbone

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


def fit(backbone, heads, task, callbacks=(), logger=False, epochs=5):
    pl.seed_everything(1, verbose=False)
    module = DigitsTaskModule(copy.deepcopy(backbone), heads, task)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, loader(task, "train", shuffle=True), loader(task, "val"))
    return module


def probe(donors):
    return MergeProbe(
        donors=donors,
        methods=METHODS,
        coefficients=[0.3],
        include=[r"^backbone\."],
        eval_dataloaders={"own": loader(OWNER, "test"), **{t: (loader(t, "test"), HeadScore(t)) for t in donors}},
        eval_batches=None,
        every_n_epochs=1,
        progress=False,
    )


def main() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    print("1/4 joint pre-training of the shared backbone (theta_pre) ...")
    backbone, heads = pretrain_backbone(epochs=10)
    print("2/4 fine-tuning three donors (rot90, transpose, invert) ...")
    donors = {t: fit(backbone, heads, t).backbone.state_dict() for t in TASKS if t != OWNER}
    print("3/4 fine-tuning the owner's task without protection, probing merges every epoch ...")
    plain_probe = probe(donors)
    plain_logger = CSVLogger(OUT, name="unprotected", version=0)
    fit(backbone, heads, OWNER, [plain_probe], plain_logger)
    print("4/4 fine-tuning the owner's task with MergeGuardCallback (stage 2 at the end), probing merges ...")
    guard = MergeGuardCallback(
        include=[r"^backbone\."], report_path=str(OUT / "protection_report.json"), progress=False
    )
    guarded_probe = probe(donors)
    guarded_logger = CSVLogger(OUT, name="protected", version=0)
    fit(backbone, heads, OWNER, [guard, guarded_probe], guarded_logger)  # the probe runs after the guard

    before, after = plain_probe.results[-1], guarded_probe.results[-1]
    labels = [s.label for s in guarded_probe.specs]
    print()
    print(f"Owner's task ({OWNER!r}) test accuracy, merged with the three donors (coefficient 0.3):")
    print(f"| {'':18} | {'unprotected':>11} | {'protected':>9} | {'change':>7} |")
    print(f"|{'-' * 20}|{'-' * 13}|{'-' * 11}|{'-' * 9}|")
    own_b, own_a = before["mergeprobe/own/individual_acc"], after["mergeprobe/own/individual_acc"]
    print(f"| {'model alone':18} | {own_b:11.1f} | {own_a:9.1f} | {own_a - own_b:+7.1f} |")
    for label in labels:
        b, a = before[f"mergeprobe/{label}/own/acc"], after[f"mergeprobe/{label}/own/acc"]
        print(f"| {label:18} | {b:11.1f} | {a:9.1f} | {a - b:+7.1f} |")
    print("(chance is 10%; donors' own tasks in the merged model are logged under mergeprobe/<merge>/<task>/acc)")
    for name, lg in (("unprotected", plain_logger), ("protected", guarded_logger)):
        png = plot_merge_resistance(
            Path(lg.log_dir) / "metrics.csv",
            OUT / f"merge_resistance_{name}.png",
            title=f"Owner's task accuracy in merges during fine-tuning ({name})",
        )
        print(f"plot: {png}")
    print(f"protection report: {OUT / 'protection_report.json'}; CSV logs under {OUT}/")


if __name__ == "__main__":
    main()

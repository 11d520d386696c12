"""Fine-tune an open_clip ViT image tower with MergeGuard, in a few lines.

    .venv/bin/python examples/finetune_open_clip.py                       # tiny ViT, no weights needed
    .venv/bin/python examples/finetune_open_clip.py --model ViT-B-32 --checkpoint /path/to/open_clip.pt

No pretrained CLIP weights can be downloaded in this environment: without --checkpoint the tower starts from random
weights (the tiny default trains in about a minute on a CPU). With a local checkpoint the same code protects a
real ViT. Data: scikit-learn digits rendered as 32x32 images.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial
from lightning_mergeguard.demos.digits import digits_task_data
from lightning_mergeguard.demos.open_clip import ClipImageClassifier, build_open_clip
from lightning_mergeguard.evaluation import evaluate


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or an open_clip config name")
    parser.add_argument("--checkpoint", default=None, help="local open_clip checkpoint")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument(
        "--amplify",
        type=float,
        default=None,
        help="after stage 2, amplifying symmetries with scales up to this (e.g. 1000)",
    )
    parser.add_argument("--out", default="runs/open_clip")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    clip = build_open_clip(args.model, args.checkpoint)
    module = ClipImageClassifier(clip.visual, clip.visual.output_dim, lr=1e-3)
    guard = MergeGuardCallback(
        include=[r"^visual\."],  # protect the image tower; the head stays the owner's
        stage2=ScaleAdversarial(steps=args.stage2_steps),
        report_path=f"{args.out}/protection_report.json",
        amplify=args.amplify,
        save_path=f"{args.out}/protected.safetensors",
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=args.out,
    )
    train = DataLoader(digits_task_data("plain", "train"), batch_size=32, shuffle=True)
    val = DataLoader(digits_task_data("plain", "val"), batch_size=256)
    trainer.fit(module, train, val)

    test_acc = 100 * evaluate(module, DataLoader(digits_task_data("plain", "test"), batch_size=256))
    report = guard.report or {}
    print(f"own test accuracy after protection: {test_acc:.1f}%")
    nan = float("nan")
    print(f"stage 2: val score {report.get('score_before', nan):.1f} -> {report.get('score_after', nan):.1f}")
    print(f"merge proxy {report.get('merge_proxy_before', nan):.1f} -> {report.get('merge_proxy_after', nan):.1f}")
    return {"test_acc": test_acc, **{k: v for k, v in report.items() if isinstance(v, float)}}


if __name__ == "__main__":
    main()

"""Fine-tune an open_clip ViT image tower with MergeGuard, in a few lines.

    .venv/bin/python examples/finetune_open_clip.py                       # tiny ViT, no weights needed
    .venv/bin/python examples/finetune_open_clip.py --model ViT-B-32 --checkpoint /path/to/open_clip.pt

No pretrained CLIP weights can be downloaded in this environment: without --checkpoint the tower starts from random
weights (the tiny default trains in about a minute on a CPU). With a local checkpoint the same code protects a
real ViT. Data: scikit-learn digits, resized to the tower's input size; ``--data FOLDER`` takes your images instead
(one sub-folder per class, read with open_clip's preprocessing at the tower's size; a quarter is held out to judge
the guard rail and score the result).

    .venv/bin/python examples/finetune_open_clip.py --model ViT-B-32 --checkpoint clip.pt --data my_images/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, ParameterSelection, Release, ScaleAdversarial
from lightning_mergeguard.demos.digits import digits_task_data
from lightning_mergeguard.evaluation import evaluate
from lightning_mergeguard.models.open_clip import ClipImageClassifier, build_open_clip, image_transform
from lightning_mergeguard.models.trainer import default_precision
from lightning_mergeguard.posthoc import image_data


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or an open_clip config name")
    parser.add_argument("--checkpoint", default=None, help="local open_clip checkpoint")
    parser.add_argument("--data", default=None, help="an image folder, one sub-folder per class (default: digits)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument(
        "--amplify",
        type=float,
        default=None,
        help="after stage 2, amplifying symmetries with scales up to this (e.g. 1048576, 2**20; fp32/bf16 only)",
    )
    parser.add_argument(
        "--permute-residual", action="store_true", help="with --amplify: also permute the residual stream"
    )
    parser.add_argument(
        "--no-stage2",
        action="store_true",
        help="with --amplify: no stage-2 perturbation, the re-parameterisation alone (own score unchanged)",
    )
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on a GPU)")
    parser.add_argument("--out", default="runs/open_clip")
    args = parser.parse_args(argv)
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data {args.data!r}: expected an image folder with one sub-folder per class")
    if (args.permute_residual or args.no_stage2) and args.amplify is None:
        parser.error("--permute-residual and --no-stage2 need --amplify")

    pl.seed_everything(0, verbose=False)
    clip = build_open_clip(args.model, args.checkpoint)
    if args.data is None:
        train_set, val_set = digits_task_data("plain", "train"), digits_task_data("plain", "val")
        test_set, classes = digits_task_data("plain", "test"), 10
    else:  # the held-out quarter judges the guard rail and scores the result
        train_set, val_set = image_data(args.data, seed=0, transform=image_transform(clip.visual))
        test_set, classes = val_set, len(train_set.dataset.classes)
    module = ClipImageClassifier(clip.visual, clip.visual.output_dim, num_classes=classes, lr=1e-3)
    guard = MergeGuardCallback(
        parameters=ParameterSelection(include=r"^visual\."),  # the image tower; the head stays the owner's
        stage2="none" if args.no_stage2 else ScaleAdversarial(steps=args.stage2_steps),
        report_path=f"{args.out}/protection_report.json",
        release=Release(amplify=args.amplify, permute_residual=args.permute_residual),
        save_path=f"{args.out}/protected.safetensors",
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        precision=args.precision or default_precision(),
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=args.out,
    )
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    trainer.fit(module, train, DataLoader(val_set, batch_size=256))

    test_acc = 100 * evaluate(module, DataLoader(test_set, batch_size=256))
    report = guard.report or {}
    print(f"own test accuracy after protection: {test_acc:.1f}%")
    nan = float("nan")
    print(f"stage 2: val score {report.get('score_before', nan):.1f} -> {report.get('score_after', nan):.1f}")
    print(f"merge proxy {report.get('merge_proxy_before', nan):.1f} -> {report.get('merge_proxy_after', nan):.1f}")
    return {"test_acc": test_acc, **{k: v for k, v in report.items() if isinstance(v, float)}}


if __name__ == "__main__":
    main()

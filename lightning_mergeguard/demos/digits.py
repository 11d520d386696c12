"""A small, real, fast setting for tests, the demo and benchmarks: multi-task sklearn digits.

Four tasks share a backbone: the 8x8 digit images as they are, rotated by 90 degrees, transposed and inverted.
A light joint pre-training gives ``theta_pre`` and one frozen head per task; each task is then fine-tuned alone
(backbone only), and the fine-tuned backbones are merged. Everything runs on a CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from lightning_mergeguard.models.classifier import ClassifierModule
from lightning_mergeguard.models.extras import require
from lightning_mergeguard.models.trainer import quiet_trainer

__all__ = [
    "TASKS",
    "DigitsTaskModule",
    "HeadScore",
    "MLPBackbone",
    "digits_task_data",
    "finetune_task",
    "pretrain_backbone",
    "task_accuracy",
]

TASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "plain": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
    "invert": lambda x: 1.0 - x,
}


def digits_task_data(task: str, split: str, seed: int = 0) -> TensorDataset:
    """The digits of one task and split (``train`` 60%, ``val`` 20%, ``test`` 20%; a fixed shuffle).

    Example:
        >>> len(digits_task_data("plain", "test"))
        360
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    load_digits = require("sklearn.datasets", "bench", "the digits demo").load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = TASKS[task](x[perm]).reshape(len(y), -1).contiguous(), y[perm]
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(y))}
    if split not in bounds:
        raise ValueError(f"unknown split {split!r}")
    a, b = bounds[split]
    return TensorDataset(x[a:b], y[a:b])


class MLPBackbone(nn.Sequential):
    """``depth`` Linear+GELU layers of width ``width`` on flattened 8x8 images."""

    def __init__(self, width: int = 128, depth: int = 5, in_features: int = 64) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.GELU()]
        super().__init__(*layers)


class DigitsTaskModule(ClassifierModule):
    """Backbone + a frozen task head, fine-tuned on one digits task (or pre-trained jointly when ``task=None``).

    Args:
        backbone: The shared backbone (its state is the thing being protected and merged).
        heads: One ``nn.Linear(width, 10)`` per task (kept frozen when fine-tuning one task).
        task: The task fine-tuned; ``None`` trains backbone and all heads jointly on every task.
        lr: Adam learning rate.
    """

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict, task: str | None, lr: float = 1e-3) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.task = task
        self.lr = lr
        if task is not None:
            for p in self.heads.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the fine-tuned task."""
        return self.heads[self.task or "plain"](self.backbone(x))

    def loss(self, batch) -> Tensor:
        """One task's cross-entropy, or the sum over tasks of a joint (pre-training) batch."""
        if self.task is None:
            return sum(F.cross_entropy(self.heads[t](self.backbone(x)), y) for t, (x, y) in batch.items())
        return super().loss(batch)


def pretrain_backbone(epochs: int = 3, seed: int = 0, width: int = 128, depth: int = 5):
    """Light joint pre-training on all tasks: returns ``(backbone, heads)``, the shared starting point."""
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    pl.seed_everything(seed, verbose=False)
    backbone = MLPBackbone(width, depth)
    heads = nn.ModuleDict({t: nn.Linear(width, 10) for t in TASKS})
    module = DigitsTaskModule(backbone, heads, task=None)
    loaders = {t: DataLoader(digits_task_data(t, "train", seed), batch_size=64, shuffle=True) for t in TASKS}
    quiet_trainer(max_epochs=epochs).fit(module, CombinedLoader(loaders, "max_size_cycle"))
    return backbone, heads


class HeadScore:
    """Score function for the probe: accuracy of ``task``'s head on the shared backbone (picklable)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def __call__(self, module: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        """``(correct, count)`` for one batch."""
        x, y = batch
        logits = module.heads[self.task](module.backbone(x))
        return (logits.argmax(-1) == y).sum(), len(y)


def finetune_task(
    backbone: nn.Module,
    heads: nn.ModuleDict,
    task: str,
    callbacks: list | None = None,
    epochs: int = 5,
    seed: int = 1,
    logger: Any = False,
    extra: Dataset | None = None,
) -> dict[str, Tensor]:
    """Fine-tune a copy of ``backbone`` on ``task`` (its head frozen); return the backbone's state dict.

    ``extra``: more ``(image, label)`` pairs trained with the task's (a trigger set's, say).
    """
    import copy

    pl.seed_everything(seed, verbose=False)
    module = DigitsTaskModule(copy.deepcopy(backbone), heads, task)
    train = digits_task_data(task, "train")
    quiet_trainer(max_epochs=epochs, callbacks=callbacks or [], logger=logger).fit(
        module,
        DataLoader(train if extra is None else ConcatDataset([train, extra]), batch_size=32, shuffle=True),
        DataLoader(digits_task_data(task, "val"), batch_size=256),
    )
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def task_accuracy(backbone: nn.Module, heads: nn.ModuleDict, state: dict[str, Tensor], task: str) -> float:
    """Test accuracy (percent) of ``task``'s head on a backbone with weights ``state``."""
    import copy

    from lightning_mergeguard.evaluation import evaluate

    module = DigitsTaskModule(copy.deepcopy(backbone), heads, task)
    module.backbone.load_state_dict(state)
    return 100 * evaluate(module, DataLoader(digits_task_data(task, "test"), batch_size=512))

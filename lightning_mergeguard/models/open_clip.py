"""open_clip support: build a (tiny or named) CLIP model, load a local checkpoint, classify with its image tower."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mergeguard.models.classifier import ClassifierModule
from lightning_mergeguard.models.extras import require

__all__ = [
    "SMALL_VIT",
    "TINY_VIT",
    "ClipImageClassifier",
    "build_open_clip",
    "digits_as_images",
    "image_size",
    "image_transform",
]

TINY_VIT: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 32, "heads": 2, "layers": 1},
}
"""A 4-block ViT (about 0.3M image-tower parameters) for CPU tests and demos; no pretrained weights exist here."""

SMALL_VIT: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 6, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 32, "heads": 2, "layers": 1},
}
"""A 6-block open_clip ViT (patch 8 on 32x32 images, width 128; about 0.8M image-tower parameters)."""


def _config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"open_clip model config not found: {path}")
    with open(path) as f:
        cfg = yaml.safe_load(f)  # JSON is YAML
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg:
        raise ValueError(f"{path}: an open_clip model config needs a mapping with 'vision_cfg' (and 'embed_dim')")
    allowed = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "init_logit_scale"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown open_clip config keys {unknown}; expected some of {sorted(allowed)}")
    return cfg


def build_open_clip(
    model: str | dict[str, Any] = "tiny", checkpoint: str | os.PathLike[str] | None = None
) -> nn.Module:
    """Build an open_clip CLIP model without downloading anything.

    Args:
        model: ``"tiny"`` (:data:`TINY_VIT`), ``"small"`` (the benchmarks' ViT,
            :data:`SMALL_VIT`), an open_clip config name (``"ViT-B-32"``,
            ``"ViT-L-14"``...), a dict of ``open_clip.CLIP`` keyword arguments, or the path of a JSON/YAML file
            holding such a dict (open_clip's own model-config files work: their ``embed_dim``, ``vision_cfg`` and
            ``text_cfg``).
        checkpoint: Optional local checkpoint (open_clip's ``.pt``/``.bin``/``.safetensors`` state dict), loaded
            with ``weights_only=True``.

    Returns:
        The CLIP model (``model.visual`` is the image tower).

    Example:
        >>> clip = build_open_clip("tiny")
        >>> clip.visual(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 64])
    """
    open_clip = require("open_clip", "vision", "open_clip models")

    if isinstance(model, (str, os.PathLike)) and str(model).endswith((".json", ".yaml", ".yml")):
        model = _config_file(model)
    if model == "small":
        model = SMALL_VIT
    if isinstance(model, dict) or model == "tiny":
        clip = open_clip.CLIP(**(TINY_VIT if model == "tiny" else model))
    else:
        clip = open_clip.create_model(model, pretrained=None)
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
        open_clip.load_checkpoint(clip, str(checkpoint), strict=True, weights_only=True)
    return clip


def image_size(visual: nn.Module) -> int:
    """The square input size an open_clip image tower was built for (``visual.image_size``; 32 if it has none).

    Example:
        >>> image_size(build_open_clip("tiny").visual)
        32
    """
    size = getattr(visual, "image_size", 32)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip image tower with non-square input {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def image_transform(visual: nn.Module) -> Any:
    """open_clip's own evaluation preprocessing for ``visual``: resize, centre crop to its size, RGB, normalise.

    The mean and std are the tower's ``preprocess_cfg`` (set by ``open_clip.create_model``), else CLIP's. Images of
    any size and aspect ratio become ``[3, size, size]`` tensors, so a folder of mixed images batches.

    Example:
        >>> from PIL import Image
        >>> image_transform(build_open_clip("tiny").visual)(Image.new("L", (50, 20))).shape
        torch.Size([3, 32, 32])
    """
    open_clip = require("open_clip", "vision", "open_clip models")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)
    return open_clip.image_transform(image_size(visual), is_train=False, mean=mean, std=std)


def digits_as_images(x: Tensor, size: int = 32) -> Tensor:
    """Flattened 8x8 digits (``[N, 64]`` in 0..1) as normalised ``[N, 3, size, size]`` images."""
    img = x.reshape(-1, 1, 8, 8)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    return ((img - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


class ClipImageClassifier(ClassifierModule):
    """An open_clip image tower with a linear head, fine-tuned on flattened digit images.

    Args:
        visual: ``clip.visual``.
        embed_dim: Output width of the tower.
        num_classes: Classes of the head.
        lr: AdamW learning rate.
        freeze_head: Keep the head fixed (the usual multi-task merging setup: each task has its own head).
    """

    def __init__(
        self, visual: nn.Module, embed_dim: int, num_classes: int = 10, lr: float = 1e-3, freeze_head: bool = False
    ) -> None:
        super().__init__()
        self.visual = visual
        self.image_size = image_size(visual)  # flattened digits are resized to what the tower was built for
        self.head = nn.Linear(embed_dim, num_classes)
        self.lr = lr
        self.optimizer_cls = torch.optim.AdamW
        if freeze_head:
            self.head.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for flattened 8x8 digits or ready images."""
        if x.dim() == 2:
            x = digits_as_images(x, self.image_size)
        return self.head(self.visual(x))

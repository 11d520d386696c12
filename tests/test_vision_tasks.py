"""The wheel-only image setting: data, pretext pre-training, frozen heads, tower fine-tuning (tiny ViT)."""

from __future__ import annotations

import pytest
import torch

from lightning_mergeguard.demos.vision_tasks import (
    PRETEXT_TASKS,
    VISION_TASKS,
    finetune_vit_task,
    fit_task_heads,
    image_task_data,
    pretrain_vit,
    vit_task_accuracy,
)


def test_task_data_shapes_labels_and_transforms():
    plain = image_task_data("mnist", "test")
    rot = image_task_data("mnist_rot90", "test")
    inv = image_task_data("mnist_invert", "test")
    assert len(plain) == len(rot) == 1500 and plain[0][0].shape == (3, 32, 32)
    assert torch.equal(plain.tensors[1], rot.tensors[1])  # same images, same labels, transformed
    torch.testing.assert_close(plain.tensors[0] + inv.tensors[0], torch.zeros_like(inv.tensors[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.rot90(plain.tensors[0], 1, dims=(-2, -1)), rot.tensors[0], atol=1e-5, rtol=0)
    sizes = {s: len(image_task_data("digits", s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    train_ids = {img.numpy().tobytes() for img in image_task_data("mnist", "train").tensors[0]}
    assert not train_ids & {img.numpy().tobytes() for img in plain.tensors[0]}  # splits are disjoint
    rotation = image_task_data("mnist_rotation", "val")
    assert rotation.tensors[1][:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        image_task_data("cifar", "test")
    with pytest.raises(ValueError, match="unknown split"):
        image_task_data("mnist", "dev")


@pytest.mark.slow
def test_pretext_pretraining_heads_and_finetuning_improve_the_task():
    visual = pretrain_vit("tiny", epochs=1)
    heads = fit_task_heads(visual, ["mnist_invert"], epochs=50)
    pre = vit_task_accuracy(visual, heads, None, "mnist_invert")
    assert pre > 20  # pretext features carry digit information (chance is 10)
    state = finetune_vit_task(visual, heads, "mnist_invert", epochs=1)
    after = vit_task_accuracy(visual, heads, state, "mnist_invert")
    assert after > pre + 5
    assert not heads["mnist_invert"].weight.requires_grad
    assert set(PRETEXT_TASKS) and set(VISION_TASKS) == {"mnist", "mnist_rot90", "mnist_invert", "mnist_hflip", "digits"}

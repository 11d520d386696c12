"""End to end on a small real setting: four sklearn-digits tasks sharing an MLP backbone (see lightning_mergeguard.toy).

Numbers asserted: the protected model keeps its own accuracy within 1.5 points of the unprotected fine-tune, and
its task-arithmetic merge (lambda 0.3, four tasks) loses at least 30 points on the protected task.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback
from lightning_mergeguard.merging import merge
from lightning_mergeguard.protection.evaluation import evaluate
from lightning_mergeguard.toy import TASKS, DigitsTaskModule, digits_task_data, pretrain_backbone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting():
    backbone, heads = pretrain_backbone(epochs=10)
    return backbone, heads, copy.deepcopy(backbone.state_dict())


def finetune(setting, task, callbacks=()):
    backbone, heads, _ = setting
    pl.seed_everything(1, verbose=False)
    module = DigitsTaskModule(copy.deepcopy(backbone), heads, task)
    trainer = pl.Trainer(
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=list(callbacks),
    )
    trainer.fit(
        module,
        DataLoader(digits_task_data(task, "train"), batch_size=32, shuffle=True),
        DataLoader(digits_task_data(task, "val"), batch_size=256),
    )
    return copy.deepcopy(module.backbone.state_dict())


def accuracy(setting, state, task):
    backbone, heads, _ = setting
    module = DigitsTaskModule(copy.deepcopy(backbone), heads, task)
    module.backbone.load_state_dict(state)
    return 100 * evaluate(module, DataLoader(digits_task_data(task, "test"), batch_size=512))


def task_arithmetic(setting, states):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "pre",
        "models": [{"model": t, "parameters": {"weight": 1.0}} for t in states],
        "parameters": {"lambda": 0.3},
    }
    return merge(cfg, states, setting[2])


def test_protection_keeps_own_accuracy_and_breaks_the_merge(setting, tmp_path):
    finetunes = {t: finetune(setting, t) for t in TASKS}
    guard = MergeGuardCallback(progress=False, report_path=str(tmp_path / "report.json"))
    protected = finetune(setting, "plain", [guard])

    own_unprotected = accuracy(setting, finetunes["plain"], "plain")
    own_protected = accuracy(setting, protected, "plain")
    merged_unprotected = accuracy(setting, task_arithmetic(setting, finetunes), "plain")
    merged_protected = accuracy(setting, task_arithmetic(setting, {**finetunes, "plain": protected}), "plain")
    print(
        f"own {own_unprotected:.1f} -> {own_protected:.1f}; merged {merged_unprotected:.1f} -> {merged_protected:.1f}"
    )

    assert own_protected >= own_unprotected - 1.5
    assert merged_protected <= merged_unprotected - 30
    assert (tmp_path / "report.json").is_file()

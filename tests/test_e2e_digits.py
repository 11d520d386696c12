"""End to end on a small real setting: four sklearn-digits tasks sharing an MLP backbone (demos.digits).

Numbers asserted: the protected model keeps its own accuracy within 1.5 points of the unprotected fine-tune, and
its task-arithmetic merge (lambda 0.3, four tasks) loses at least 30 points on the protected task.
"""

from __future__ import annotations

import pytest

from lightning_mergeguard import MergeGuardCallback
from lightning_mergeguard.demos.digits import TASKS, finetune_task, pretrain_backbone, task_accuracy
from lightning_mergeguard.merging import merge

pytestmark = pytest.mark.slow


def task_arithmetic(pre, states):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "pre",
        "models": [{"model": t, "parameters": {"weight": 1.0}} for t in states],
        "parameters": {"lambda": 0.3},
    }
    return merge(cfg, states, pre)


def test_protection_keeps_own_accuracy_and_breaks_the_merge(tmp_path):
    backbone, heads = pretrain_backbone(epochs=10)
    pre = {k: v.clone() for k, v in backbone.state_dict().items()}
    finetunes = {t: finetune_task(backbone, heads, t) for t in TASKS}
    guard = MergeGuardCallback(progress=False, report_path=str(tmp_path / "report.json"))
    protected = finetune_task(backbone, heads, "plain", [guard])

    own_unprotected = task_accuracy(backbone, heads, finetunes["plain"], "plain")
    own_protected = task_accuracy(backbone, heads, protected, "plain")
    merged_unprotected = task_accuracy(backbone, heads, task_arithmetic(pre, finetunes), "plain")
    merged_protected = task_accuracy(backbone, heads, task_arithmetic(pre, {**finetunes, "plain": protected}), "plain")
    print(
        f"own {own_unprotected:.1f} -> {own_protected:.1f}; merged {merged_unprotected:.1f} -> {merged_protected:.1f}"
    )

    assert own_protected >= own_unprotected - 1.5
    assert merged_protected <= merged_unprotected - 30
    assert (tmp_path / "report.json").is_file()

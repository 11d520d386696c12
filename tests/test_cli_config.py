"""Callbacks declared in a LightningCLI YAML config."""

from __future__ import annotations

import pytest
from _helpers import TinyClassifier

pytest.importorskip("jsonargparse")

TRAINER = """
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
"""


def run_cli(tmp_path, callbacks_yaml: str):
    """LightningCLI ``fit`` of TinyClassifier with the trainer above and these callbacks; the guard it built."""
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(TRAINER.format(tmp_path=tmp_path) + callbacks_yaml)
    cli = LightningCLI(TinyClassifier, args=["fit", "--config", str(config)], save_config_callback=None)
    guards = [c for c in cli.trainer.callbacks if type(c).__name__ == "MergeGuardCallback"]
    assert len(guards) == 1
    return guards[0]


def test_merge_guard_from_lightning_cli_yaml(tmp_path):
    guard = run_cli(
        tmp_path,
        f"""
    - class_path: lightning_mergeguard.MergeGuardCallback
      init_args:
        alpha: 0.05
        stage2: negation
        tolerance: 100.0
        report_path: {tmp_path / "report.json"}
""",
    )
    assert guard.alpha == 0.05 and guard.stage2_done
    assert (tmp_path / "report.json").is_file()


def test_stage2_strategy_object_from_lightning_cli_yaml(tmp_path):
    guard = run_cli(
        tmp_path,
        """
    - class_path: lightning_mergeguard.MergeGuardCallback
      init_args:
        stage2:
          class_path: lightning_mergeguard.ScaleAdversarial
          init_args: {steps: 6, lr: 0.01, scales: [0.3, 0.5]}
        tolerance: 100.0
        progress: false
""",
    )
    assert type(guard.stage2).__name__ == "ScaleAdversarial" and guard.stage2.steps == 6
    assert guard.stage2.scales == (0.3, 0.5) and guard.report["settings"]["stage2"]["lr"] == 0.01


def test_settings_given_alone_from_lightning_cli_yaml(tmp_path):
    """The type hints let jsonargparse take one number or one name where a list is usual."""
    guard = run_cli(
        tmp_path,
        """
    - class_path: lightning_mergeguard.MergeGuardCallback
      init_args:
        stage2:
          class_path: lightning_mergeguard.MergeNeighbourhood
          init_args: {steps: 2, methods: ties, owner_weights: 1.0, proxies: [1.0, 0.3], surrogates: 1}
        tolerance: 100.0
        progress: false
""",
    )
    s = guard.stage2.settings()
    assert s["methods"] == ("ties",) and s["owner_weights"] == (1.0, 1.0) and s["proxies"] == ((1.0, 0.3),)
    assert guard.stage2_done


def test_score_and_loss_functions_by_import_path_from_lightning_cli_yaml(tmp_path):
    # jsonargparse checks a function's annotations against the ScoreFn/LossFn hints: they must keep accepting the
    # library's own functions (a broader ScoreFn return hint had refused default_score).
    import torch

    from lightning_mergeguard.evaluation import default_loss, default_score

    torch.save({k: v + 0.01 for k, v in TinyClassifier().state_dict().items()}, tmp_path / "donor.pt")
    guard = run_cli(
        tmp_path,
        f"""
    - class_path: lightning_mergeguard.MergeGuardCallback
      init_args:
        stage2: negation
        score_fn: lightning_mergeguard.evaluation.default_score
        loss_fn: lightning_mergeguard.evaluation.default_loss
        tolerance: 100.0
    - class_path: lightning_mergeguard.MergeProbe
      init_args:
        donors:
          class_path: lightning_mergeguard.Donors
          init_args:
            sources: {{d: {tmp_path / "donor.pt"}}}
            check_base: false
        score_fn: lightning_mergeguard.evaluation.default_score
        progress: false
""",
    )
    assert guard.score_fn is default_score and guard.loss_fn is default_loss and guard.stage2_done

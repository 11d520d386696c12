"""FSDP2 (Lightning's ModelParallelStrategy + fully_shard): guard and probe on 2 CPU processes (gloo) equal one process.

``tests/fsdp_worker.py`` runs the same fit (stage 1, a probe every epoch with task arithmetic, TIES and DARE-TIES,
scale-adversarial stage 2, a checkpoint after epoch 1 and a resumed copy, the protected weights saved) on one
process and, sharded, on two; each process-count run writes what rank zero saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TinyClassifier
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file as load_safetensors

from lightning_mergeguard import MergeGuardCallback, MergeNeighbourhood, MergeProbe, QuantizationWatermark

WORKER = Path(__file__).with_name("fsdp_worker.py")
ACCELERATOR = os.environ.get("MERGEGUARD_FSDP_ACCELERATOR", "cpu")  # make gpu-check runs them on the GPUs: "gpu"
if ACCELERATOR == "gpu" and torch.cuda.device_count() < 2:
    pytest.skip("FSDP2 on GPUs compares 1 with 2 processes: it needs 2 GPUs", allow_module_level=True)


def _run(out: Path, devices: int, *extra: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(WORKER), str(out), "--devices", str(devices), "--accelerator", ACCELERATOR, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = {}
    for devices in (1, 2):
        d = root / f"devices{devices}"
        _run(d, devices, "--resume", "--drop-density", "0.5", "--save", str(d / "protected.safetensors"))
        out[devices] = {
            "straight": torch.load(d / "result.pt", weights_only=False),
            "resumed": torch.load(d / "resumed.pt", weights_only=False),
            "saved": load_safetensors(d / "protected.safetensors"),
        }
    d = root / "devices2-reference-file"
    _run(d, 2, "--drop-density", "0.5", "--reference-file")
    out["2, reference file"] = {"straight": torch.load(d / "result.pt", weights_only=False)}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("sharded", [2, "2, reference file"])
def test_fsdp2_two_processes_equal_one_process(runs, sharded):
    # theta_pre: a snapshot of each rank's shard at fit start, or each rank's rows of a safetensors file.
    one, two = runs[1]["straight"], runs[sharded]["straight"]
    # Stage 1 and training: the same weights and the same logged term at every step.
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=0, atol=1e-6, msg=k)
    assert len(one["terms"]) == len(two["terms"]) == 12
    assert one["terms"][-1] > 0
    torch.testing.assert_close(torch.tensor(two["terms"]), torch.tensor(one["terms"]), rtol=1e-5, atol=1e-9)
    # Stage 2: the same guard-rail checks (own score and merge proxy at each) and the same decision; losses equal
    # up to float rounding (each rank's mean over half the batch, averaged).
    r1, r2 = one["report"], two["report"]
    assert r2["checks"] == r1["checks"] and len(r1["checks"]) == 3
    for key in ("score_before", "score_after", "steps_used", "merge_proxy_before", "merge_proxy_after"):
        assert r2[key] == r1[key], key
    # Norms over whole sharded tensors are summed across ranks (a DTensor's own .sum() is this rank's part).
    assert r1["task_vector_norm"] > 0
    for key in ("own_loss_first", "own_loss_last", "scaled_loss_first", "scaled_loss_last", "task_vector_norm"):
        assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    # The probe: every logged number (TA merges shard by shard, TIES and DARE-TIES one gathered tensor at a time).
    assert len(one["probe"]) == len(two["probe"]) == 4  # 3 epochs + the end of fit
    for p1, p2 in zip(one["probe"], two["probe"]):
        assert set(p1) == set(p2)
        for key, value in p1.items():
            if not key.endswith("seconds"):
                assert p2[key] == pytest.approx(value, abs=1e-6), key
    assert {"mergeprobe/ties@0.5/own/acc", "mergeprobe/dare_ties@0.5/own/acc", "mergeprobe/cosine/d"} <= set(p1)


@pytest.mark.distributed
def test_fsdp2_resume_and_saved_weights(runs):
    for devices in (1, 2):
        straight, resumed, saved = runs[devices]["straight"], runs[devices]["resumed"], runs[devices]["saved"]
        # The snapshot reference travels in the checkpoint (gathered whole), so the resumed fit is the same fit.
        for k, w in straight["weights"].items():
            assert torch.equal(resumed["weights"][k], w), (devices, k)
        assert resumed["report"]["checks"] == straight["report"]["checks"]
        # The probe's results: the epoch-1 probe restored from the checkpoint, the later ones measured again.
        assert len(resumed["probe"]) == len(straight["probe"])
        for p1, p2 in zip(straight["probe"], resumed["probe"]):
            assert {k: v for k, v in p2.items() if not k.endswith("seconds")} == pytest.approx(
                {k: v for k, v in p1.items() if not k.endswith("seconds")}, abs=1e-9
            )
        # save_path: the whole (gathered) protected weights, written by rank zero.
        assert set(saved) == set(straight["weights"])
        for k, w in straight["weights"].items():
            assert torch.equal(saved[k], w), (devices, k)


class _Strategy:
    """The parts of a Trainer that the callbacks' ``setup`` reads before refusing a strategy."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.callbacks: list = []


def test_refuses_tensor_parallelism_and_fsdp1_with_a_hint():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    tp = _Strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=2"):
        MergeGuardCallback().setup(tp, TinyClassifier(), "fit")
    with pytest.raises(MisconfigurationException, match=r"use ModelParallelStrategy\(data_parallel_size=N"):
        MergeProbe(donors=[{}]).setup(_Strategy(FSDPStrategy()), TinyClassifier(), "fit")


def test_fsdp2_refuses_what_it_does_not_shard():
    from lightning.pytorch.strategies import ModelParallelStrategy

    fsdp2 = _Strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(MisconfigurationException, match="'merge_neighbourhood' does not support FSDP2"):
        MergeGuardCallback(stage2=MergeNeighbourhood(steps=2)).setup(fsdp2, TinyClassifier(), "fit")
    with pytest.raises(MisconfigurationException, match="does not support the sharded strategy ModelParallel"):
        QuantizationWatermark().setup(fsdp2, TinyClassifier(), "fit")

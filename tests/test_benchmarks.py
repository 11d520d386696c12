"""The GPU benchmark runs end to end (a tiny size on the CPU), so it is ready for a machine with a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_overhead_smoke_run(tmp_path):
    env = {**os.environ, "MERGEGUARD_RESULTS_DIR": str(tmp_path)}
    cmd = [sys.executable, "benchmarks/gpu_overhead.py", "--size", "tiny", "--device", "cpu", "--steps", "6"]
    subprocess.run([*cmd, "--stage2-steps", "8", "--out", "smoke"], cwd=ROOT, env=env, check=True, timeout=600)
    data = json.loads((tmp_path / "smoke.json").read_text())
    for model in ("llama", "vit"):
        entry = data["models"][model]
        assert entry["stage2"]["validation_passes"] <= 20
        assert entry["probe"]["probes"] == 1 and entry["probe"]["seconds_per_probe"] > 0
        assert entry["probe"]["wall_ratio"] > 0 and entry["plain"]["step_s"] > 0
        assert all(r["step_ratio"] > 0 for r in entry["stage1"].values())

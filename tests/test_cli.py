from __future__ import annotations

import yaml
from safetensors.torch import load_file

from lightning_mergeguard.cli import main
from lightning_mergeguard.merging import merge


def test_cli_merges_yaml_to_directory(llama_dirs, tmp_path, capsys):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_dirs["base"]),
        "models": [{"model": str(llama_dirs["a"]), "parameters": {"weight": 0.7}}],
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = merge(cfg)
    assert all((got[k] - want[k]).abs().max() == 0 for k in want)
    assert (tmp_path / "out" / "config.json").is_file()
    assert "merged with task_arithmetic" in capsys.readouterr().out


def test_cli_reports_config_typo(tmp_path, capsys):
    path = tmp_path / "cfg.yml"
    path.write_text("merge_method: tiess\nbase_model: x\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown merge_method 'tiess'" in err and "'ties'" in err

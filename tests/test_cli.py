from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_mergeguard.cli.merge import main
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


def test_cli_runs_della_with_a_seed_and_refuses_an_impossible_epsilon(llama_dirs, tmp_path, capsys):
    models = [{"model": str(llama_dirs[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in "ab"]
    cfg = {"merge_method": "della", "base_model": str(llama_dirs["base"]), "models": models}
    path = tmp_path / "della.yml"
    path.write_text(yaml.safe_dump(cfg))
    for out in ("one", "two"):
        assert main([str(path), str(tmp_path / out), "--no-progress", "--seed", "3"]) == 0
    one, two = (load_file(tmp_path / out / "model.safetensors") for out in ("one", "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    want = merge(cfg, seed=3)
    assert all(torch.equal(one[k], want[k]) for k in want)
    cfg["models"][1]["parameters"]["epsilon"] = 0.6  # density 0.5 +/- 0.6 leaves (0, 1)
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "models[1]" in err and "DELLA needs density - epsilon > 0" in err and not (tmp_path / "bad").exists()


def test_cli_reports_config_typo(tmp_path, capsys):
    path = tmp_path / "cfg.yml"
    path.write_text("merge_method: tiess\nbase_model: x\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown merge_method 'tiess'" in err and "'ties'" in err


def test_cli_names_a_config_file_that_is_not_there(tmp_path, capsys):
    # A one-line path was read as YAML text: "a merge config must be a mapping, got str".
    assert main([str(tmp_path / "missing.yml"), str(tmp_path / "out")]) == 2
    assert f"merge config not found: {tmp_path / 'missing.yml'}" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "merge config is a directory, not a YAML file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty.yml").write_text("")
    assert main([str(tmp_path / "empty.yml"), str(tmp_path / "out")]) == 2
    assert f"merge config {tmp_path / 'empty.yml'} is empty" in capsys.readouterr().err


def test_cli_shards_low_memory_and_reports_a_bad_size(llama_dirs, tmp_path, capsys):
    cfg = {
        "merge_method": "ties",
        "base_model": str(llama_dirs["base"]),
        "models": [{"model": str(llama_dirs[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in "ab"],
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main([str(path), str(out), "--no-progress", "--out-shard-size", "5K", "--low-memory"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert set(index["weight_map"]) == set(got)
    want = merge(cfg)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert main([str(path), str(tmp_path / "o2"), "--out-shard-size", "5 parsecs"]) == 2
    assert "cannot read '5 parsecs' as a size" in capsys.readouterr().err


def test_cli_help_needs_no_torch():
    code = "\n".join(
        [
            "import sys",
            "from lightning_mergeguard.cli.merge import main",
            "try:",
            "    main(['--help'])",
            "except SystemExit:",
            "    pass",
            "assert 'torch' not in sys.modules, 'torch was imported'",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--out-shard-size" in proc.stdout and "--cuda" in proc.stdout


def test_cli_takes_mergekit_yaml_command_lines(llama_dirs, tmp_path, capsys):
    # mergekit's README command line (`--lazy-unpickle --allow-crimes ...`) had been refused as unrecognized.
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_dirs["base"], base)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base)}
    cfg["models"] = [{"model": str(llama_dirs["a"]), "parameters": {"weight": 0.7}}]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    flags = ["--lazy-unpickle", "--allow-crimes", "--copy-tokenizer", "--out-shard-size", "1B", "-j", "1", "--quiet"]
    assert main([str(path), str(tmp_path / "out"), *flags]) == 0
    err = capsys.readouterr().err
    assert "--lazy-unpickle has no effect here: pickled .bin inputs load with weights_only=True" in err
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    card = (out / "README.md").read_text()  # mergekit writes a model card by default
    assert "task_arithmetic merge method using" in card and str(llama_dirs["a"]) in card and "weight: 0.7" in card
    got = load_file(out / "model.safetensors")
    want = merge(cfg)
    assert all(torch.equal(got[k], want[k]) for k in want)

    assert main([str(path), str(tmp_path / "bare"), "--no-copy-tokenizer", "--no-write-model-card"]) == 0
    assert not (tmp_path / "bare" / "tokenizer.json").exists() and not (tmp_path / "bare" / "README.md").exists()
    for flag, message in [
        ("--no-safe-serialization", "writes safetensors only"),
        ("--unsafe-truncate-embeddings", "--unsafe-truncate-embeddings is not supported"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(path), str(tmp_path / "no"), flag])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_allow_crimes_merges_architectures_whose_tensors_match(llama_dirs, tmp_path, capsys):
    import shutil

    other = tmp_path / "mistral_named"
    shutil.copytree(llama_dirs["a"], other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(llama_dirs["base"])}
    cfg["models"] = [{"model": str(other), "parameters": {"weight": 0.5}}]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has model_type='mistral' but base" in err and "CLI: --allow-crimes" in err
    assert main([str(path), str(tmp_path / "out"), "--allow-crimes"]) == 0
    want = merge({**cfg, "models": [{"model": str(llama_dirs["a"]), "parameters": {"weight": 0.5}}]})
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_model_card_lists_hub_ids_but_not_local_directories_named_like_them(tmp_path, monkeypatch):
    from lightning_mergeguard.merging import MergeConfig
    from lightning_mergeguard.merging.card import model_card_text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)  # 'models/base' is a local directory, not a Hub model
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "models/base",
            "models": [{"model": "org/ft@v2", "parameters": {"weight": 1.0}}],
        }
    )
    metadata = model_card_text(cfg, "out").split("---")[1]
    assert "- org/ft" in metadata and "models/base" not in metadata

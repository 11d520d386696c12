"""mergekit ``slices`` and ``passthrough``: frankenmerges, per-slice parameters, the output config (no mergekit).

Parity with mergekit itself is in ``test_merging_parity.py`` (``test_slices_match_mergekit``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import TINY_LLAMA, perturbed_state_dict
from safetensors.torch import load_file

from lightning_mergeguard.cli.merge import main
from lightning_mergeguard.errors import ConfigError, IncompatibleModelsError
from lightning_mergeguard.merging import MergeConfig, merge
from lightning_mergeguard.probing import build_probe_specs


def _slice(*sources, **extra) -> dict:
    """An output slice: ``(model, (start, end))`` or ``(model, (start, end), {extra keys})`` per source."""
    entries = [{"model": str(m), "layer_range": list(r), **(more[0] if more else {})} for m, r, *more in sources]
    return {"sources": entries, **extra}


def _llama(path: Path, layers: int, seed: int, **config) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers, **config})).save_pretrained(path)
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_frankenmerge_is_the_stacked_model(tmp_path, tied):
    # mergekit's orcamini-platy example, small: layers 0-2 of a 4-layer model, then layers 1-3 of a 5-layer one.
    from transformers import AutoModelForCausalLM

    a = _llama(tmp_path / "a", 4, seed=1, tie_word_embeddings=tied)
    b = _llama(tmp_path / "b", 5, seed=2, tie_word_embeddings=tied)
    cfg = {"merge_method": "passthrough", "slices": [_slice((a, (0, 3))), _slice((b, (1, 4)))]}
    out = merge(cfg, out=tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    got = AutoModelForCausalLM.from_pretrained(out)
    ma, mb = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b))
    # Built by hand: a's embeddings, a's layers 0-2, b's layers 1-3, b's final norm and head.
    want = AutoModelForCausalLM.from_pretrained(a, num_hidden_layers=6)
    want.model.layers = torch.nn.ModuleList([*ma.model.layers[:3], *mb.model.layers[1:4]])
    want.model.norm, want.lm_head = mb.model.norm, (ma.lm_head if tied else mb.lm_head)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7))
    with torch.no_grad():
        # no cache: the hand-built stack repeats layer indices, which a KV cache keys its layers by
        assert torch.equal(got(ids, use_cache=False).logits, want(ids, use_cache=False).logits)
    saved = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in saved) is not tied  # a tied model stays tied
    assert torch.equal(saved["model.layers.3.mlp.up_proj.weight"], mb.model.layers[1].mlp.up_proj.weight)
    replay = MergeConfig.from_yaml(out / "mergekit_config.yml")
    assert replay == MergeConfig.from_dict(cfg)


def test_layer_types_follow_the_layers(tmp_path):
    # Per-layer attention types (Qwen2's sliding window) go with each layer's weights, and the model loads.
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    settings = {k: v for k, v in TINY_LLAMA.items() if k != "tie_word_embeddings"}
    settings.update(num_hidden_layers=4, layer_types=types, use_sliding_window=True, sliding_window=4)
    Qwen2ForCausalLM(Qwen2Config(**settings)).save_pretrained(tmp_path / "q")
    cfg = {
        "merge_method": "passthrough",
        "slices": [_slice((tmp_path / "q", (0, 3))), _slice((tmp_path / "q", (1, 3)))],
    }
    out = merge(cfg, out=tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == [*types[0:3], *types[1:3]]
    assert AutoModelForCausalLM.from_pretrained(out).config.layer_types == written["layer_types"]


def test_a_slice_that_covers_every_layer_is_the_models_form(llama_dirs):
    paths = {k: str(v) for k, v in llama_dirs.items()}
    models = [{"model": paths[n], "parameters": {"weight": w}} for n, w in (("a", 0.7), ("b", 0.4))]
    whole = {"merge_method": "task_arithmetic", "base_model": paths["base"], "parameters": {"lambda": 0.8}}
    sources = [{"model": paths["base"], "layer_range": [0, 2]}]
    sources += [{"model": m["model"], "layer_range": [0, 2], "parameters": m["parameters"]} for m in models]
    want = merge({**whole, "models": models})
    got = merge({**whole, "slices": [{"sources": sources}]})
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_slice_parameters_take_precedence_and_fall_back_per_tensor():
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "parameters": {"weight": 0.1},
            "slices": [
                _slice(
                    ("a", (0, 2), {"parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}}),
                    ("b", (0, 2)),
                    parameters={"weight": [{"filter": "attn", "value": 0.5}]},
                )
            ],
        }
    )
    sub = cfg.slice_config(0)
    a, b = sub.models
    # a: its own filter on mlp, else the slice's on attn, else the config's
    assert [sub.model_params(a, name)["weight"] for name in ("x.mlp.w", "x.attn.w", "x.norm")] == [0.9, 0.5, 0.1]
    assert [sub.model_params(b, name)["weight"] for name in ("x.mlp.w", "x.attn.w")] == [0.1, 0.5]


def test_gradients_interpolate_within_each_slice():
    base = {"model.embed_tokens.weight": torch.zeros(3, 2)}
    base.update({f"model.layers.{i}.w": torch.zeros(2) for i in range(4)})
    ones = {k: torch.ones_like(v) for k, v in base.items()}
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "slices": [_slice(("base", (0, 3)), ("ft", (0, 3))), _slice(("base", (3, 4)), ("ft", (3, 4)))],
        "parameters": {"weight": 1.0, "lambda": [0.0, 1.0]},
    }
    out = merge(cfg, {"base": base, "ft": ones}, check_base=False)
    # layer i of a slice of n takes t = i / (n - 1), a one-layer slice t = 1 (as mergekit evaluates them)
    assert [float(out[f"model.layers.{i}.w"][0]) for i in range(4)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert float(out["model.embed_tokens.weight"][0, 0]) == 0.0  # outside the layers: t = 0


def test_passthrough_copies_bits_and_scales():
    model = {"model.layers.0.w": torch.randn(4, 4).to(torch.bfloat16)}
    out = merge({"merge_method": "passthrough", "models": ["m"]}, {"m": model})
    assert out["model.layers.0.w"].dtype == torch.bfloat16 and torch.equal(
        out["model.layers.0.w"], model["model.layers.0.w"]
    )
    half = merge(
        {"merge_method": "passthrough", "models": [{"model": "m", "parameters": {"scale": 0.5}}]}, {"m": model}
    )
    assert torch.equal(half["model.layers.0.w"], model["model.layers.0.w"] * 0.5)


def _layers(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(5, 2, generator=g)}
    out.update({f"model.layers.{i}.w": torch.randn(2, 2, generator=g) for i in range(n)})
    return out


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (
            {"slices": [_slice(("a", (0, 5)))]},
            ConfigError,
            r"slices\[0\].sources\[0\]: layer_range \[0, 5\] but model 'a' has 4 layers",
        ),
        ({"slices": [_slice(("a", (0, 2)), ("b", (0, 3)))]}, ConfigError, "same number of layers"),
        ({"slices": [_slice(("a", (0, 2)), ("a", (2, 4)))]}, ConfigError, "lists model 'a' more than once"),
        ({"slices": [_slice(("a", (2, 2)))]}, ConfigError, "0 <= start < end"),
        (
            {"slices": [_slice(("a", (0, 2)), residual_weight=0.5)]},
            ConfigError,
            "residual_weight is read by mergekit but never used",
        ),
        ({"slices": [_slice(("a", (0, 2)), paramters={})]}, ConfigError, "did you mean 'parameters'"),
        ({"slices": [_slice(("a", (0, 2)))], "models": ["a"]}, ConfigError, "either 'models' or 'slices'"),
        ({"slices": []}, ConfigError, "non-empty list"),
        ({"slices": [_slice(("a", (0, 2)), ("b", (0, 2)))]}, ConfigError, "passthrough' takes at most 1 model"),
        (
            {"merge_method": "task_arithmetic", "base_model": "base", "slices": [_slice(("a", (0, 2)), ("b", (0, 2)))]},
            ConfigError,
            "needs base model 'base' among the slice's sources",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "base",
                "parameters": {"trim_scope": "model", "density": 0.5, "weight": 1.0},
                "slices": [_slice(("base", (0, 2)), ("a", (0, 2)))],
            },
            ConfigError,
            "trim_scope: model",
        ),
        ({"slices": [_slice(("odd", (0, 2)))]}, IncompatibleModelsError, "one stack of numbered layers"),
    ],
)
def test_bad_slices_are_named(config, error, match):
    pool = {"a": _layers(4, 1), "b": _layers(6, 2), "base": _layers(4, 0)}
    pool["odd"] = {**_layers(2, 3), "vision.blocks.0.w": torch.zeros(1)}
    config = {"merge_method": "passthrough", **config}
    names = {src["model"] for out in config["slices"] for src in out["sources"]}
    with pytest.raises(error, match=match):
        merge(config, {m: pool[m] for m in names | ({config["base_model"]} if "base_model" in config else set())})


def test_a_slice_with_different_tensors_per_layer_is_named():
    odd = _layers(2, 5)
    odd["model.layers.1.extra"] = torch.zeros(1)
    cfg = {
        "merge_method": "linear",
        "slices": [
            _slice(("a", (0, 2), {"parameters": {"weight": 1.0}}), ("b", (0, 2), {"parameters": {"weight": 1.0}}))
        ],
    }
    with pytest.raises(
        IncompatibleModelsError, match=r"layer 1 of model 'b' and layer 1 of 'a' hold different tensors \('extra'"
    ):
        merge(cfg, {"a": _layers(2, 4), "b": odd})


def test_cli_runs_mergekits_gradient_slerp_example(llama_dirs, tmp_path):
    # mergekit's examples/gradient-slerp.yml, on the tiny models: it had been refused ("slices are not supported").
    text = f"""
slices:
  - sources:
      - model: {llama_dirs["a"]}
        layer_range: [0, 2]
      - model: {llama_dirs["b"]}
        layer_range: [0, 2]
merge_method: slerp
base_model: {llama_dirs["a"]}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""
    path = tmp_path / "gradient-slerp.yml"
    path.write_text(text)
    assert main([str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    models = yaml.safe_load(text)
    models["models"] = [{"model": s["model"]} for s in models.pop("slices")[0]["sources"]]
    want = merge(models)  # the same merge in the models form: one slice over every layer
    assert all(torch.equal(got[k], want[k]) for k in want) and got.keys() == want.keys()


def test_probe_refuses_a_sliced_config(tmp_path):
    path = tmp_path / "franken.yml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [_slice(("live", (0, 1)))]}))
    with pytest.raises(ValueError, match="probe merges whole models"):
        build_probe_specs([path], ["d"], None)


def test_layer_ranges_are_read_from_each_source(tmp_path):
    # Merging different layer ranges of two fine-tunes (offset slices): output layer k takes each source's own.
    base = _llama(tmp_path / "base", 4, seed=0)
    state = load_file(base / "model.safetensors")
    ft = perturbed_state_dict(state, seed=3)
    cfg = {
        "merge_method": "linear",
        "slices": [
            _slice((base, (0, 2), {"parameters": {"weight": 1.0}}), ("ft", (2, 4), {"parameters": {"weight": 1.0}}))
        ],
    }
    out = merge(cfg, {str(base): state, "ft": ft})  # the same-base check does not compare different layers
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(out[key], (state[key] + ft["model.layers.3.mlp.down_proj.weight"]) / 2)


def test_an_extension_inside_a_slice_is_not_written_as_a_mergekit_config():
    sources = [{"model": "b", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 2]}]
    sources[1]["parameters"] = {"weight": 1.0, "density": 0.5}
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "dare_linear",
            "base_model": "b",
            "slices": [{"sources": sources, "parameters": {"rescale_mode": "density"}}],
        }
    )
    assert cfg.uses_extensions
    with pytest.raises(ConfigError, match="rescale_mode='density' is an extension of this engine"):
        cfg.to_yaml()
    assert "rescale_mode: density" in cfg.to_yaml(mergekit=False)
    cfg.slices[0].parameters["rescale_mode"] = "l1"  # the default: mergekit's behaviour, left out of its YAML
    assert not cfg.uses_extensions and "rescale_mode" not in cfg.to_yaml()

"""Bad input gives a clear error that names the problem, never a silently wrong model."""

from __future__ import annotations

import pickle

import pytest
import torch

from lightning_mergeguard.errors import ConfigError, IncompatibleModelsError
from lightning_mergeguard.merging import MergeConfig, merge, open_source


def ta(**params):
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, **params}}],
    }


BASE = {"x.weight": torch.zeros(2, 2), "y.weight": torch.zeros(3)}


def test_missing_and_extra_keys_are_named():
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): 'y.weight'"):
        merge(ta(), {"a": {"x.weight": torch.ones(2, 2)}}, BASE)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): 'z'"):
        merge(ta(), {"a": {**BASE, "z": torch.ones(1)}}, BASE)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"tensor 'y.weight': shape \(4,\) in model 'a' but \(3,\)"):
        merge(ta(), {"a": {"x.weight": torch.ones(2, 2), "y.weight": torch.ones(4)}}, BASE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(bad):
    a = {"x.weight": torch.ones(2, 2), "y.weight": torch.tensor([0.0, bad, 1.0])}
    with pytest.raises(ValueError, match=r"tensor 'y.weight' of model 'a' has 1 NaN/Inf"):
        merge(ta(), {"a": a}, BASE)


def test_other_architecture_by_config(llama_dirs, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(llama_dirs["a"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='mistral' but base"):
        merge(ta(), {"a": other}, llama_dirs["base"])


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match=r"unknown merge_method 'tie'.*'ties'"):
        MergeConfig.from_dict({**ta(), "merge_method": "tie"})


def test_unknown_parameter_suggests():
    with pytest.raises(ValueError, match=r"unknown parameter 'lamda'.*did you mean 'lambda'"):
        MergeConfig.from_dict({**ta(), "parameters": {"lamda": 0.3}})
    with pytest.raises(ValueError, match=r"models\[0\] \(a\): unknown parameter 'wieght'.*'weight'"):
        MergeConfig.from_dict({**ta(), "models": [{"model": "a", "parameters": {"wieght": 1.0}}]})


def test_unknown_top_level_key_suggests():
    with pytest.raises(ValueError, match=r"unknown merge config key 'base_modle'.*'base_model'"):
        MergeConfig.from_dict({**ta(), "base_modle": "x"})


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range(density):
    cfg = {**ta(), "merge_method": "ties"}
    cfg["models"] = [{"model": "a", "parameters": {"weight": 1.0, "density": density}}]
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        MergeConfig.from_dict(cfg)


def test_required_weight_and_base():
    with pytest.raises(ValueError, match="parameter 'weight' is required"):
        MergeConfig.from_dict({**ta(), "models": [{"model": "a"}]})
    with pytest.raises(ValueError, match="needs a base_model"):
        MergeConfig.from_dict({k: v for k, v in ta().items() if k != "base_model"})
    with pytest.raises(ValueError, match="needs parameter 't'"):
        MergeConfig.from_dict({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}]})


def test_modules_refused_clearly():
    with pytest.raises(NotImplementedError, match=r"mergekit 'modules' .* are not supported"):
        MergeConfig.from_dict({"merge_method": "linear", "modules": {}})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        # a path where a list belongs was read one character at a time ("models[5] (/) repeats models[0]")
        ({"models": "ft/a"}, r"'models' must be a list of entries .* got str 'ft/a'"),
        ({"models": {"model": "ft/a"}}, "'models' must be a list of entries"),
        # dict(0.5) / dict([...]) raised TypeError / ValueError that named nothing
        ({"models": [{"model": "a", "parameters": 0.5}]}, r"models\[0\] \(a\): parameters must be a mapping"),
        ({"parameters": ["weight", 1]}, "^parameters must be a mapping of name: value, got list"),
        ({"models": [{"model": {"model": {"path": "a"}}, "parameters": {"weight": 1}}]}, "nested model references"),
        ({"base_model": ["b"]}, "base_model must be a path or Hub id"),
    ],
)
def test_config_shapes_that_are_typos_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        MergeConfig.from_dict({**ta(), **change})


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({**ta(density=[0.5, 1.5]), "merge_method": "ties"}, r"density must be in \(0, 1\], got 1.5"),  # each value
        (ta(weight=[]), "'weight' is an empty list"),
        (ta(weight=[0.5, {"value": 1.0}]), "mixes {filter, value} entries with plain values"),
        ({**ta(), "merge_method": "ties", "parameters": {"normalize": [True, 0.5]}}, "must be true or false"),
        (
            {"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"max_iter": [5, 9]}},
            "takes a whole number, not a gradient list",
        ),
    ],
)
def test_bad_gradients_are_named(config, match):
    with pytest.raises(ConfigError, match=match):
        MergeConfig.from_dict(config)


LAYERED = {f"model.layers.{i}.mlp.weight": torch.zeros(2) for i in range(5)} | {"lm_head.weight": torch.zeros(2)}


def test_gradients_interpolate_over_the_layers_and_need_layer_names():
    donor = {k: torch.ones(2) for k in LAYERED}
    out = merge(ta(weight=[0.0, 1.0, 0.0]), {"a": donor}, LAYERED)  # 0 at both ends, 1 in the middle layer
    got = [float(out[f"model.layers.{i}.mlp.weight"][0]) for i in range(5)]
    assert got == [0.0, 0.5, 1.0, 0.5, 0.0] and float(out["lm_head.weight"][0]) == 0.0  # outside the layers: t = 0
    with pytest.raises(ConfigError, match="no tensor name has a layer index"):
        merge(ta(weight=[0.0, 1.0]), {"a": {k: torch.ones_like(v) for k, v in BASE.items()}}, BASE)


def test_gradients_count_the_whole_models_layers_when_the_sources_hold_a_subset():
    """A probe merges only the weights include selects: layer 0 of 5 must still sit at t = 0."""
    from lightning_mergeguard.merging import iter_merge

    first = {"model.layers.0.mlp.weight": torch.zeros(2)}
    donor = {"a": {k: torch.ones(2) for k in first}}
    alone = dict(iter_merge(ta(weight=[0.25, 1.0]), donor, first))  # a one-layer stack: t = 1, as in mergekit
    whole = dict(iter_merge(ta(weight=[0.25, 1.0]), donor, first, layer_names=list(LAYERED)))
    assert float(alone["model.layers.0.mlp.weight"][0]) == 1.0
    assert float(whole["model.layers.0.mlp.weight"][0]) == 0.25


def test_trim_scope_model_needs_one_density_per_model():
    cfg = {**ta(density=[0.2, 0.8]), "merge_method": "ties", "parameters": {"trim_scope": "model"}}
    with pytest.raises(ConfigError, match="trim_scope: model trims each model's whole task vector at one density"):
        merge(cfg, {"a": {k: torch.ones_like(v) for k, v in LAYERED.items()}}, LAYERED)


def test_models_not_matching_config():
    with pytest.raises(ValueError, match=r"no weights given for model\(s\) \['a'\]"):
        merge(ta(), {}, BASE)
    with pytest.raises(ValueError, match=r"\['zz'\] are not in the merge config"):
        merge(ta(), {"a": BASE, "zz": BASE}, BASE)


def test_untrusted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        open_source(path)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        open_source(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        open_source(tmp_path)


def test_lightning_checkpoint_and_torch_file_load(tmp_path):
    torch.save({"state_dict": BASE, "epoch": 3}, tmp_path / "x.ckpt")
    assert set(open_source(tmp_path / "x.ckpt").keys()) == set(BASE)


def test_extension_cannot_be_written_for_mergekit():
    cfg = MergeConfig.from_dict({**ta(), "merge_method": "ties", "parameters": {"trim_scope": "model"}})
    with pytest.raises(ValueError, match="mergekit cannot replay"):
        cfg.to_yaml()
    assert "trim_scope" in cfg.to_yaml(mergekit=False)


def test_choice_parameters_are_checked_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"parameter 'rescale_mode' must be one of l1, l2, linf, density, got 'l3'"):
        MergeConfig.from_dict(
            {"merge_method": "dare_ties", "base_model": "b", "models": ["a"], "parameters": {"rescale_mode": "l3"}}
        )
    with pytest.raises(ConfigError, match="'trim_scope' must be one of tensor, model"):
        MergeConfig.from_dict(
            {"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"trim_scope": "layer"}}
        )


def test_int8_mask_gives_identical_results():
    torch.manual_seed(0)
    base = {"w": torch.randn(32, 32)}
    donors = {n: {"w": base["w"] + 0.05 * torch.randn(32, 32)} for n in ("a", "b", "c")}

    def cfg(mask):
        return {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": n, "parameters": {"weight": 1.0, "density": 0.5}} for n in donors],
            "parameters": {"int8_mask": mask},
        }

    assert torch.equal(merge(cfg(True), donors, base)["w"], merge(cfg(False), donors, base)["w"])


def test_a_user_method_declared_as_data():
    from lightning_mergeguard.merging import register_method
    from lightning_mergeguard.merging.methods.generalized import task_vector_method
    from lightning_mergeguard.merging.registry import METHODS

    spec = task_vector_method("mean_task_vectors", normalize=True, description="mean of the task vectors")
    register_method(spec)
    try:
        out = merge(
            {
                "merge_method": "mean_task_vectors",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 2}}],
            },
            {"a": {"w": torch.ones(2)}},
            {"w": torch.zeros(2)},
            check_base=False,
        )
        assert torch.equal(out["w"], torch.ones(2))
        with pytest.raises(ConfigError, match="parameter 'normalize' must be true or false"):
            MergeConfig.from_dict(
                {
                    "merge_method": "mean_task_vectors",
                    "base_model": "b",
                    "models": ["a"],
                    "parameters": {"normalize": 1},
                }
            )
    finally:
        METHODS.pop("mean_task_vectors")


def test_a_model_listed_twice_is_refused_and_the_base_may_come_in_the_mapping():
    # Listed twice, a model would be merged twice here, while mergekit keys models by path and applies one entry.
    base, a = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    entry = lambda w: {"model": "a", "parameters": {"weight": w}}  # noqa: E731
    twice = {"merge_method": "task_arithmetic", "base_model": "base", "models": [entry(0.5), entry(0.25)]}
    with pytest.raises(ConfigError, match=r"models\[1\] \(a\) repeats models\[0\]"):
        merge(twice, {"a": a}, base, check_base=False)
    # The base's weights may be given in the models mapping under base_model's name, as the docstring says.
    once = {**twice, "models": [entry(0.5)]}
    torch.testing.assert_close(merge(once, {"a": a, "base": base}, check_base=False)["w"], torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"models given for \['c'\] are not in the merge config"):
        merge(once, {"a": a, "base": base, "c": a}, check_base=False)


def test_base_passed_twice_is_refused_not_silently_taken():
    """SLERP's base_model is an endpoint among the models: a separate base= would silently replace it."""
    a, b, pre = {"w": torch.ones(4)}, {"w": torch.full((4,), 3.0)}, {"w": torch.zeros(4)}
    cfg = {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.0},
        "models": [{"model": "a"}, {"model": "b"}],
    }
    with pytest.raises(ValueError, match="base_model 'a' names one of the models given, and base= was passed"):
        merge(cfg, {"a": a, "b": b}, pre, check_base=False)
    torch.testing.assert_close(merge(cfg, {"a": a, "b": b}, check_base=False)["w"], a["w"])  # t=0: the base end


def test_a_tied_head_saved_by_one_model_and_not_another_merges_and_an_untied_head_is_refused(tmp_path):
    # save_pretrained leaves lm_head.weight out of a tied model; other tools write the copy. Same architecture.
    from _helpers import TINY_LLAMA, perturbed_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True})
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    states = {n: perturbed_state_dict(base.state_dict(), seed) for n, seed in (("a", 1), ("b", 2))}
    for name, state in states.items():
        m = LlamaForCausalLM(config)
        m.load_state_dict(state)
        m.save_pretrained(tmp_path / name)  # no lm_head.weight in the file
    assert "lm_head.weight" not in load_file(tmp_path / "a" / "model.safetensors")

    embed = "model.embed_tokens.weight"

    def with_head(name: str, shift: float = 0.0) -> str:
        """The model re-saved with lm_head.weight written out: its embeddings (+ shift: an untied head)."""
        d = tmp_path / f"{name}-with-head"
        d.mkdir()
        tensors = {k: v.contiguous() for k, v in load_file(tmp_path / name / "model.safetensors").items()}
        save_file({**tensors, "lm_head.weight": tensors[embed] + shift}, d / "model.safetensors")
        (d / "config.json").write_text((tmp_path / name / "config.json").read_text())
        return str(d)

    def cfg(base_model, models):
        entries = [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]
        return {"merge_method": "task_arithmetic", "base_model": str(base_model), "models": entries}

    want = merge(cfg(tmp_path / "base", [tmp_path / "a", tmp_path / "b"]))
    copied = with_head("b")
    got = merge(cfg(tmp_path / "base", [tmp_path / "a", copied]))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # A base saved with the copy: donors without one read their head from their embeddings.
    with_copy = merge(cfg(with_head("base"), [tmp_path / "a", tmp_path / "b"]))
    assert torch.equal(with_copy["lm_head.weight"], with_copy[embed]) and torch.equal(with_copy[embed], want[embed])
    # An untied fine-tune's own head cannot be kept by a merge into the tied base.
    untied = with_head("a", shift=1.0)
    with pytest.raises(IncompatibleModelsError, match=r"own lm_head.weight, which is not a copy of its input"):
        merge(cfg(tmp_path / "base", [untied, tmp_path / "b"]))


def _with_tokenizer(src, dst, vocab, template=None):
    """A copy of model directory ``src`` with a real (word-level) tokenizer over ``vocab``."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(dst)
    return dst


def test_mergekit_tokenizer_settings_are_followed_or_refused_by_name(llama_dirs, tmp_path):
    from transformers import AutoTokenizer

    vocab = ["<unk>", "hello", "world"]
    base = _with_tokenizer(llama_dirs["base"], tmp_path / "base", vocab, template="BASE {{ messages }}")
    a = _with_tokenizer(llama_dirs["a"], tmp_path / "a", vocab, template="A {{ messages }}")
    b = _with_tokenizer(llama_dirs["b"], tmp_path / "b", [*vocab, "extra"])
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}],
    }
    # Default and 'base': the base's tokenizer; a model of the config with the same vocabulary: its tokenizer.
    assert AutoTokenizer.from_pretrained(merge(cfg, out=tmp_path / "o1")).chat_template == "BASE {{ messages }}"
    out = merge({**cfg, "tokenizer_source": str(a)}, out=tmp_path / "o2")
    assert AutoTokenizer.from_pretrained(out).chat_template == "A {{ messages }}"
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()  # the base's architecture
    # chat_template as Jinja text is written; a union of equal vocabularies is the base's.
    out = merge({**cfg, "tokenizer_source": "union", "chat_template": "{{ 'hi' }}"}, out=tmp_path / "o3")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == "{{ 'hi' }}" and tok.convert_tokens_to_ids("world") == 2
    # Replacing a merge keeps none of its tokenizer files that the new source lacks (here its chat template).
    plain = _with_tokenizer(llama_dirs["base"], tmp_path / "plain", vocab)
    out = merge({**cfg, "base_model": str(plain)}, out=out, check_base=False)
    assert not (out / "chat_template.jinja").exists() and AutoTokenizer.from_pretrained(out).chat_template is None
    # Settings that would re-map embedding rows, or name nothing, are refused before anything is written.
    with_b = {**cfg, "models": [*cfg["models"], {"model": str(b), "parameters": {"weight": 0.5}}]}
    for config, error, match in [
        ({**with_b, "tokenizer_source": "union"}, NotImplementedError, r"union of tokenizers that differ \(model"),
        ({**with_b, "tokenizer_source": str(b)}, NotImplementedError, "its vocabulary differs from the base's"),
        ({**cfg, "tokenizer_source": "other/model"}, ConfigError, "is neither 'base', 'union' nor a model"),
        ({**cfg, "chat_template": "chatml"}, NotImplementedError, "give the template's Jinja text"),
        ({**cfg, "tokenizer": {"source": "base", "tokens": {"x": {}}}}, NotImplementedError, "only its 'source'"),
    ]:
        with pytest.raises(error, match=match):
            merge(config, out=tmp_path / "refused", check_base=False)
        assert not (tmp_path / "refused").exists()


def test_hub_ids_are_fetched_as_mergekit_does(llama_dirs, monkeypatch):
    # mergekit takes Hugging Face Hub ids (org/name, org/name@revision) for models it downloads; the engine had
    # refused them ("no model at org/name"). They are fetched with huggingface_hub (its cache when offline).
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        assert "*.safetensors" in allow_patterns
        return str(llama_dirs[repo_id.split("/")[1]])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)

    def cfg(ref):
        return {
            "merge_method": "task_arithmetic",
            "base_model": ref("base"),
            "models": [
                {"model": ref("a"), "parameters": {"weight": 0.5}},
                {"model": ref("b"), "parameters": {"weight": 0.5}},
            ],
        }

    hub = merge(cfg(lambda n: f"org/{n}@v1" if n == "a" else f"org/{n}"))
    local = merge(cfg(lambda n: str(llama_dirs[n])))
    assert set(hub) == set(local) and all(torch.equal(hub[k], local[k]) for k in local)
    assert ("org/a", "v1") in calls and ("org/base", None) in calls
    # A Hub that cannot be reached (and no cache) names the id and the reason; a path that is no Hub id is not tried.
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(
        FileNotFoundError, match=r"'org/a' could not be fetched from the Hugging Face Hub \(OSError: offline\)"
    ):
        merge(cfg(lambda n: f"org/{n}"))
    with pytest.raises(FileNotFoundError, match=r"^no model at nope$"):
        open_source("nope")


def test_integer_tensors_must_agree_except_batchnorms_step_counter():

    base = {"w": torch.zeros(2, 2), "ids": torch.arange(4), "bn.num_batches_tracked": torch.tensor(0)}
    a = {"w": torch.ones(2, 2), "ids": torch.arange(4), "bn.num_batches_tracked": torch.tensor(120)}
    b = {"w": -torch.ones(2, 2), "ids": torch.arange(4), "bn.num_batches_tracked": torch.tensor(75)}
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    for m in cfg["models"]:
        m["parameters"] = {"weight": 0.5}
    out = merge(cfg, {"a": a, "b": b}, base, check_base=False)
    assert int(out["bn.num_batches_tracked"]) == 0 and torch.equal(out["ids"], base["ids"])  # the base's counter
    with pytest.raises(ValueError, match="non-floating tensor 'ids' differs between"):
        merge(cfg, {"a": a, "b": {**b, "ids": torch.arange(4).flip(0)}}, base, check_base=False)


def test_a_checkpoint_of_a_wrapper_is_named_with_its_prefix():
    base = {"net.0.weight": torch.zeros(2, 2), "net.0.bias": torch.zeros(2)}
    wrapped = {f"model.{k}": v + 0.1 for k, v in base.items()}  # a LightningModule's checkpoint
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5}}],
    }
    with pytest.raises(IncompatibleModelsError, match=r"Every name of 'a' is the other's with the prefix 'model\.'"):
        merge(cfg, {"a": wrapped}, base, check_base=False)
    with pytest.raises(IncompatibleModelsError, match=r"name of 'base' is the other's with the prefix 'module\.'"):
        merge(cfg, {"a": base}, {f"module.{k}": v for k, v in base.items()}, check_base=False)
    with pytest.raises(IncompatibleModelsError, match="Is it a fine-tune of the same base model"):
        merge(cfg, {"a": {"other.weight": torch.zeros(2, 2), "net.0.bias": torch.zeros(2)}}, base, check_base=False)


def test_a_mergekit_multi_file_is_named():
    text = "merge_method: linear\nmodels: [a]\n---\nname: second\nmerge_method: linear\nmodels: [b]\n"
    with pytest.raises(ConfigError, match=r"several YAML documents \(a mergekit-multi file\?\)"):
        MergeConfig.from_yaml(text)

"""Parity with mergekit on tiny Llama models built from configs (mergekit is an optional test dependency)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lightning_mergeguard.merging import MergeConfig, merge

mergekit = pytest.importorskip("mergekit")
pytestmark = pytest.mark.mergekit


def run_mergekit(config: dict, out_dir, seed: int | None = None) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    if seed is not None:
        torch.manual_seed(seed)
    run_merge(MergeConfiguration.model_validate(config), str(out_dir), options=MergeOptions(copy_tokenizer=False))
    out = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def config(method: str, paths, *, weights=(0.6, 0.4), density=None, gamma=None, **params) -> dict:
    models = []
    for name, w in zip(["a", "b"], weights):
        p = {"weight": w}
        if density is not None:
            p["density"] = density
        if gamma is not None:
            p["gamma"] = gamma
        models.append({"model": str(paths[name]), "parameters": p})
    cfg = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = str(paths["base"])
    if params:
        cfg["parameters"] = params
    return cfg


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


EXACT = {
    "linear": ("linear", dict()),
    "linear_unnormalized": ("linear", dict(normalize=False)),
    "task_arithmetic": ("task_arithmetic", dict()),
    "task_arithmetic_lambda": ("task_arithmetic", {"lambda": 0.3}),
    "task_arithmetic_study": ("task_arithmetic", dict(weights=(0.7, 0.7))),
    "ties_normalize": ("ties", dict(density=0.4, normalize=True)),
    "ties_no_normalize": ("ties", dict(density=0.4, normalize=False)),
    "ties_rescale_lambda": ("ties", dict(density=0.5, rescale=True, **{"lambda": 1.5})),
    "breadcrumbs": ("breadcrumbs", dict(density=0.8, gamma=0.05)),
    "breadcrumbs_ties": ("breadcrumbs_ties", dict(density=0.8, gamma=0.05, normalize=True)),
    "dare_linear_density1": ("dare_linear", dict(density=1.0)),
    "dare_ties_density1": ("dare_ties", dict(density=1.0, normalize=True)),
    "della_density1": ("della", dict(density=1.0)),
    "della_linear_density1": ("della_linear", dict(density=1.0, **{"lambda": 0.8})),
    "nuslerp_task_vectors": ("nuslerp", dict(weights=(0.3, 0.7))),
    "nuslerp_row_wise": ("nuslerp", dict(weights=(0.6, 0.4), nuslerp_row_wise=True, nuslerp_flatten=False)),
}


def unweighted(method: str, paths, names=("a", "b", "c"), **params) -> dict:
    """A config whose models take no parameters (model_stock, sce)."""
    cfg = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[n])} for n in names],
        "dtype": "float32",
    }
    if params:
        cfg["parameters"] = params
    return cfg


UNWEIGHTED = {
    "model_stock": ("model_stock", ("a", "b"), {}),
    "model_stock_three_filter_wise": ("model_stock", ("a", "b", "c"), {"filter_wise": True}),
    "sce": ("sce", ("a", "b", "c"), {}),
    "sce_select_topk": ("sce", ("a", "b"), {"select_topk": 0.3}),
    "karcher_with_base": ("karcher", ("a", "b"), {}),
    "karcher_three_few_steps": ("karcher", ("a", "b", "c"), {"max_iter": 2, "tol": 1e-4}),
}


@pytest.mark.parametrize("case", sorted(UNWEIGHTED))
def test_unweighted_method_parity(case, llama_dirs, tmp_path):
    method, names, params = UNWEIGHTED[case]
    cfg = unweighted(method, llama_dirs, names, **params)
    assert max_diff(merge(cfg), run_mergekit(cfg, tmp_path / "mk")) <= 1e-6


def test_karcher_without_base_parity(llama_dirs, tmp_path):
    cfg = unweighted("karcher", llama_dirs)
    del cfg["base_model"]
    assert max_diff(merge(cfg), run_mergekit(cfg, tmp_path / "mk")) <= 1e-6


def test_nuslerp_without_base_parity(llama_dirs, tmp_path):
    cfg = config("nuslerp", llama_dirs, weights=(0.25, 0.75))
    del cfg["base_model"]
    assert max_diff(merge(cfg), run_mergekit(cfg, tmp_path / "mk")) <= 1e-6


@pytest.mark.parametrize("case", sorted(EXACT))
def test_exact_parity(case, llama_dirs, tmp_path):
    method, kwargs = EXACT[case]
    cfg = config(method, llama_dirs, **kwargs)
    ours = merge(cfg)
    theirs = run_mergekit(cfg, tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-6


def test_slerp_parity(llama_dirs, tmp_path):
    cfg = {
        "merge_method": "slerp",
        "base_model": str(llama_dirs["base"]),
        "models": [{"model": str(llama_dirs["base"])}, {"model": str(llama_dirs["a"])}],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    }
    assert max_diff(merge(cfg), run_mergekit(cfg, tmp_path / "mk")) <= 1e-6


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_dare_matches_in_expectation(method, llama_dirs, tmp_path):
    """One donor, weight 1: the kept fraction is ~density and the L1 norm of each task-vector tensor is kept."""
    cfg = config(method, llama_dirs, weights=(1.0,), density=0.4)
    cfg["models"] = cfg["models"][:1]
    base = load_file(llama_dirs["base"] / "model.safetensors")
    ft = load_file(llama_dirs["a"] / "model.safetensors")
    ours = merge(cfg, seed=1)
    theirs = run_mergekit(cfg, tmp_path / "mk", seed=1)
    for result in (ours, theirs):
        kept = sum(int(((result[k] - base[k]) != 0).sum()) for k in base)
        total = sum(base[k].numel() for k in base)
        assert abs(kept / total - 0.4) < 0.01
        for k in base:
            if base[k].numel() >= 1000:
                l1_tau = (ft[k] - base[k]).abs().sum()
                l1_merged = (result[k] - base[k]).abs().sum()
                assert torch.allclose(l1_merged, l1_tau, rtol=1e-3), k


STUDY = {
    "task_arithmetic": ("task_arithmetic", (0.7, 0.7), None, {}),
    "ties": ("ties", (0.6, 0.4), 0.4, {"normalize": True}),
    "dare_linear": ("dare_linear", (0.1, 0.9), 0.4, {}),
    "dare_ties": ("dare_ties", (0.1, 0.9), 0.4, {"normalize": True}),
}


@pytest.mark.parametrize("name", sorted(STUDY))
def test_study_configs_roundtrip_yaml_and_replay_in_mergekit(name, llama_dirs, tmp_path):
    """The merging-robustness study's four settings: load from YAML, run, write YAML, replay in mergekit."""
    method, weights, density, params = STUDY[name]
    cfg = MergeConfig.from_dict(config(method, llama_dirs, weights=weights, density=density, **params))
    text = cfg.to_yaml()
    again = MergeConfig.from_yaml(text)
    assert again.to_dict() == cfg.to_dict()
    import yaml

    if method.startswith("dare"):
        # Random drops: compare the merged task vector's total L1 mass, averaged over seeds.
        base = load_file(llama_dirs["base"] / "model.safetensors")

        def mass(result):
            return sum(float((result[k] - base[k]).abs().sum()) for k in base)

        ours = [mass(merge(again, seed=s)) for s in range(3)]
        theirs = [mass(run_mergekit(yaml.safe_load(text), tmp_path / f"mk{s}", seed=s)) for s in range(3)]
        assert sum(ours) == pytest.approx(sum(theirs), rel=0.03)
    else:
        assert max_diff(merge(again), run_mergekit(yaml.safe_load(text), tmp_path / "mk")) <= 1e-6


def test_file_to_file_output_loads_in_transformers(llama_dirs, tmp_path):
    from transformers import LlamaForCausalLM

    cfg = config("ties", llama_dirs, density=0.5)
    out = merge(copy.deepcopy(cfg), out=tmp_path / "merged")
    model = LlamaForCausalLM.from_pretrained(out)
    expected = run_mergekit(cfg, tmp_path / "mk")
    got = model.state_dict()
    assert max(float((got[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    assert (out / "mergekit_config.yml").is_file()


@pytest.fixture(scope="module")
def deep_llama_dirs(tmp_path_factory):
    """A 5-layer tiny Llama base and two fine-tunes: gradients take t = 0, 1/4, 1/2, 3/4, 1 across its layers."""
    from _helpers import TINY_LLAMA, perturbed_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("deep_llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 5}))
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i, name in enumerate(["a", "b"]):
        base_copy = copy.deepcopy(base)
        base_copy.load_state_dict(perturbed_state_dict(base.state_dict(), seed=20 + i))
        base_copy.save_pretrained(root / name)
        paths[name] = root / name
    return paths


GRADIENTS = {
    # mergekit's own SLERP example: t interpolated across the layers, per module kind, 0.5 elsewhere.
    "slerp_readme": (
        "slerp",
        {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        None,
    ),
    "ties_density_and_weight": (
        "ties",
        {"normalize": True},
        ({"weight": [1.0, 0.2], "density": [0.2, 0.9, 0.5]}, {"weight": [0.2, 1.0], "density": 0.6}),
    ),
    "task_arithmetic_lambda": ("task_arithmetic", {"lambda": [0.5, 1.5]}, ({"weight": 0.6}, {"weight": 0.4})),
    "linear_filtered_weight": (
        "linear",
        {},
        ({"weight": [{"filter": "mlp", "value": [0.1, 0.9, 0.3]}, {"value": 0.5}]}, {"weight": 0.5}),
    ),
    "dare_linear_rescale": (
        "dare_linear",
        {"rescale": [True, False]},
        ({"weight": [0.3, 1.0], "density": 1.0}, {"weight": 0.5, "density": 1.0}),
    ),
}


def _first_values(setting):
    """Every gradient replaced by its first value (what a merge that ignored the layers would use)."""
    if isinstance(setting, dict):
        return {k: _first_values(v) for k, v in setting.items()}
    if isinstance(setting, list):
        return _first_values(setting[0]) if not isinstance(setting[0], dict) else [_first_values(c) for c in setting]
    return setting


@pytest.mark.parametrize("case", sorted(GRADIENTS))
def test_gradient_parameters_match_mergekit(case, deep_llama_dirs, tmp_path):
    method, shared, per_model = GRADIENTS[case]
    paths = deep_llama_dirs
    if method == "slerp":
        models = [{"model": str(paths["base"])}, {"model": str(paths["a"])}]
    else:
        models = [{"model": str(paths[n]), "parameters": copy.deepcopy(p)} for n, p in zip("ab", per_model)]
    cfg = {"merge_method": method, "models": models, "parameters": shared, "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = str(paths["base"])
    ours = merge(copy.deepcopy(cfg))
    theirs = run_mergekit(copy.deepcopy(cfg), tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-6
    # The gradient matters: the last layer differs from a merge that took every gradient's first value.
    at_first = merge(_first_values(cfg))
    last = "model.layers.4.mlp.up_proj.weight"
    assert float((ours[last] - at_first[last]).abs().max()) > 1e-4


@pytest.mark.parametrize("where", ["listed", "top_level_weight"])
def test_linear_averages_a_base_model_the_config_names(where, llama_dirs, tmp_path):
    # mergekit gathers base_model's tensors with the models', and linear averages every tensor it gathers: the
    # base at its own weight (its models[] entry, or the top-level weight). The engine had left the base out.
    cfg = config("linear", llama_dirs, weights=(0.6, 0.3))
    cfg["base_model"] = str(llama_dirs["base"])
    if where == "listed":
        cfg["models"].append({"model": str(llama_dirs["base"]), "parameters": {"weight": 0.1}})
    else:
        cfg["parameters"] = {"weight": 0.2}
    ours = merge(cfg)
    assert max_diff(ours, run_mergekit(cfg, tmp_path / "mk")) <= 1e-6
    without = {**cfg, "models": cfg["models"][:2]}
    del without["base_model"]
    assert max_diff(ours, merge(without)) > 1e-3  # the base counts


def test_linear_refuses_a_base_model_without_a_weight(llama_dirs):
    # mergekit fails on it (the base's weight is None); the engine names the fix.
    cfg = config("linear", llama_dirs)
    cfg["base_model"] = str(llama_dirs["base"])
    with pytest.raises(ValueError, match=r"averages base_model .* and needs its 'weight': list it under models"):
        merge(cfg)


def test_without_dtype_a_bfloat16_model_merges_into_a_bfloat16_model(llama_dirs, tmp_path):
    # mergekit keeps each tensor in its stored dtype when the config names no dtype; the engine wrote float32 (a
    # model twice the size, in another dtype). It now writes the stored dtype, computing in float32, so it differs
    # from mergekit's bfloat16 arithmetic by bfloat16 rounding only.
    from transformers import AutoModelForCausalLM

    paths = {}
    for name in ("base", "a", "b"):
        m = AutoModelForCausalLM.from_pretrained(llama_dirs[name], torch_dtype=torch.bfloat16)
        m.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    cfg = config("task_arithmetic", paths)  # no trimming, whose choices bfloat16 rounding could move
    del cfg["dtype"]
    ours = load_file(merge(cfg, out=tmp_path / "ours") / "model.safetensors")
    theirs = run_mergekit(cfg, tmp_path / "mk")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16} == {t.dtype for t in theirs.values()}
    for k in ours:  # at most 4 bfloat16 ulps apart here (measured 0.0153 relative; mergekit rounds at every step)
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=2e-2, atol=2e-3)
    # dtype: float32 in the config writes float32, as before.
    assert (
        load_file(merge({**cfg, "dtype": "float32"}, out=tmp_path / "f32") / "model.safetensors")[
            "model.norm.weight"
        ].dtype
        == torch.float32
    )


def test_linear_without_base_model_ignores_a_base_given_as_reference(llama_dirs):
    # merge(cfg, base=...) with a linear config naming no base_model: the base is the reference for the base check
    # (and the probe's offline merges), not a model of the average.
    cfg = config("linear", llama_dirs, weights=(0.6, 0.3))
    alone = merge(cfg)
    assert max_diff(merge(cfg, base=str(llama_dirs["base"])), alone) == 0.0


def _entry(paths, name, **params):
    return {"model": str(paths[name]), **({"parameters": params} if params else {})}


USER_CONFIGS = {
    # Settings users write that the cases above do not cover, each checked against mergekit.
    "ties_top_level_weight_per_model_density": lambda p: {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "parameters": {"weight": 0.7},
        "models": [_entry(p, "a", density=0.3), _entry(p, "b", density=0.6)],
    },
    "task_arithmetic_negative_weight": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "models": [_entry(p, "a", weight=1.0), _entry(p, "b", weight=-0.5)],
    },
    "slerp_filtered_t": lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["a"]),
        "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]},
        "models": [_entry(p, "a"), _entry(p, "b")],
    },
    "task_arithmetic_bfloat16_lambda": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "dtype": "bfloat16",
        "parameters": {"lambda": 0.7},
        "models": [_entry(p, "a", weight=0.5), _entry(p, "b", weight=0.5)],
    },
    "task_arithmetic_out_dtype": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "models": [_entry(p, "a", weight=0.5), _entry(p, "b", weight=0.5)],
    },
}


@pytest.mark.parametrize("case", sorted(USER_CONFIGS))
def test_user_config_parity(case, llama_dirs, tmp_path):
    cfg = USER_CONFIGS[case](llama_dirs)
    ours, theirs = merge(copy.deepcopy(cfg)), run_mergekit(copy.deepcopy(cfg), tmp_path / "mk")
    assert {t.dtype for t in ours.values()} == {t.dtype for t in theirs.values()}
    assert max_diff(ours, theirs) == 0.0


def _sliced(paths, *sources, **extra) -> dict:
    """An output slice of ``(name, (start, end), parameters or None)`` sources."""
    entries = [
        {"model": str(paths[n]), "layer_range": list(r), **({"parameters": p} if p else {})} for n, r, p in sources
    ]
    return {"sources": entries, **extra}


SLICES = {
    # mergekit's examples/gradient-slerp.yml: one slice over every layer, t per module kind
    "gradient_slerp_example": lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["a"]),
        "slices": [_sliced(p, ("a", (0, 5), None), ("b", (0, 5), None))],
        "parameters": GRADIENTS["slerp_readme"][1],
    },
    "slerp_two_slices": lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["a"]),
        "slices": [
            _sliced(
                p, ("a", (0, 2), None), ("b", (0, 2), None), parameters={"t": [{"filter": "mlp", "value": [0.1, 0.9]}]}
            ),
            _sliced(p, ("a", (2, 5), None), ("b", (2, 5), None), parameters={"t": [0.2, 0.8]}),
        ],
        "parameters": {"t": 0.5},
    },
    # mergekit's examples/orcamini-platy-44layer.yml: a frankenmerge, 3 + 3 layers from two models
    "passthrough_frankenmerge": lambda p: {
        "merge_method": "passthrough",
        "slices": [_sliced(p, ("a", (0, 3), None)), _sliced(p, ("b", (2, 5), None))],
    },
    "passthrough_scale": lambda p: {
        "merge_method": "passthrough",
        "slices": [
            _sliced(p, ("a", (0, 2), {"scale": 0.5})),
            _sliced(p, ("b", (1, 4), {"scale": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]})),
        ],
    },
    "task_arithmetic_per_slice": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "slices": [
            _sliced(p, ("base", (0, 3), None), ("a", (0, 3), {"weight": 0.7}), ("b", (0, 3), {"weight": 0.2})),
            _sliced(
                p,
                ("base", (3, 5), None),
                ("a", (3, 5), None),
                ("b", (3, 5), {"weight": [0.1, 0.9]}),
                parameters={"weight": 0.4, "lambda": 1.3},
            ),
        ],
        "parameters": {"weight": 0.5},
    },
    "linear_base_not_a_source": lambda p: {
        "merge_method": "linear",
        "base_model": str(p["base"]),
        "slices": [_sliced(p, ("a", (0, 5), {"weight": 1.0}), ("b", (0, 5), {"weight": 3.0}))],
    },
    "ties_filtered_fallback": lambda p: {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "slices": [
            _sliced(
                p,
                ("base", (0, 5), None),
                ("a", (0, 5), {"weight": 0.6, "density": [{"filter": "self_attn", "value": 0.3}]}),
                ("b", (0, 5), {"weight": 0.4}),
                parameters={"density": 0.7},
            )
        ],
        "parameters": {"normalize": True},
    },
    "linear_offset_ranges": lambda p: {
        "merge_method": "linear",
        "slices": [
            _sliced(p, ("a", (0, 2), {"weight": 0.5}), ("b", (3, 5), {"weight": 0.5})),
            _sliced(p, ("a", (2, 5), {"weight": 0.5}), ("b", (0, 3), {"weight": 0.5})),
        ],
    },
    "slice_base_model": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "slices": [
            _sliced(p, ("base", (0, 2), None), ("a", (0, 2), {"weight": 1.0})),
            _sliced(p, ("a", (2, 5), None), ("b", (2, 5), {"weight": 0.5}), base_model=str(p["a"])),
        ],
    },
    # a model's filters match its own layer's name (layers.3. of a), not the output's (layers.0.)
    "filter_on_the_source_layer": lambda p: {
        "merge_method": "linear",
        "slices": [
            _sliced(
                p,
                ("a", (3, 5), {"weight": [{"filter": "layers.3.", "value": 0.9}, {"value": 0.5}]}),
                ("b", (0, 2), {"weight": 0.5}),
            )
        ],
    },
}


@pytest.mark.parametrize("case", sorted(SLICES))
def test_slices_match_mergekit(case, deep_llama_dirs, tmp_path):
    import json

    cfg = {**SLICES[case](deep_llama_dirs), "dtype": "float32"}
    out = merge(copy.deepcopy(cfg), out=tmp_path / "ours")
    ours = load_file(out / "model.safetensors")
    theirs = run_mergekit(copy.deepcopy(cfg), tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-6
    layers = [json.loads((d / "config.json").read_text())["num_hidden_layers"] for d in (out, tmp_path / "mk")]
    assert layers[0] == layers[1]


@pytest.fixture(scope="module")
def sparse_llama_dirs(tmp_path_factory):
    """A tiny Llama base and three fine-tunes that each change a random third of the entries (RAM's overlaps)."""
    from _helpers import tiny_llama

    root = tmp_path_factory.mktemp("sparse_llama")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i, name in enumerate("abc"):
        g = torch.Generator().manual_seed(40 + i)
        state = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.33)
            for k, v in base.state_dict().items()
        }
        model = tiny_llama()
        model.load_state_dict(state)
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


NEWER_METHODS = {
    "multislerp_base": ("multislerp", True, {"a": {"weight": 0.6}, "b": {"weight": 0.3}, "c": {"weight": 0.1}}, {}),
    "multislerp_no_base": ("multislerp", False, {"a": {"weight": 1.0}, "b": {"weight": 2.0}}, {}),
    "multislerp_unnormalized": (
        "multislerp",
        True,
        {"a": {"weight": 0.4}, "b": {"weight": 0.4}},
        {"normalize_weights": False},
    ),
    "nearswap": ("nearswap", True, {"a": {}}, {"t": 0.004}),
    "arcee_fusion": ("arcee_fusion", True, {"a": {}}, {}),
    "ram": ("ram", True, {"a": {}, "b": {}, "c": {}}, {}),
    "ram_epsilon": ("ram", True, {"a": {}, "b": {}}, {"epsilon": 0.005}),
    "ramplus_tl": ("ramplus_tl", True, {"a": {}, "b": {}, "c": {}}, {"r": 0.3, "alpha": 0.5}),
}


@pytest.mark.parametrize("case", sorted(NEWER_METHODS))
def test_newer_mergekit_methods_match_mergekit(case, sparse_llama_dirs, tmp_path):
    method, with_base, models, shared = NEWER_METHODS[case]
    paths = sparse_llama_dirs
    cfg = {
        "merge_method": method,
        "models": [{"model": str(paths[n]), **({"parameters": p} if p else {})} for n, p in models.items()],
        "dtype": "float32",
        **({"base_model": str(paths["base"])} if with_base else {}),
        **({"parameters": shared} if shared else {}),
    }
    ours = merge(copy.deepcopy(cfg))
    theirs = run_mergekit(copy.deepcopy(cfg), tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-6
    # the merge is neither the base nor any one model
    for n in ("base", *models):
        single = load_file(paths[n] / "model.safetensors")
        assert max_diff(ours, single) > 1e-4

"""Residual-stream permutation: the same function, frankenmerges broken, the attack that undoes it, the checks."""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import TINY_LLAMA, perturbed_state_dict
from torch import nn

from lightning_mergeguard.merging import merge
from lightning_mergeguard.protection.release.amplify import amplify_checked
from lightning_mergeguard.protection.release.residual import (
    ResidualStream,
    check_permute_residual,
    draw_permutation,
    estimate_permutation,
    find_residual_stream,
    permute_residual,
    unpermute_residual,
)
from lightning_mergeguard.protection.stage2 import Stage2Context


def _causal_lm(model_type: str = "llama", seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(model_type, **{**TINY_LLAMA, "head_dim": 8, **extra})
    except ValueError:
        pytest.skip(f"this transformers has no {model_type}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).detach().norm() / y.detach().norm())


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {}),
        ("qwen2", {}),
        ("gemma", {}),  # 1 + w norms and embeddings scaled by sqrt(hidden)
        ("gemma2", {}),  # sandwich norms around attention and MLP
        ("olmo", {}),  # LayerNorm without weights
    ],
)
def test_a_causal_lm_computes_the_same_function_with_its_stream_permuted(device, model_type, extra):
    model = _causal_lm(model_type, **extra).to(device)
    stream = find_residual_stream(model)
    assert stream is not None and stream.width == TINY_LLAMA["hidden_size"]
    names = {n for n, _ in stream.axes}
    assert "model.embed_tokens.weight" in names and ("lm_head.weight" in names) != model.config.tie_word_embeddings
    assert all(n in names for n in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.up_proj.weight"))
    ids = torch.randint(0, 64, (2, 9), device=device)
    with torch.no_grad():
        want = model(ids).logits
        perm = draw_permutation(stream.width, seed=1)
        assert not bool((perm == torch.arange(stream.width)).any())  # no channel stays where it was
        model.load_state_dict(permute_residual(model.state_dict(), stream, perm), strict=False)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert _rel(model.model.embed_tokens.weight, model.model.embed_tokens.weight[:, torch.argsort(perm)]) > 0.5


def test_an_open_clip_tower_computes_the_same_function_with_its_stream_permuted():
    from lightning_mergeguard.models.open_clip import build_open_clip

    torch.manual_seed(0)
    visual = build_open_clip("tiny").visual.eval()
    stream = find_residual_stream(visual)
    assert stream is not None and stream.width == visual.class_embedding.numel()
    assert {"conv1.weight", "positional_embedding", "ln_post.weight", "proj"} <= {n for n, _ in stream.axes}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = visual(x)
        visual.load_state_dict(permute_residual(visual.state_dict(), stream, draw_permutation(stream.width)))
        torch.testing.assert_close(visual(x), want, rtol=1e-4, atol=1e-4)


def test_a_frankenmerge_of_a_permuted_model_mixes_mismatched_channels():
    """Half of the owner's layers under half of a partner's: close to the owner's outputs, unless the stream is
    permuted; the whole permuted model alone still computes the owner's function."""
    owner = _causal_lm(num_hidden_layers=4)
    partner = _causal_lm(num_hidden_layers=4)
    partner.load_state_dict(perturbed_state_dict(owner.state_dict(), seed=5, scale=0.0005))
    stream = find_residual_stream(owner)
    assert stream is not None
    permuted = permute_residual(owner.state_dict(), stream, draw_permutation(stream.width))
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "owner", "layer_range": [0, 2]}]},
            {"sources": [{"model": "partner", "layer_range": [2, 4]}]},
        ],
    }
    ids = torch.randint(0, 64, (2, 9))
    probe = _causal_lm(num_hidden_layers=4)

    def logits(state):
        probe.load_state_dict(state)
        with torch.no_grad():
            return probe(ids).logits

    want = logits(owner.state_dict())
    plain = merge(cfg, {"owner": owner.state_dict(), "partner": partner.state_dict()}, check_base=False)
    franken = merge(cfg, {"owner": permuted, "partner": partner.state_dict()}, check_base=False)
    assert _rel(logits(plain), want) < 0.1
    assert _rel(logits(franken), want) > 0.5
    torch.testing.assert_close(logits(permuted), want, rtol=1e-4, atol=1e-4)


def test_matching_the_embeddings_to_the_base_finds_the_permutation():
    """The attack: a fine-tune stays near theta_pre, so its permuted channels are found and put back exactly."""
    base = _causal_lm()
    ft = perturbed_state_dict(base.state_dict(), seed=3, scale=0.002)
    stream = find_residual_stream(base)
    assert stream is not None
    perm = draw_permutation(stream.width, seed=7)
    permuted = permute_residual(ft, stream, perm)
    found = estimate_permutation(permuted, base.state_dict(), stream)
    assert torch.equal(found, perm)
    back = unpermute_residual(permuted, stream, found)
    assert all(torch.equal(back[k], ft[k]) for k in ft)


def test_models_whose_stream_readers_are_not_all_known_give_none():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    assert find_residual_stream(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))) is None
    assert find_residual_stream(LlamaModel(LlamaConfig(**TINY_LLAMA))) is None  # its output is the stream itself
    two = nn.ModuleDict({"a": _causal_lm(), "b": _causal_lm()})
    assert find_residual_stream(two) is None
    wrapped = nn.ModuleDict({"lm": _causal_lm()})
    stream = find_residual_stream(wrapped)
    assert stream is not None and stream.anchors == ("lm.model.embed_tokens.weight",)


def test_bad_permutations_and_arguments_are_refused():
    s = ResidualStream(3, (("w", 0),), ("w",))
    with pytest.raises(ValueError, match="permutation of range"):
        permute_residual({"w": torch.zeros(3)}, s, torch.tensor([0, 0, 1]))
    with pytest.raises(KeyError, match="'w'"):
        permute_residual({}, s, torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="set amplify too"):
        check_permute_residual(True, None)
    with pytest.raises(ValueError, match="True or False"):
        check_permute_residual("yes", 100.0)
    assert check_permute_residual(False, None) is False
    for n, seed in itertools.product((1, 2, 3, 5, 64), range(4)):
        perm = draw_permutation(n, seed)
        assert sorted(perm.tolist()) == list(range(n)) and (n == 1 or not bool((perm == torch.arange(n)).any()))


def _context(model, batch, warnings_seen):
    return Stage2Context(
        module=model,
        params={},
        reference={},
        batches=itertools.repeat(batch),
        metric=lambda: 50.0,
        loss_fn=lambda m, b: m(**b).loss,
        before=50.0,
        tolerance=1.0,
        warn=warnings_seen.append,
    )


def test_amplify_checked_permutes_the_stream_after_the_symmetries_and_reports_it():
    model = _causal_lm()
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        want = model(ids).logits
    seen: list[str] = []
    score, report = amplify_checked(model, 100.0, _context(model, batch, seen), 50.0, permute_residual=True)
    assert score == 50.0  # the metric after both layers
    assert report["applied"] and report["residual"]["applied"] and seen == []
    assert report["residual"]["width"] == TINY_LLAMA["hidden_size"] and report["residual"]["change"] <= 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    # Both layers are there: the norms were scaled up (amplify), and the embedding's columns moved (permutation).
    assert float(model.model.layers[0].input_layernorm.weight.detach().max()) > 5.0


def test_the_checked_layers_write_exactly_what_the_benchmark_applies_to_a_state_dict():
    """protection.py's grid applies ``amplify_state`` then ``permute_residual`` to a fine-tune's state dict; the
    callback's path (``amplify_checked`` with no stage 2 under it) must write the very same weights, so the grid's
    rows are what a user gets, here at the grid's 2**20."""
    from lightning_mergeguard.protection.release.symmetry import amplify_state, find_symmetries

    model = _causal_lm()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups, stream = find_symmetries(model), find_residual_stream(model)
    want = permute_residual(amplify_state(state, groups, 2.0**20), stream, draw_permutation(stream.width))
    ids = torch.randint(0, 64, (2, 9))
    seen: list[str] = []
    _, report = amplify_checked(
        model, 2.0**20, _context(model, {"input_ids": ids, "labels": ids}, seen), 50.0, permute_residual=True
    )
    assert report["applied"] and report["residual"]["applied"] and seen == []
    got = model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_a_stream_reader_the_layout_misses_is_caught_and_the_permutation_undone(monkeypatch):
    from lightning_mergeguard.protection.release import amplify, residual

    model = _causal_lm()
    real = residual.find_residual_stream

    def missing_final_norm(module):  # as if the model read its stream somewhere the layout does not list
        s = real(module)
        return ResidualStream(s.width, tuple(a for a in s.axes if not a[0].startswith("model.norm.")), s.anchors)

    monkeypatch.setattr(amplify, "find_residual_stream", missing_final_norm)
    model.model.norm.weight.data.uniform_(0.5, 2.0)  # a final norm whose weight is not all ones
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    seen: list[str] = []
    _, report = amplify_checked(model, 100.0, _context(model, batch, seen), 50.0, permute_residual=True)
    assert not report["residual"]["applied"] and report["applied"]  # the symmetries stay, the permutation goes
    assert any("permutation undone" in w for w in seen)
    emb = model.model.embed_tokens.weight
    base = _causal_lm()
    assert torch.equal(emb, base.model.embed_tokens.weight)  # put back exactly (amplify leaves embeddings alone)


def test_a_model_without_a_recognised_stream_is_amplified_without_it():
    from lightning_mergeguard.models.open_clip import build_open_clip

    torch.manual_seed(0)
    clip = build_open_clip("tiny")
    both = nn.ModuleDict({"a": clip.visual, "b": build_open_clip("tiny").visual})  # two towers: refused
    x = torch.randn(2, 3, 32, 32)
    batch = (x, torch.zeros(2, dtype=torch.long))

    def loss_fn(m, b):
        return m["a"](b[0]).square().mean() + m["b"](b[0]).square().mean()

    seen: list[str] = []
    ctx = Stage2Context(
        module=both,
        params={},
        reference={},
        batches=itertools.repeat(batch),
        metric=lambda: 50.0,
        loss_fn=loss_fn,
        before=50.0,
        tolerance=1.0,
        warn=seen.append,
    )
    _, report = amplify_checked(both, 100.0, ctx, 50.0, permute_residual=True)
    assert report["applied"] and not report["residual"]["applied"] and "no residual stream" in seen[0]

"""Amplifying symmetries: exact function preservation, amplification of merged-in updates, re-alignment."""

from __future__ import annotations

import pytest
import torch
from _helpers import TINY_LLAMA, perturbed_state_dict, tiny_llama
from torch import nn

from lightning_mergeguard.protection.release.symmetry import (
    Factor,
    SymmetryGroup,
    amplify_module_,
    amplify_state,
    apply_scales,
    draw_scales,
    find_symmetries,
    realign,
    symmetry_errors,
)


def _llama(heads: int = 2, kv_heads: int = 2, seed: int = 0, **extra):
    return tiny_llama(seed, num_attention_heads=heads, num_key_value_heads=kv_heads, **extra).eval()


def _pair(make, scale=0.002):
    base, ft = make(), make()
    ft.load_state_dict(perturbed_state_dict(base.state_dict(), seed=3, scale=scale))
    return base, ft


def _tv(a, b):
    return {k: a[k] - b[k] for k in a}


def _rel(x, y):
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("heads,kv_heads,bias", [(2, 2, False), (4, 2, False), (4, 2, True)])
def test_llama_function_is_kept_exactly_and_every_block_kind_is_found(device, heads, kv_heads, bias):
    base, ft = _pair(lambda: _llama(heads, kv_heads, attention_bias=bias))
    ft.to(device)
    ids = torch.randint(0, 64, (2, 9), device=device)
    with torch.no_grad():
        want = ft(ids).logits
    report = amplify_module_(ft, strength=100.0, seed=1)
    # two layers: input norm -> q/k/v, post-attention norm -> gate/up, q/k, v/o, up/down in each
    assert report["groups"] == {"norm->linear": 4, "q/k": 2, "v/o": 2, "up/down": 2}
    with torch.no_grad():
        got = ft(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    w = ft.model.layers[0].self_attn.o_proj.weight
    assert w.device.type == device.type
    # the divided tensors are now far from the base: up to 100x smaller channels
    assert _rel(ft.model.layers[0].mlp.down_proj.weight.cpu(), base.model.layers[0].mlp.down_proj.weight) > 0.5


def test_open_clip_tower_is_kept_exactly():
    from lightning_mergeguard.models.open_clip import build_open_clip

    torch.manual_seed(0)
    visual = build_open_clip("tiny").visual.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = visual(x)
    report = amplify_module_(visual, strength=1000.0)
    layers = len(visual.transformer.resblocks)
    assert report["groups"] == {"norm->linear": 2 * layers, "q/k": layers, "v/o": layers}
    with torch.no_grad():
        torch.testing.assert_close(visual(x), want, rtol=1e-4, atol=1e-4)


def test_merges_that_add_a_partner_stop_computing_the_owners_function():
    """Owner at weight 1 plus a partner at 0.1, and a uniform merge: the amplified owner's outputs move >10x more."""
    base, owner = _pair(_llama)
    partner = _llama()
    partner.load_state_dict(perturbed_state_dict(base.state_dict(), seed=9, scale=0.002))
    pre, own_sd, part = base.state_dict(), owner.state_dict(), partner.state_dict()
    amplified = amplify_state(own_sd, find_symmetries(owner), strength=1000.0)
    ids = torch.randint(0, 64, (4, 12))
    probe = _llama()

    def logits(state):
        probe.load_state_dict(state)
        with torch.no_grad():
            return probe(ids).logits

    want = logits(own_sd)
    tp = _tv(part, pre)
    for merged in (
        lambda o: {k: o[k] + 0.1 * tp[k] for k in o},  # owner weight 1, partner 0.1
        lambda o: {k: pre[k] + 0.3 * (o[k] - pre[k] + tp[k]) for k in o},  # uniform TA lambda 0.3
    ):
        plain = _rel(logits(merged(own_sd)), want)
        attacked = _rel(logits(merged(amplified)), want)
        assert attacked > 10 * plain, (plain, attacked)


def test_realign_recovers_the_weights_underneath():
    """The anchor re-alignment attack: merges of the re-aligned model behave like merges of the fine-tune."""
    base, ft = _pair(lambda: _llama(4, 2), scale=0.0005)
    partner = _llama(4, 2)
    partner.load_state_dict(perturbed_state_dict(base.state_dict(), seed=9, scale=0.0005))
    groups = find_symmetries(ft)
    sd, pre, part = ft.state_dict(), base.state_dict(), partner.state_dict()
    amplified = amplify_state(sd, groups, strength=1000.0, seed=5)
    back = realign(amplified, pre, groups)
    keys = sorted({f.name for g in groups for f in g.factors})
    far = sum(float((amplified[k] - sd[k]).norm()) for k in keys)
    near = sum(float((back[k] - sd[k]).norm()) for k in keys)
    tau = sum(float((sd[k] - pre[k]).norm()) for k in keys)
    assert near < 1e-3 * far and near < tau, (near, far, tau)
    ids = torch.randint(0, 64, (4, 12))
    probe = _llama(4, 2)

    def merged_logits(owner):
        probe.load_state_dict({k: owner[k] + 0.1 * (part[k] - pre[k]) for k in owner})
        with torch.no_grad():
            return probe(ids).logits

    want = merged_logits(sd)
    assert _rel(merged_logits(back), want) < 0.1 * _rel(merged_logits(amplified), want)


class _OnePlusNorm(nn.Module):
    """Gemma's RMSNorm: ``x * (1 + w)``, not linear in ``w``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)


def test_norms_not_linear_in_their_weight_are_left_out():
    model = _llama()
    for layer in model.model.layers:
        layer.input_layernorm = _OnePlusNorm(16)
    kinds = [g.kind for g in find_symmetries(model)]
    assert kinds.count("norm->linear") == 2  # only the post-attention norms
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
        amplify_module_(model, strength=50.0)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_sandwich_norm_layers_are_not_rescaled():
    model = _llama()
    model.model.layers[0].pre_feedforward_layernorm = nn.Identity()
    assert len(find_symmetries(model)) == 5  # layer 1 only


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="no block it can rescale"):
        amplify_module_(nn.Linear(2, 2))
    for bad in (1.0, 1.5, float("inf"), True, "100"):
        with pytest.raises(ValueError, match="strength must be"):
            draw_scales([], bad)
    g = SymmetryGroup("v/o", 2, (Factor("v", 0, 1), Factor("o", 1, -1)))
    state = {"v": torch.ones(2, 3), "o": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="finite positive scales"):
        apply_scales(state, [g], [torch.tensor([1.0, 0.0])])
    with pytest.raises(KeyError, match="'o'"):
        apply_scales({"v": torch.ones(2, 3)}, [g], [torch.ones(2)])
    with pytest.raises(ValueError, match="1 symmetry groups but 0"):
        apply_scales(state, [g], [])


def test_scales_are_reproducible_and_dtype_is_kept():
    g = SymmetryGroup("v/o", 2, (Factor("v", 0, 1), Factor("o", 1, -1)))
    state = {"v": torch.ones(2, 3, dtype=torch.bfloat16), "o": torch.ones(3, 2, dtype=torch.bfloat16)}
    a, b = amplify_state(state, [g], 10.0, seed=2), amplify_state(state, [g], 10.0, seed=2)
    assert a["v"].dtype == torch.bfloat16 and torch.equal(a["v"], b["v"]) and torch.equal(a["o"], b["o"])
    s = draw_scales([g], 10.0, seed=2)[0]
    assert bool(((s >= 1) & (s <= 10)).all())


@pytest.mark.parametrize("strength", [1000.0, 2.0**20])
def test_powers_of_two_keep_a_bf16_model_bit_for_bit(device, strength):
    """Scales are powers of two, so ``w * s`` and ``w / s`` round nowhere: bf16 logits are unchanged exactly, up to
    scales of 2**20 (bf16 has fp32's exponent range)."""
    model = _llama(4, 2, attention_bias=True).to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), device=device)
    with torch.no_grad():
        want = model(ids).logits
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    report = amplify_module_(model, strength=strength, forward=lambda: model(ids))
    assert report["dropped"] == [] and set(report["checked"].values()) == {0.0}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    ratio = (before.float() / model.model.layers[0].mlp.down_proj.weight.float()).flatten()
    ratio = ratio[torch.isfinite(ratio)]
    assert torch.equal(ratio.log2(), ratio.log2().round()) and float(ratio.max()) > 64


class _SubNormLinear(nn.Linear):
    """A linear with a norm on its input (BitNet's sub-norms): the pair it ends is no longer a symmetry."""

    def forward(self, x):
        return super().forward(x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def test_a_block_that_only_looks_symmetric_is_checked_and_left_out():
    """A sub-norm before down_proj breaks up/down: the forward check drops that kind, the rest is applied exactly."""
    model = _llama()
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        layer.mlp.down_proj = _SubNormLinear(down.in_features, down.out_features, bias=False)
        layer.mlp.down_proj.load_state_dict(down.state_dict())
    assert [g.kind for g in find_symmetries(model)].count("up/down") == 2  # it looks like a Llama MLP
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    report = amplify_module_(model, strength=1000.0, forward=lambda: model(ids))
    assert report["dropped"] == ["up/down"] and report["checked"]["up/down"] > 0.1
    assert "up/down" not in report["groups"] and report["groups"]["v/o"] == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    # without a forward given, the check runs on random tokens (it used to trust the names and change the model)
    trusting = _llama()
    trusting.load_state_dict(model.state_dict())
    for layer in trusting.model.layers:
        down = layer.mlp.down_proj
        layer.mlp.down_proj = _SubNormLinear(down.in_features, down.out_features, bias=False)
        layer.mlp.down_proj.load_state_dict(down.state_dict())
    report = amplify_module_(trusting, strength=1000.0)
    assert report["dropped"] == ["up/down"]
    with torch.no_grad():
        assert _rel(trusting(ids).logits, want) < 1e-5


class _PostNormBlock(nn.Module):
    """open_clip's attribute names (ln_1, attn, ln_2, mlp.c_fc) around a post-norm block: x = ln(x + f(x))."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        x = self.ln_1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln_2(x + self.mlp(x))


def test_a_post_norm_block_with_open_clip_names_is_checked_without_a_forward():
    """The names match open_clip's pre-norm block; rescaling its norms changed the output 540x. With no forward
    given, each block is now run on random input first and the kinds that change it are left out."""
    torch.manual_seed(0)
    model = nn.Sequential(_PostNormBlock(), _PostNormBlock())
    for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        want = model(x)
    assert "norm->linear" in {g.kind for g in find_symmetries(model)}
    report = amplify_module_(model, strength=1000.0)
    assert "norm->linear" in report["dropped"] and "norm->linear" not in report["groups"]
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-5


def test_a_block_that_cannot_be_checked_alone_or_through_a_model_is_refused_by_name():
    from lightning_mergeguard.protection.release.symmetry import self_check_forward

    block = _PostNormBlock()
    block.forward = lambda x, mask: x  # needs an argument the check cannot invent
    groups = find_symmetries(nn.ModuleDict({"blk": block}))
    with pytest.raises(ValueError, match=r"cannot check block 'blk' of ModuleDict on its own: pass forward="):
        self_check_forward(nn.ModuleDict({"blk": block}), groups)


def _amplify_family(model_type: str, **extra) -> dict:
    """Amplify a tiny ``model_type`` causal LM with the forward check; assert its logits are kept bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(model_type, **{**TINY_LLAMA, "head_dim": 8, **extra})
    except ValueError:
        pytest.skip(f"this transformers has no {model_type}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    report = amplify_module_(model, strength=1000.0, forward=lambda: model(ids))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    return report


@pytest.mark.parametrize(
    "model_type,extra,dropped",
    [
        ("stablelm", {"use_parallel_residual": True}, ["norm->linear"]),  # the input norm also feeds the MLP
        ("diffllama", {}, ["v/o"]),  # a norm over pairs of heads between V and O
        ("bitnet", {}, ["up/down", "v/o"]),  # sub-norms before o_proj and down_proj
    ],
)
def test_real_lookalike_architectures_are_caught(model_type, extra, dropped):
    report = _amplify_family(model_type, **extra)
    assert report["dropped"] == dropped and report["groups"]


def test_a_forward_that_is_not_repeatable_cannot_be_checked():
    model = _llama()
    calls = iter(range(100))
    with pytest.raises(ValueError, match="cannot check the symmetries"):
        amplify_module_(model, 100.0, forward=lambda: model(torch.full((1, 4), next(calls) % 64)))
    errors = symmetry_errors(model, [], [], lambda: None)  # no block ever ran
    assert errors == {"repeat": float("inf")}


def test_float16_weights_that_would_lose_precision_are_refused_with_the_reason():
    """float16 is subnormal below 6.1e-5: divided weights round, so the check leaves those kinds out (or refuses,
    naming why), and the model computes bit for bit what it did."""
    model = _llama()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.01 if p.dim() == 2 else 1.0)  # small weights, as in wide layers: divided, they turn subnormal
    model.half()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    norms = [g for g in find_symmetries(model) if g.kind == "norm->linear"]
    with pytest.raises(ValueError, match="float16 weights lost precision"):
        amplify_module_(model, strength=1000.0, groups=norms, forward=lambda: model(ids))
    report = amplify_module_(model, strength=1000.0, forward=lambda: model(ids))
    assert report["dropped"] == ["norm->linear"] and report["checked"]["norm->linear"] > 1e-5
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize(
    "model_type,kinds",
    [
        ("mistral", {"norm->linear", "q/k", "v/o", "up/down"}),
        ("qwen2", {"norm->linear", "q/k", "v/o", "up/down"}),
        ("qwen3", {"norm->linear", "v/o", "up/down"}),  # per-head Q/K norms: no q/k
        ("gemma", {"q/k", "v/o", "up/down"}),  # 1 + w norms: no norm->linear
        ("olmo", {"q/k", "v/o", "up/down"}),  # LayerNorm without weights
        ("granite", {"norm->linear", "q/k", "v/o", "up/down"}),
    ],
)
def test_other_llama_style_families_are_kept_bit_for_bit(model_type, kinds):
    report = _amplify_family(model_type)
    assert set(report["groups"]) == kinds and report["dropped"] == []


def test_estimate_scales_stops_once_converged_and_agrees_with_thirty_rounds():
    """The default stops when no scale moves by more than ``exp(tol)``; it leaves the input untouched."""
    from lightning_mergeguard.protection.release.symmetry import estimate_scales

    base, ft = _pair(lambda: _llama(4, 2))
    groups = find_symmetries(ft)
    pre, sd = base.state_dict(), ft.state_dict()
    amplified = amplify_state(sd, groups, strength=64.0, seed=2)
    kept = {k: v.clone() for k, v in amplified.items()}
    full = estimate_scales(amplified, pre, groups, rounds=30, tol=0.0)
    fast = estimate_scales(amplified, pre, groups)
    assert all(torch.equal(kept[k], amplified[k]) for k in kept)
    worst = max(float((a.log() - b.log()).abs().max()) for a, b in zip(fast, full, strict=True))
    assert worst < 1e-3, worst
    drawn = draw_scales(groups, 64.0, seed=2)
    off = max(float((a.log() - b.log()).abs().max()) for a, b in zip(fast, drawn, strict=True))
    assert off < 0.1, off  # the drawn scales, up to what the fine-tune's drift hides (log 64 = 4.2)


def test_estimate_scales_reads_channels_along_any_dim_of_a_conv_weight():
    """A factor on dim 1 of a 4-D weight: each channel's norm is over every other dim (the slice, not a reshape)."""
    from lightning_mergeguard.protection.release.symmetry import estimate_scales

    g = SymmetryGroup("conv", 3, (Factor("w", 1, 1),))
    anchor = {"w": torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))}
    scales = torch.tensor([2.0, 0.5, 8.0])
    scaled = apply_scales(anchor, [g], [scales])
    assert torch.allclose(estimate_scales(scaled, anchor, [g])[0], scales.double(), rtol=1e-6)

"""The PaRaMS-style baseline preserves the function exactly and moves the weights away from the base; the
anchor re-alignment attack undoes it."""

from __future__ import annotations

import torch
from _helpers import TINY_LLAMA, perturbed_state_dict, tiny_llama

from lightning_mergeguard.baselines import (
    params_llama,
    params_mlp_chain,
    params_open_clip,
    realign_llama,
    realign_open_clip,
)
from lightning_mergeguard.demos.digits import MLPBackbone


def distance(a, b, keys):
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) ** 0.5


def test_params_llama_is_function_preserving_and_far_from_base():
    base = tiny_llama()
    ft = tiny_llama()
    ft.load_state_dict(perturbed_state_dict(base.state_dict(), seed=3))
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = ft(ids).logits
    state = params_llama(
        ft.state_dict(),
        base.state_dict(),
        num_layers=2,
        num_heads=TINY_LLAMA["num_attention_heads"],
        num_kv_heads=TINY_LLAMA["num_key_value_heads"],
    )
    defended = tiny_llama()
    defended.load_state_dict(state)
    with torch.no_grad():
        got = defended(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    keys = [k for k in state if ".layers." in k]
    assert distance(state, base.state_dict(), keys) > 10 * distance(ft.state_dict(), base.state_dict(), keys)


def test_params_mlp_chain_is_function_preserving_and_mismatched():
    torch.manual_seed(0)
    base = MLPBackbone(32, 3)
    ft = MLPBackbone(32, 3)
    ft.load_state_dict(perturbed_state_dict(base.state_dict(), seed=1, scale=0.01))
    x = torch.randn(5, 64)
    state = params_mlp_chain(ft.state_dict(), base.state_dict(), ["0", "2", "4"])
    defended = MLPBackbone(32, 3)
    defended.load_state_dict(state)
    torch.testing.assert_close(defended(x), ft(x))
    assert not torch.equal(state["0.weight"], ft.state_dict()["0.weight"])
    keys = ["0.weight", "2.weight"]
    assert distance(state, base.state_dict(), keys) > 5 * distance(ft.state_dict(), base.state_dict(), keys)


def _gqa_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2}))


def test_realign_llama_undoes_params_with_grouped_query_attention():
    base, ft = _gqa_llama(), _gqa_llama()
    ft.load_state_dict(perturbed_state_dict(base.state_dict(), seed=4, scale=0.002))
    heads = dict(num_layers=2, num_heads=4, num_kv_heads=2)
    defended = params_llama(ft.state_dict(), base.state_dict(), seed=1, **heads)
    restored = realign_llama(defended, base.state_dict(), **heads)
    model = _gqa_llama()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = ft(ids).logits
        for state in (defended, restored):
            model.load_state_dict(state)
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    keys = [k for k in defended if ".layers." in k]
    ft_sd = ft.state_dict()
    # Re-alignment brings the weights back next to the fine-tune (small residue from estimating the scales).
    assert distance(restored, ft_sd, keys) < 0.05 * distance(defended, ft_sd, keys)
    # On an undefended fine-tune it changes (almost) nothing.
    untouched = realign_llama(ft_sd, base.state_dict(), **heads)
    assert distance(untouched, ft_sd, keys) < 0.05 * distance(ft_sd, base.state_dict(), keys)


def test_params_open_clip_preserves_the_tower_and_realign_undoes_it():
    from lightning_mergeguard.models.open_clip import build_open_clip

    torch.manual_seed(0)
    base = build_open_clip("tiny").visual.eval()
    ft = build_open_clip("tiny").visual.eval()
    ft.load_state_dict(base.state_dict())
    ft.load_state_dict(perturbed_state_dict(base.state_dict(), seed=2, scale=0.002))
    layers = len(ft.transformer.resblocks)
    heads = ft.transformer.resblocks[0].attn.num_heads
    defended = params_open_clip(ft.state_dict(), base.state_dict(), num_layers=layers, num_heads=heads)
    x = torch.randn(3, 3, 32, 32)
    model = build_open_clip("tiny").visual.eval()
    with torch.no_grad():
        want = ft(x)
        model.load_state_dict(defended)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    keys = [k for k in defended if "resblocks" in k]
    ft_sd = ft.state_dict()
    assert distance(defended, base.state_dict(), keys) > 10 * distance(ft_sd, base.state_dict(), keys)
    restored = realign_open_clip(defended, base.state_dict(), num_layers=layers, num_heads=heads)
    assert distance(restored, ft_sd, keys) < 0.05 * distance(defended, ft_sd, keys)

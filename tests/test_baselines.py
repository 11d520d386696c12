"""The PaRaMS-style baseline preserves the function exactly and moves the weights away from the base."""

from __future__ import annotations

import torch
from conftest import TINY_LLAMA, perturbed_state_dict, tiny_llama

from lightning_mergeguard.baselines import params_llama, params_mlp_chain
from lightning_mergeguard.toy import MLPBackbone


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

"""The scale-adversarial stage-2 gradient is exact, for exact and for DARE-style (masked) scaled copies."""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_llama
from torch import nn

from lightning_mergeguard.protection.stage2.scale_adversarial import ScaleAdversarial, scale_adversarial_


def _loss(module, batch):
    x, y = batch
    return ((module(x) - y) ** 2).mean()


def _grad(w, x, y):
    w = w.detach().clone().requires_grad_(True)
    ((x @ w.T - y) ** 2).mean().backward()
    return w.grad


@pytest.mark.parametrize("drop_density", [None, 0.5])
def test_gradient_matches_the_formula(drop_density):
    torch.manual_seed(0)
    net = nn.Linear(6, 1, bias=False)
    ref = {"weight": net.weight.detach().clone() - 0.3}
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    grads, weights = [], [net.weight.detach().clone()]
    scale_adversarial_(
        net,
        {"weight": net.weight},
        ref,
        [(x, y)],
        _loss,
        steps=2,
        scales=(0.5,),
        clip=1e9,
        lr=1e-3,
        grad_reduce=lambda g: grads.append(g.clone()) or g,
        check_every=1,
        check=lambda step: weights.append(net.weight.detach().clone()),
        drop_density=drop_density,
        seed=7,
    )
    s, r = 0.5, ref["weight"]
    live = weights[0]
    want0 = _grad(live, x, y) - s * _grad(r + s * (live - r), x, y)
    torch.testing.assert_close(grads[0], want0)
    live = weights[1]
    if drop_density is None:
        want1 = _grad(live, x, y) - s * _grad(r + s * (live - r), x, y)
    else:  # step 1 uses the first mask drawn from the seeded generator
        m = (torch.rand(live.shape, generator=torch.Generator().manual_seed(7)) < drop_density).float()
        copy = r + (s / drop_density) * m * (live - r)
        want1 = _grad(live, x, y) - s * (m / drop_density) * _grad(copy, x, y)
    torch.testing.assert_close(grads[1], want1)


def test_keep_scaled_adds_the_kept_batches_gradient_at_each_scaled_copy():
    """With keep_scaled, the gradient also holds s * grad L_keep at the scaled copy (minimised there): exact."""
    torch.manual_seed(0)
    net = nn.Linear(6, 1, bias=False)
    ref = {"weight": net.weight.detach().clone() - 0.3}
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    xk, yk = torch.randn(4, 6), torch.randn(4, 1)
    grads, start = [], net.weight.detach().clone()
    scale_adversarial_(
        net,
        {"weight": net.weight},
        ref,
        [(x, y)],
        _loss,
        steps=1,
        scales=(0.5,),
        clip=1e9,
        lr=1e-3,
        grad_reduce=lambda g: grads.append(g.clone()) or g,
        keep_batches=[(xk, yk)],
        keep_scaled=True,
    )
    s, r = 0.5, ref["weight"]
    copy = r + s * (start - r)
    want = _grad(start, x, y) + _grad(start, xk, yk) - s * _grad(copy, x, y) + s * _grad(copy, xk, yk)
    torch.testing.assert_close(grads[0], want)
    with pytest.raises(ValueError, match="keep_scaled must be True or False"):
        ScaleAdversarial(keep_scaled="yes")


def test_drop_density_is_validated():
    net = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="drop_density"):
        scale_adversarial_(net, dict(net.named_parameters()), {}, [], _loss, drop_density=1.0)


def _saved_mib(fn) -> float:
    """MiB of tensors autograd saves for the backward pass while ``fn`` runs (activations)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 2**20


def test_gradient_checkpointing_the_user_turned_on_is_kept_in_stage_2():
    # Hugging Face layers checkpoint only in train mode; stage 2 optimises in eval mode, so a model that trains only
    # thanks to checkpointing held every layer's activations there (17x the training step's on an 8-layer Llama).

    from lightning_mergeguard.protection.stage2._adversarial import optimising

    model = tiny_llama(0, hidden_size=32, intermediate_size=64, num_hidden_layers=4)
    model.gradient_checkpointing_enable()
    x = torch.randint(0, 64, (2, 48))
    hooked = []
    model.model.layers[0].register_forward_hook(lambda *_: hooked.append(1))

    def step():
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    with optimising(model, list(model.parameters())):
        assert not model.training
        with torch.no_grad():  # guard-rail checks (greedy decoding) keep their KV cache
            assert model(input_ids=x[:, :4], use_cache=True).past_key_values is not None
        assert model(input_ids=x[:, :4], use_cache=True).past_key_values is None  # with grad: no cache to replay
        kept = _saved_mib(lambda: model(input_ids=x, labels=x).loss)
        grads = step()
    model.eval()
    full = _saved_mib(lambda: model(input_ids=x, labels=x, use_cache=False).loss)
    plain = step()
    assert kept < full / 2, (kept, full)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain))  # same gradients, recomputed
    assert "forward" not in vars(model.model.layers[0]) and not model._forward_pre_hooks  # all put back
    assert hooked  # module hooks still ran

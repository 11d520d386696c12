"""AdaMerging: learned layer-wise coefficients lower the entropy, stay in [0, 1], leave the module untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mergeguard.merging import adamerging, prediction_entropy


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    base = {k: v.detach().clone() for k, v in net.named_parameters()}
    tvs = {m: {k: 0.5 * torch.randn_like(v) for k, v in base.items()} for m in ("a", "b")}
    batches = [torch.randn(16, 4) for _ in range(4)]
    return net, base, tvs, batches


def _entropy(forward, x):
    return prediction_entropy(forward(x))


def _merged_entropy(net, merged, batches):
    with torch.no_grad():
        return sum(float(_entropy(lambda *a: torch.func.functional_call(net, merged, a), x)) for x in batches) / len(
            batches
        )


def test_adamerging_lowers_entropy_and_clamps_coefficients():
    net, base, tvs, batches = _setup()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    start, _ = adamerging(net, base, tvs, batches, _entropy, steps=0, init=0.3)
    merged, coef = adamerging(net, base, tvs, batches, _entropy, steps=60, lr=0.05, init=0.3)
    assert _merged_entropy(net, merged, batches) < _merged_entropy(net, start, batches) - 0.02
    values = [v for per_model in coef.values() for v in per_model.values()]
    assert set(coef) == {"a", "b"} and set(coef["a"]) == {"0", "2"}
    assert all(0.0 <= v <= 1.0 for v in values) and max(values) != min(values)
    # The merged weights are exactly theta_pre + sum_k lambda_{k,l} tau_{k,l} with the returned coefficients.
    want = base["2.weight"] + coef["a"]["2"] * tvs["a"]["2.weight"] + coef["b"]["2"] * tvs["b"]["2.weight"]
    torch.testing.assert_close(merged["2.weight"], want)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_adamerging_rejects_mismatched_task_vectors():
    net, base, tvs, batches = _setup()
    with pytest.raises(KeyError, match="'b' lacks 1 tensors"):
        adamerging(net, base, {**tvs, "b": {k: v for k, v in tvs["b"].items() if k != "0.bias"}}, batches, _entropy)
    bad = {**tvs["a"], "0.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"'a': shape of '0.weight'"):
        adamerging(net, base, {"a": bad}, batches, _entropy)
    with pytest.raises(ValueError, match="at least one task vector"):
        adamerging(net, base, {}, batches, _entropy)

"""The merge functions against their written formulas, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mergeguard.merging import (
    dare_merge,
    generalized_task_arithmetic,
    linear_merge,
    magnitude_outliers_prune,
    magnitude_prune,
    merge,
    random_prune,
    sign_consensus_mask,
    slerp,
    task_arithmetic_merge,
    task_vector,
    task_vector_cosine,
    ties_merge,
)
from lightning_mergeguard.merging.sparsify import rank_window_mask


def test_rank_window_mask_breaks_ties_by_index():
    x = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0])
    # ascending ranks: 0.0->0, first 1.0->1, second->2, third->3, 2.0->4
    assert rank_window_mask(x, 2, 5).tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.99])
def test_magnitude_prune_keeps_exactly_k_largest(density):
    torch.manual_seed(0)
    x = torch.randn(37, 11)
    y = magnitude_prune(x, density)
    k = max(1, int(density * x.numel()))
    kept = y != 0
    assert int(kept.sum()) == k
    assert float(x.abs()[kept].min()) >= float(x.abs()[~kept].max())
    assert torch.equal(y[kept], x[kept])


def test_magnitude_prune_with_many_ties_keeps_k():
    x = torch.tensor([0.5] * 10 + [1.0] * 3)
    assert int((magnitude_prune(x, 0.5) != 0).sum()) == 6


def test_breadcrumbs_drops_outliers_and_small():
    x = torch.arange(1.0, 101.0)
    y = magnitude_outliers_prune(x, density=0.5, gamma=0.1)
    assert (y != 0).nonzero().flatten().tolist() == list(range(40, 90))


def test_random_prune_is_seeded_and_rescales():
    x = torch.randn(10000)
    a = random_prune(x, 0.3, "density", torch.Generator().manual_seed(3))
    b = random_prune(x, 0.3, "density", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert abs(float((a != 0).float().mean()) - 0.3) < 0.02
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / 0.3)
    l1 = random_prune(x, 0.3, "l1", torch.Generator().manual_seed(3))
    assert float(l1.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-5)


def test_sign_consensus_tie_elects_positive_and_zero_never_agrees():
    d = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    assert sign_consensus_mask(d).tolist() == [[True, False], [False, True]]
    assert sign_consensus_mask(torch.tensor([[1.0], [1.0], [-5.0]]), "count").tolist() == [[True], [True], [False]]


def test_task_arithmetic_formula():
    torch.manual_seed(0)
    base, a, b = torch.randn(3, 5, 4).unbind(0)
    got = task_arithmetic_merge(base, [a, b], [0.7, 0.2], lambda_=0.3)
    assert torch.allclose(got, base + 0.3 * (0.7 * (a - base) + 0.2 * (b - base)))
    got_n = task_arithmetic_merge(base, [a, b], [0.7, 0.2], normalize=True)
    assert torch.allclose(got_n, base + (0.7 * (a - base) + 0.2 * (b - base)) / 0.9)


def test_ties_formula_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.2, 2.0])
    b = torch.tensor([-1.0, -2.0, 0.1, 4.0])
    # density 0.5: a keeps [3, 2] at 0 and 3; b keeps [-2, 4] at 1 and 3
    # elected sign (weights 1): idx0 +3 -> +, idx1 -2 -> -, idx2 0 -> + (nothing kept), idx3 +6 -> +
    got = ties_merge(base, [a, b], [1.0, 1.0], [0.5, 0.5], normalize=True)
    assert got.tolist() == [3.0, -2.0, 0.0, 3.0]
    got_sum = ties_merge(base, [a, b], [1.0, 1.0], [0.5, 0.5], normalize=False)
    assert got_sum.tolist() == [3.0, -2.0, 0.0, 6.0]


def test_dare_density_one_is_task_arithmetic():
    torch.manual_seed(0)
    base, a, b = torch.randn(3, 8).unbind(0)
    assert torch.allclose(
        dare_merge(base, [a, b], [0.1, 0.9], [1.0, 1.0], consensus=False),
        task_arithmetic_merge(base, [a, b], [0.1, 0.9]),
    )


def test_linear_merge_and_generalized_identity():
    a, b = torch.ones(3), 3 * torch.ones(3)
    assert linear_merge([a, b], [1.0, 1.0]).tolist() == [2.0, 2.0, 2.0]
    assert torch.equal(generalized_task_arithmetic(a, [], []), a)


def test_slerp_endpoints_and_geometry():
    torch.manual_seed(0)
    v0, v1 = torch.randn(50), torch.randn(50)
    assert torch.allclose(slerp(0.0, v0, v1), v0, atol=1e-6)
    assert torch.allclose(slerp(1.0, v0, v1), v1, atol=1e-5)
    u0, u1 = v0 / v0.norm(), v1 / v1.norm()
    mid = slerp(0.5, u0, u1)
    assert float(mid.norm()) == pytest.approx(1.0, abs=1e-5)
    theta = math.acos(float(u0 @ u1))
    assert float(torch.acos((mid @ u0).clamp(-1, 1))) == pytest.approx(theta / 2, abs=1e-4)
    assert torch.allclose(slerp(0.25, v0, 2 * v0), 1.25 * v0)  # collinear -> lerp


def test_dare_engine_seed_repeats_and_differs_between_seeds():
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 64)}
    a = {"w": base["w"] + 0.1 * torch.randn(64, 64)}
    cfg = {
        "merge_method": "dare_linear",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    r1 = merge(cfg, {"a": a}, base, seed=7)["w"]
    r2 = merge(cfg, {"a": a}, base, seed=7)["w"]
    r3 = merge(cfg, {"a": a}, base, seed=8)["w"]
    assert torch.equal(r1, r2)
    assert not torch.equal(r1, r3)


def test_ties_whole_model_trim_uses_one_threshold():
    base = {"big": torch.zeros(10), "small": torch.zeros(10)}
    a = {"big": torch.arange(1.0, 11.0), "small": torch.arange(1.0, 11.0) / 100}
    cfg = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {"trim_scope": "model"},
    }
    out = merge(cfg, {"a": a}, base)
    assert int((out["big"] != 0).sum()) == 10  # the top 50% of the whole model all lie in "big"
    assert int((out["small"] != 0).sum()) == 0
    per_tensor = merge({**cfg, "parameters": {}}, {"a": a}, base)
    assert int((per_tensor["small"] != 0).sum()) == 5


def test_filtered_parameters_apply_per_tensor():
    base = {"mlp.w": torch.zeros(2), "attn.w": torch.zeros(2)}
    a = {"mlp.w": torch.ones(2), "attn.w": torch.ones(2)}
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]}}],
    }
    out = merge(cfg, {"a": a}, base)
    assert out["mlp.w"].tolist() == pytest.approx([0.2, 0.2])
    assert out["attn.w"].tolist() == pytest.approx([0.7, 0.7])


def test_task_vector_and_cosine_from_dirs(llama_dirs):
    tv_a = task_vector(llama_dirs["a"], llama_dirs["base"])
    tv_b = task_vector(llama_dirs["b"], llama_dirs["base"])
    assert abs(task_vector_cosine(tv_a, tv_b)) < 0.05  # independent random perturbations
    assert task_vector_cosine(tv_a, tv_a) == pytest.approx(1.0)


def test_bf16_output_dtype_and_compute_in_float32():
    base = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    a = {"w": torch.ones(3, dtype=torch.bfloat16)}
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = merge(cfg, {"a": a}, base)["w"]
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.5, 0.5, 0.5]

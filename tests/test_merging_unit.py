"""The merge functions against their written formulas, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mergeguard.errors import ConfigError
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
from lightning_mergeguard.merging.config import MergeConfig
from lightning_mergeguard.merging.methods.model_stock import model_stock_merge
from lightning_mergeguard.merging.methods.nuslerp import nuslerp, nuslerp_merge
from lightning_mergeguard.merging.methods.sce import sce_merge
from lightning_mergeguard.merging.methods.sparsify import della_keep_probabilities, della_prune, rank_window_mask


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


# ---------------------------------------------------------------------------------------------- DELLA, Model Stock,
# SCE and NuSLERP (mergekit 0.1.5's formulas; parity with mergekit itself in test_merging_parity.py)
def test_della_keeps_larger_entries_more_often_with_the_mean_density():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 101)
    kept = torch.stack([(della_prune(x, 0.4, 0.15, None, g) != 0).float() for _ in range(40)]).mean(0)
    ranks = x.abs().argsort(1).argsort(1)
    assert kept.mean().item() == pytest.approx(0.4, abs=0.005)
    # keep probability density - epsilon + 2 epsilon * rank / (n - 1): 0.25 for the smallest, 0.55 for the largest
    assert kept[ranks == 0].mean().item() == pytest.approx(0.25, abs=0.02)
    assert kept[ranks == 100].mean().item() == pytest.approx(0.55, abs=0.02)
    assert kept[ranks == 50].mean().item() == pytest.approx(0.40, abs=0.02)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 2, 2), (6, 1)], ids=str)
def test_della_keep_probabilities_are_mergekits_formula_in_any_rank(shape):
    x = torch.randn(shape)
    # mergekit 0.1.5, della_magprune: ranks along dim 1 of the tensor (unsqueezed to 2-D if 1-D), scaled to [0, 1]
    rows = x.unsqueeze(0) if x.dim() < 2 else x
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    want = (0.4 - 0.15) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 0.3
    got = della_keep_probabilities(x, 0.4, 0.15)
    assert got.shape == x.shape
    if rows.shape[1] > 1:
        torch.testing.assert_close(got, want.reshape(x.shape))
    else:  # mergekit divides 0 by 0 there; this engine keeps with probability density
        assert torch.all(got == 0.4)
    dropped = della_prune(x, 0.4, 0.15, None, torch.Generator().manual_seed(0))
    assert dropped.shape == x.shape and torch.all((dropped == 0) | (dropped == x))


def test_della_rescales_l1_repeats_with_a_seed_and_keeps_dtype():
    x = torch.randn(64, 32).to(torch.bfloat16)
    a = della_prune(x, 0.5, 0.2, "l1", torch.Generator().manual_seed(3))
    b = della_prune(x, 0.5, 0.2, "l1", torch.Generator().manual_seed(3))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert a.float().abs().sum().item() == pytest.approx(x.float().abs().sum().item(), rel=1e-2)
    assert torch.equal(della_prune(x, 1.0, 0.2), x)
    one = della_prune(torch.randn(50), 0.5, 0.1, None, torch.Generator().manual_seed(0))  # 1-D: one row
    assert 10 < int((one != 0).sum()) < 40
    col = della_prune(torch.randn(300, 1), 0.5, 0.1, None, torch.Generator().manual_seed(0))  # rows of one entry
    assert 100 < int((col != 0).sum()) < 200 and torch.isfinite(col).all()
    with pytest.raises(ValueError, match="density - epsilon > 0"):
        della_prune(x, 0.1, 0.15)


def test_della_engine_seed_repeats_and_validates_density_with_epsilon():
    torch.manual_seed(0)
    base = {"w": torch.randn(32, 32)}
    donors = {n: {"w": base["w"] + 0.1 * torch.randn(32, 32)} for n in "ab"}
    cfg = {
        "merge_method": "della",
        "base_model": "base",
        "models": [{"model": n, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}} for n in "ab"],
    }
    r1, r2 = (merge(cfg, donors, base, seed=4)["w"] for _ in range(2))
    assert torch.equal(r1, r2) and not torch.equal(r1, merge(cfg, donors, base, seed=5)["w"])
    bad = {**cfg, "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.15}}]}
    with pytest.raises(ConfigError, match=r"models\[0\] \(a\): DELLA needs .* density 0.9 and epsilon 0.15"):
        MergeConfig.from_dict(bad)
    # a filtered setting is only known per tensor: it is checked there, before anything is merged
    filtered = {
        **cfg,
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": [{"filter": "w", "value": 0.05}]}}],
    }
    with pytest.raises(ConfigError, match="tensor 'w'"):
        merge(filtered, {"a": donors["a"]}, base)


def test_model_stock_ratio_from_the_angle():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert torch.equal(model_stock_merge(base, [a, b]), base)  # orthogonal: t = 0
    assert torch.allclose(model_stock_merge(base, [a, 2 * a]), 1.5 * a)  # collinear: t = 1, the average
    c = torch.tensor([1.0, 1.0, 0.0, 0.0])  # cos(a, c) = 1/sqrt(2): t = 2 cos / (1 + cos)
    cos = 1 / math.sqrt(2)
    assert torch.allclose(model_stock_merge(base, [a, c]), (2 * cos / (1 + cos)) * (a + c) / 2)
    assert torch.equal(model_stock_merge(base, [a, -a]), base)  # 1 + cos = 0: the base is kept
    rows = model_stock_merge(torch.zeros(2, 4), [torch.stack([a, a]), torch.stack([a, b])], filter_wise=True)
    assert torch.allclose(rows[0], a) and torch.equal(rows[1], torch.zeros(4))
    with pytest.raises(ValueError, match="at least two"):
        model_stock_merge(base, [a])


def test_sce_by_hand():
    base = torch.zeros(3)
    ta, tb = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    # energies 0.75 and 3.41..: weights by mean square; entry 1's signs cancel (sum 0 elects +: only b agrees)
    ea, eb = ta.square().mean(), tb.square().mean()
    wa, wb = ea / (ea + eb), eb / (ea + eb)
    expected = torch.tensor([(wa * 1 + wb * 3) / (wa + wb), 1.0, 0.5])
    assert torch.allclose(sce_merge(base, [ta, tb]), expected)
    # select_topk keeps the entries whose task vectors vary most across models (entry 0 and 1, not 2)
    assert sce_merge(base, [ta, tb], select_topk=2 / 3)[2] == 0
    assert torch.equal(sce_merge(base, [ta, tb], select_topk=0.0), base)


def test_nuslerp_geometry_and_weights():
    e0, e1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(nuslerp(0.5, e0, e1), torch.tensor([math.sqrt(2), math.sqrt(2)]))
    assert torch.allclose(nuslerp(0.0, e0, e1), e0) and torch.allclose(nuslerp(1.0, e0, e1), e1, atol=1e-6)
    assert torch.allclose(nuslerp(0.25, e0, 3 * e0), 1.5 * e0)  # collinear: linear
    m = torch.stack([e0, e1])  # row_wise interpolates columns: [2, 0] with [0, 2] column by column
    assert torch.allclose(nuslerp(0.5, m, m.flip(0), row_wise=True, flatten=False), torch.full((2, 2), math.sqrt(2)))
    base = torch.ones(2)
    merged = nuslerp_merge(base, [base + e0, base + e1], [1.0, 3.0])  # t = 3 / 4, of the task vectors
    assert torch.allclose(merged, base + nuslerp(0.75, e0, e1))
    assert torch.allclose(nuslerp_merge(None, [e0, e1], [1.0, -1.0]), nuslerp(0.5, e0, e1))  # weights sum to 0


def test_new_methods_through_the_engine_refuse_their_misconfigurations():
    base = {"w": torch.zeros(4)}
    donors = {n: {"w": torch.randn(4)} for n in "abc"}

    def cfg(method, names, params=None, shared=None):
        out = {"merge_method": method, "base_model": "base", "models": [{"model": n} for n in names]}
        if params is not None:
            out["models"] = [{"model": n, "parameters": params} for n in names]
        if shared:
            out["parameters"] = shared
        return out

    with pytest.raises(ConfigError, match="does not weight its models"):
        MergeConfig.from_dict(cfg("model_stock", "ab", {"weight": 0.5}))
    with pytest.raises(ConfigError, match="at least 2 model"):
        MergeConfig.from_dict(cfg("model_stock", "a"))
    with pytest.raises(ConfigError, match="at most 2 model"):
        MergeConfig.from_dict(cfg("nuslerp", "abc", {"weight": 1.0}))
    with pytest.raises(ConfigError, match=r"select_topk must be in \[0, 1\]"):
        MergeConfig.from_dict(cfg("sce", "ab", shared={"select_topk": 1.5}))
    out = merge(cfg("model_stock", "abc", shared={"filter_wise": True}), donors, base)
    ws = [donors[n]["w"] for n in "abc"]
    assert torch.allclose(out["w"], model_stock_merge(base["w"], ws, filter_wise=True))


@pytest.mark.parametrize("method", ["della", "della_linear", "model_stock", "sce", "nuslerp", "karcher"])
def test_new_methods_merge_tensors_of_every_rank(method):
    """Scalars, biases, column vectors, matrices, conv kernels and position embeddings all merge to finite values."""
    shapes = {"s": (), "b": (16,), "col": (7, 1), "w": (10, 16), "conv": (8, 3, 4, 4), "pos": (1, 5, 16)}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    donors = {n: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for n in "ab"}
    params = {
        "della": {"weight": 0.5, "density": 0.5},
        "della_linear": {"weight": 0.5, "density": 0.5},
        "nuslerp": {"weight": 0.5},
    }.get(method)
    models = [{"model": n, "parameters": params} if params else {"model": n} for n in "ab"]
    for shared in ({}, {"filter_wise": True} if method == "model_stock" else {"nuslerp_flatten": False}):
        if shared and method not in ("model_stock", "nuslerp"):
            continue
        cfg = {"merge_method": method, "base_model": "base", "models": models, "parameters": shared}
        out = merge(cfg, donors, base, seed=0)
        for k, v in out.items():
            assert v.shape == base[k].shape and torch.isfinite(v).all(), (method, k)


def test_della_draws_blocks_of_rows_with_the_same_keep_probabilities(monkeypatch):
    """Large tensors are masked a block of rows at a time (bounded sort memory); each row keeps its probabilities."""
    from lightning_mergeguard.merging.methods import sparsify

    x = torch.randn(120, 40)
    whole = torch.stack([(della_prune(x, 0.4, 0.15, None, torch.Generator().manual_seed(s)) != 0) for s in range(60)])
    monkeypatch.setattr(sparsify, "_CHUNK", 100)  # two rows per block
    blocks = torch.stack([(della_prune(x, 0.4, 0.15, None, torch.Generator().manual_seed(s)) != 0) for s in range(60)])
    ranks = x.abs().argsort(1).argsort(1)
    for kept in (whole.float().mean(0), blocks.float().mean(0)):
        assert kept[ranks == 0].mean().item() == pytest.approx(0.25, abs=0.03)
        assert kept[ranks == 39].mean().item() == pytest.approx(0.55, abs=0.03)
    conv = torch.randn(9, 3, 4, 4)
    out = della_prune(conv, 0.5, 0.2, "l1", torch.Generator().manual_seed(0))
    assert out.shape == conv.shape and out.abs().sum().item() == pytest.approx(conv.abs().sum().item(), rel=1e-4)


def test_karcher_mean_on_the_sphere():
    from lightning_mergeguard.merging.methods.karcher import karcher_mean

    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    # equal weights: the direction halfway between (45 degrees), times the mean norm 2
    assert torch.allclose(karcher_mean([a, b]), 2 * torch.tensor([2**-0.5, 2**-0.5]), atol=1e-5)
    c = torch.tensor([1.0, 1.0]) / 2**0.5
    # three directions at 0, 45 and 90 degrees: the mean is 45 degrees, the norm (3 + 1 + 1) / 3
    assert torch.allclose(karcher_mean([a, b, c]), 5 / 3 * c, atol=1e-4)
    assert torch.equal(karcher_mean([a]), a)
    assert torch.equal(karcher_mean([torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    with pytest.raises(ConfigError, match="whole number"):
        MergeConfig.from_dict({"merge_method": "karcher", "models": [{"model": "a"}], "parameters": {"max_iter": 2.5}})

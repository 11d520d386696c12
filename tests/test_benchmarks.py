"""The GPU benchmark runs end to end (a tiny size on the CPU), so it is ready for a machine with a GPU."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_overhead_smoke_run(tmp_path):
    env = {**os.environ, "MERGEGUARD_RESULTS_DIR": str(tmp_path)}
    cmd = [sys.executable, "benchmarks/gpu_overhead.py", "--size", "tiny", "--device", "cpu", "--steps", "6"]
    subprocess.run([*cmd, "--stage2-steps", "8", "--out", "smoke"], cwd=ROOT, env=env, check=True, timeout=600)
    data = json.loads((tmp_path / "smoke.json").read_text())
    for model in ("llama", "vit"):
        entry = data["models"][model]
        assert entry["stage2"]["validation_passes"] <= 20
        assert entry["probe"]["probes"] == 1 and entry["probe"]["seconds_per_probe"] > 0
        assert entry["probe"]["wall_ratio"] > 0 and entry["plain"]["step_s"] > 0
        assert all(r["step_ratio"] > 0 for r in entry["stage1"].values())


def test_merge_grid_covers_the_neighbourhood_and_its_worst_case_skips_seen_partners():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import torch
        from _grid import grid_configs, run_grid, worst_case
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cfgs = grid_configs("own", ["a", "b"], [0.3, 1.0])
    # lambdas, owner x partner weights x 4 families, TIES kx, the study's 3 + DELLA's 3, Model Stock and 2 SCE, and
    # per partner WA, SLERP and NuSLERP at 2 owner weights
    # Karcher, and per partner task arithmetic of the owner at 1 with that partner alone at 0.1 and 0.3; RAM, RAM+,
    # Multi-SLERP at 2 owner weights, and per partner Arcee Fusion both ways and NearSwap; per partner 4 near copies
    assert len(cfgs) == 2 + 4 * 3 * 4 + 4 + 3 + 3 + 3 + 1 + 2 + 2 + 2 * (2 + 2 + 2 + 3) + 2 * 4
    assert cfgs["TA owner 1 with a 0.3"][1] == ("a",)
    assert cfgs["TIES owner 3x"][0]["models"][0]["parameters"]["weight"] == 3.0
    assert cfgs["WA with a"][1] == ("a",) and cfgs["uniform TA λ=0.3"][1] == ("a", "b")
    pre = {"w": torch.zeros(4)}
    states = {"a": {"w": torch.tensor([1.0, 0, 0, 0])}, "b": {"w": torch.tensor([0, 1.0, 0, 0])}}
    own = {"w": torch.tensor([0, 0, 1.0, 0])}

    def evaluate(state, which):  # "accuracy" of a task: 100 * its coordinate
        index = {"own": 2, "a": 0, "b": 1}
        return {t: 100.0 * float(state["w"][index[t]]) for t in which}

    grid = run_grid("own", own, states, pre, evaluate, {"own": 100.0, "a": 100.0, "b": 100.0}, [0.3, 1.0])
    assert grid["uniform TA λ=0.3"]["owner"] == pytest.approx(30.0)
    assert grid["TA owner 1.2 / partners 0.5"]["owner"] == pytest.approx(120.0)
    assert grid["TA owner 1 / partners 0.1"]["partners_normalized"] == pytest.approx(0.1)
    # SLERP interpolates the owner and the partner (orthogonal unit vectors: sin(pi/4) / sin(pi/2) of each at t=0.5)
    assert grid["SLERP with a"]["owner"] == pytest.approx(100 * 2**-0.5, rel=1e-4)
    # Model Stock: orthogonal task vectors give t = 0, the base; NuSLERP of orthogonal unit task vectors at
    # t = 0.2 keeps sin(0.8 pi / 2) of the owner's
    assert grid["Model Stock"]["owner"] == pytest.approx(0.0, abs=1e-6)
    assert grid["NuSLERP owner 0.8 with a"]["owner"] == pytest.approx(100 * math.sin(0.4 * math.pi), rel=1e-4)
    assert grid["DELLA (study)"]["partners"] == ["a", "b"]
    assert grid["TA owner 1 with a 0.3"]["owner"] == pytest.approx(100.0)
    assert grid["TA owner 1 with a 0.3"]["partners_normalized"] == pytest.approx(0.3)
    # mergekit's newer methods on disjoint changes: RAM keeps every unique change whole; Arcee Fusion of a into the
    # owner finds no outlier among two equal changes (the owner stays); NearSwap moves each entry by t towards a
    assert grid["RAM"]["owner"] == pytest.approx(100.0) and grid["RAM+"]["partners_normalized"] >= 1.0
    assert grid["Arcee Fusion of a into owner"]["owner"] == pytest.approx(100.0)
    assert grid["Arcee Fusion of a into owner"]["partners_normalized"] == pytest.approx(0.0)
    assert grid["NearSwap owner / a t=0.0001"]["owner"] == pytest.approx(100 * (1 - 1e-4))
    # Near copies: the owner's coordinate moves by t (NearSwap) or not at all (a partner at 1e-4 on its own axis)
    assert grid["near copy: NearSwap owner / a t=1e-06"]["owner"] == pytest.approx(100 * (1 - 1e-6))
    assert grid["near copy: TA owner 1 with b 0.0001"]["owner"] == pytest.approx(100.0)
    assert grid["near copy: TA owner 1 with b 0.0001"]["partners_normalized"] == pytest.approx(1e-4)
    assert grid["Multi-SLERP owner 0.8"]["owner"] > 50 > grid["Multi-SLERP owner 0.8"]["partners_normalized"] * 100
    label, value = worst_case(grid)
    assert grid[label]["owner"] == value
    assert value == max(r["owner"] for r in grid.values())
    # Seeing both partners leaves no merge with an unseen one; seeing "a" leaves the merges with "b" only.
    assert worst_case(grid, ["a"])[0] in {k for k, r in grid.items() if "b" in r["partners"]}
    with pytest.raises(ValueError):
        worst_case(grid, ["a", "b"])


@pytest.mark.slow
@pytest.mark.mergekit
def test_merge_speed_7b_shaped_flag_at_a_tiny_width(tmp_path):
    """``--size 7b-shaped --layers-7b N`` end to end: Llama-2-7B's layout, widths / 32, both tools, the I/O bound."""
    pytest.importorskip("mergekit")
    env = {**os.environ, "MERGEGUARD_RESULTS_DIR": str(tmp_path), "MERGEGUARD_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "benchmarks/merge_speed.py", "--size", "7b-shaped", "--layers-7b", "2", "--shrink", "32"]
    subprocess.run([*cmd, "--repeats", "1", "--device", "cpu"], cwd=ROOT, env=env, check=True, timeout=600)
    size = json.loads((tmp_path / "merge_speed.json").read_text())["sizes"]["7b-shaped"]
    # Two decoder layers of 4096/32 = 128 hidden, 11008/32 = 344 MLP, 32000/32 = 1000 tokens, untied embeddings.
    layer = 4 * 128 * 128 + 3 * 128 * 344 + 2 * 128
    assert size["parameters"] == 2 * 1000 * 128 + 2 * layer + 128
    assert set(size["results"]) == {"task_arithmetic", "ties", "dare_ties"}
    for name, r in size["results"].items():
        assert r["ours"]["seconds_median"] > 0 and r["mergekit"]["peak_rss_mib_max"] > 0, name
        assert r["io_bound"]["bytes_read"] > r["io_bound"]["bytes_written"] > 0, name
    # bf16 output of an fp32 merge: the tools agree to bf16 rounding; TA on every entry.
    assert size["results"]["task_arithmetic"]["max_abs_diff_vs_mergekit"] < 1e-2
    assert size["results"]["task_arithmetic"]["tensors_only_in_ours"] == []
    assert size["results"]["ties"]["tensors_compared"] == 2 * 9 + 3


def test_merge_grid_layerwise_rows_take_layers_from_the_model_they_name():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import torch
        from _grid import LAYERWISE_FAMILIES, grid_configs, layer_count, run_grid
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert not any(k.startswith(LAYERWISE_FAMILIES) for k in grid_configs("own", ["a"], [0.3]))  # no layers known
    n_layers = 4

    def model(value: float) -> dict[str, torch.Tensor]:
        state = {"emb.weight": torch.full((2,), value), "norm.weight": torch.full((2,), value)}
        state.update({f"model.layers.{i}.mlp.up.weight": torch.full((2,), value) for i in range(n_layers)})
        return state

    pre, own, a = model(0.0), model(1.0), model(2.0)
    assert layer_count(own) == n_layers and layer_count({"w": torch.zeros(1)}) is None
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def evaluate(state, which):  # records what each merge produced; the owner's "accuracy": its mean weight
        seen[len(seen)] = state
        return {t: float(torch.cat(list(state.values())).mean()) for t in which}

    grid = run_grid("own", own, {"a": a}, pre, evaluate, {"own": 1.0, "a": 1.0}, [0.3])
    merged = dict(zip(grid, seen.values(), strict=True))
    lower = merged["layers: owner 0-2, a 2-4"]
    assert lower["emb.weight"][0] == 1.0 and lower["norm.weight"][0] == 2.0
    assert [float(lower[f"model.layers.{i}.mlp.up.weight"][0]) for i in range(n_layers)] == [1.0, 1.0, 2.0, 2.0]
    upper = merged["layers: a 0-2, owner 2-4"]
    assert [float(upper[f"model.layers.{i}.mlp.up.weight"][0]) for i in range(n_layers)] == [2.0, 2.0, 1.0, 1.0]
    # Gradient SLERP with the owner as base: mlp layers at t = 1, 0.5, 0.7, 0.3, 0 sampled at 0, 1/3, 2/3, 1
    # (parallel vectors: SLERP falls back to linear); tensors outside the layers at the default t = 0.5.
    slerp = merged["gradient SLERP with a"]
    assert float(slerp["model.layers.0.mlp.up.weight"][0]) == pytest.approx(2.0)
    assert float(slerp["model.layers.3.mlp.up.weight"][0]) == pytest.approx(1.0)
    assert float(slerp["emb.weight"][0]) == pytest.approx(1.5)
    # Per-layer task arithmetic: the owner 1 -> 0.5 and the partner 0.1 -> 0.5 (task vectors 1 and 2) over the layers,
    # the tensors outside the layers at the first value.
    ta = merged["TA layer gradient owner 1→0.5 / partners 0.1→0.5"]
    assert float(ta["model.layers.0.mlp.up.weight"][0]) == pytest.approx(1.0 + 0.2)
    assert float(ta["model.layers.3.mlp.up.weight"][0]) == pytest.approx(0.5 + 1.0)
    assert float(ta["norm.weight"][0]) == pytest.approx(1.2)
    assert grid["layers: owner 0-2, a 2-4"]["partners"] == ["a"]


def test_near_copy_sweep_measures_how_far_nearswap_moves_from_the_owner():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import torch
        from near_copies import headline, nearswap_sweep, table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    own = {"w": torch.tensor([1.0, 0.0, 0.5, 0.25]), "step": torch.tensor(3)}
    other = {"w": torch.tensor([0.0, 1.0, 0.5, 0.25]), "step": torch.tensor(3)}
    rows = nearswap_sweep("o", own, "p", other, lambda s: 100 * float(s["w"][0]), [0.5, 1e-3])
    # Each weight moves by at most t towards the partner's: the owner's coordinate falls by t; two of four weights
    # equal the partner's already, so half the weights stay bit for bit the owner's (integer tensors are not counted)
    assert [r["owner"] for r in rows] == pytest.approx([50.0, 99.9])
    assert [r["same_as_owner"] for r in rows] == [0.5, 0.5]
    broken = [{"t": 0.5, "owner": 10.0, "same_as_owner": 0.5}, {"t": 1e-3, "owner": 60.0, "same_as_owner": 0.5}]
    res = {
        "owner": "o",
        "partner": "p",
        "variants": {"unprotected": {"own": 100.0, "sweep": rows}, "guarded": {"own": 100.0, "sweep": broken}},
    }
    assert "| guarded | 100 | 10.0 (50%) | 60.0 (50%) |" in table("toy", res)
    assert "guarded keeps 60.0% = 0.60x the unprotected 99.9% first at t=0.001" in headline("toy", res)


def test_deployment_benchmark_scores_each_setting_under_each_treatment_and_merges_its_copies(monkeypatch):
    """A toy track whose 'model' is one weight vector: the table, the worst loss and a non-finite fp16 copy."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import deployment
        import torch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    pre = {"w": torch.zeros(2, 4)}
    owner = {"w": torch.tensor([[1.0, 0.5, 0.25, 0.125]] * 2)}
    big = {"w": owner["w"] * 1e6}  # a release fp16 cannot hold

    track = SimpleNamespace(
        name="toy",
        owner="o",
        tasks=["o", "p"],
        pre=pre,
        finetunes={"o": owner, "p": {"w": torch.full((2, 4), -0.1)}},
        grid_evaluate=lambda s, which: {"o": 100.0 * float((s["w"][0, 0] > 0.5) & (s["w"][0, 0] < 10))},
        finetune=lambda s, steps, lora: {"w": s["w"] * 0.9},
        notes={},
    )
    monkeypatch.setattr(deployment, "variants", lambda t: {"unprotected": lambda: owner, "huge": lambda: big})
    bar = SimpleNamespace(set_postfix_str=lambda s: None, update=lambda: None)
    res = deployment.run_track(track, bar)
    plain, huge = res["variants"]["unprotected"], res["variants"]["huge"]
    assert plain["scores"]["fp16"] == 100.0 and plain["worst_loss"] == 0.0 and plain["within_bound"]
    assert huge["scores"]["none"] == 0.0 and huge["scores"]["fp16"] == 0.0 and not huge["within_bound"]
    assert huge["merges"]["fp16"]["TA λ=0.3"] is None  # the fp16 copy is not finite: no merge of it exists
    assert plain["merges"]["none"]["owner 1 + partners 0.1"] == 100.0  # 1 - 0.01: the owner's weights kept
    md = deployment.table("toy", res)
    assert "| huge | 0.0 | 0.0 |" in md and "not finite" in md
    assert "huge: worst +100.0 points (OUTSIDE 1.0)" in deployment.headline("toy", res)


def _fixed_key_secret(monkeypatch, secret: int = 20261207) -> None:
    """The callback's key secret fixed (a release draws 63 random bits): the smoke tests' p-values are then the same
    on every run, so a negative's p below alpha (a rare event under the null for a random secret) cannot flake."""
    from types import SimpleNamespace

    from lightning_mergeguard.callbacks import merge_guard

    monkeypatch.setattr(merge_guard, "_secrets", SimpleNamespace(randbits=lambda bits: secret))


@pytest.mark.slow
def test_llm_stop_or_catch_runs_every_cell_and_negative_on_a_tiny_llama(monkeypatch, tmp_path):
    """The LLM track end to end on a tiny Llama: each merge under each attack, the negatives, the table."""
    from types import SimpleNamespace

    import torch

    from tests._helpers import make_byte_tokenizer, perturbed_state_dict, tiny_llama

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import stop_or_catch
        from benchmarks import stop_or_catch_llm as llm
    finally:
        sys.path.remove(str(ROOT))
    from lightning_mergeguard.demos.smollm2 import generate_task

    shape = dict(vocab_size=260, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    model = tiny_llama(0, **shape).eval()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    partners = {t: perturbed_state_dict(pre, i, 0.02) for i, t in enumerate(("add", "reverse", "country"))}
    parts = {"model": model, "tok": make_byte_tokenizer(), "pre": pre, "partners": partners,
             "live": tiny_llama(1, **shape), "eval": generate_task("upper", 4, 99)}  # fmt: skip
    monkeypatch.setattr(llm, "shared", lambda: parts)
    monkeypatch.setattr(llm, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(llm, "STEPS", 2)
    monkeypatch.setattr(llm, "STAGE2_STEPS", 2)
    monkeypatch.setattr(llm, "INDEPENDENT", 3)
    monkeypatch.setattr(llm, "VAL_N", 8)
    monkeypatch.setattr(llm, "MERGES", ("TA owner 1 / partners 0.1", "uniform TA λ=0.3", "WA with add"))
    monkeypatch.setattr(llm, "GRID", ("WA with add", "TIES owner 2x"))  # one more merge, as merged and in int8
    monkeypatch.setattr(llm, "ATTACKED", ("TA owner 1 / partners 0.1",))
    monkeypatch.setattr(llm, "REPAIR", (1, 2))
    monkeypatch.setattr(llm, "REMOVAL", (2, 3))
    monkeypatch.setattr(stop_or_catch, "RESULTS", tmp_path)
    _fixed_key_secret(monkeypatch)
    bar = SimpleNamespace(update=lambda: None)
    run = llm.run_seed(0, bar)
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import deployment_seeds
    finally:
        sys.path.remove(str(ROOT))
    merges = deployment_seeds.llm_merges(llm.build(0))  # the deployment benchmark's merges of the cached release
    assert list(merges) == list(deployment_seeds.LLM_MERGES)
    fields = {"unprotected", "none", "none log10 p", "int4-g128", "int4-g128 log10 p"}
    assert all(set(v) == fields and v["none log10 p"] <= 0 for v in merges.values())
    assert all(0 <= v[f] <= 100 for v in merges.values() for f in ("unprotected", "none", "int4-g128"))
    text = deployment_seeds.merges_table({"seeds": [{"seed": 0, "merges": merges}]})
    assert "| 0 | uniform TA λ=0.3 |" in text and "release in int4-g128" in text
    attacks = {"as merged", "re-parameterised", "int8 per row", "low-rank 10%"}
    slow = {"repair 1", "repair 2", "removal 2", "removal 3"}
    # (release alone + 3 merges) x 4, 1 grid merge x 2, 2 attacked x 4 more, the attacked merge of 5 formats,
    # the release and 3 merges of it after it is re-aligned to theta_pre and to a partner
    assert len(run["cells"]) == 4 * 4 + 2 + 2 * 4 + 5 + 2 * 4
    realigned = {f"release re-aligned to {a}, then merged" for a in ("θ_pre", f"partner {llm.REALIGN_PARTNER}")}
    for how in realigned:  # aligning the release changes none of its outputs
        assert run["cells"][f"release alone | {how}"]["owner"] == run["cells"]["release alone | as merged"]["owner"]
    assert {c["attack"] for c in run["cells"].values() if c["merge"] == "TIES owner 2x"} == set(llm.GRID_ATTACKS)
    scored = set(run["unprotected_grid"])  # the whole grid, unless a representative reached the ceiling
    assert set(llm.MERGES) <= scored and (scored == set(llm.MERGES) | set(llm.GRID) or run["unprotected_best"] == 100)
    deployed = {f"{f} release, then merged" for f in ("int8-row", "fp16", "int4-g128", "gguf-q4_0", "gguf-q4_k")}
    assert {c["attack"] for c in run["cells"].values()} == attacks | slow | deployed | realigned
    # 1 base + 3 partners + unprotected + 3 independent + 3 merges of one + 3 averages + 2 partner-only merges
    assert len(run["negatives"]) == 16
    assert all(0.0 <= c["p"] <= 1.0 and math.isfinite(c["log10_p"]) for c in run["cells"].values())
    assert run["cells"]["release alone | as merged"]["p"] <= llm.ALPHA  # the release carries its key
    assert run["cells"]["release alone | re-parameterised"]["p"] <= llm.ALPHA  # alignment undoes the hiding
    assert run["cells"]["release alone | re-parameterised"]["aligned"]  # the full test where alignment matters
    assert not run["cells"]["release alone | as merged"]["aligned"]  # its bound elsewhere
    assert min(n["p"] for n in run["negatives"].values()) > llm.ALPHA
    assert run["stage2"]["steps_run"] >= 2 and set(run["stage2"]["deployed_after"]) == set(llm.DEPLOYED)
    trained = sorted(p.name for p in (tmp_path / "cache" / "stop-or-catch-llm").glob("independent-*"))
    assert trained == [f"independent-{k}-2-{llm.LR}.safetensors" for k in range(3)]  # shared by the seeds: once
    # the repairs come from one run, its weights taken after 1 and 2 steps: the 1-step cell is a 1-step run
    rows = generate_task("upper", 64, seed=500)
    one = llm.train(parts["model"], parts["tok"], llm.build(0)["release"], rows, 1, 2e-4, seed=7)
    assert run["cells"]["release alone | repair 1"]["owner"] == llm.owner_accuracy(one)
    taken = llm.train_snapshots(parts["model"], parts["tok"], llm.build(0)["release"], rows, (1, 2), 2e-4, 7)
    assert sorted(taken) == [1, 2] and all(torch.equal(taken[1][k], v) for k, v in one.items())
    assert not all(torch.equal(taken[2][k], v) for k, v in one.items())
    # --extend: a seed's kept cells stay; what it lacks is computed, the same as a full run computes it
    lacking = copy.deepcopy(run)
    del lacking["cells"]["TIES owner 2x | int8 per row"], lacking["negatives"]["partner add"]
    lacking["unprotected_grid"].pop("TIES owner 2x")
    lacking["cells"]["WA with add | as merged"]["owner"] = -1.0  # a kept cell is not recomputed
    extended = llm.run_seed(0, bar, lacking)
    assert extended["cells"].keys() == run["cells"].keys() and extended["negatives"].keys() == run["negatives"].keys()
    assert extended["cells"]["TIES owner 2x | int8 per row"] == run["cells"]["TIES owner 2x | int8 per row"]
    assert extended["negatives"]["partner add"] == run["negatives"]["partner add"]
    assert extended["cells"]["WA with add | as merged"]["owner"] == -1.0
    stop_or_catch.report({"seeds": [run], "tolerance": 1.0}, "llm_smoke", track="LLM")
    assert "LLM track" in (tmp_path / "llm_smoke.md").read_text() and (tmp_path / "llm_smoke.png").is_file()


@pytest.mark.slow
def test_vision_stop_or_catch_runs_every_cell_and_negative_on_a_tiny_vit(monkeypatch, tmp_path):
    """The vision track end to end on a tiny ViT: each merge under each attack, the re-aligned release, --extend."""
    from types import SimpleNamespace

    import torch

    from lightning_mergeguard.demos.vision_tasks import VISION_TASKS, fit_task_heads, pretrain_vit
    from tests._helpers import perturbed_state_dict

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import stop_or_catch as soc
    finally:
        sys.path.remove(str(ROOT))
    visual = pretrain_vit("tiny", epochs=0)
    heads = fit_task_heads(visual, list(VISION_TASKS), epochs=5)
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    partners = {t: perturbed_state_dict(pre, i, 0.02) for i, t in enumerate(VISION_TASKS) if t != soc.OWNER}
    monkeypatch.setattr(soc, "shared", lambda: (visual, heads, pre, partners))
    monkeypatch.setattr(soc, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(soc, "EPOCHS", 1)
    monkeypatch.setattr(soc, "STAGE2_STEPS", 2)
    monkeypatch.setattr(soc, "INDEPENDENT", 3)
    monkeypatch.setattr(soc, "REPAIR", (1, 2))
    monkeypatch.setattr(soc, "REMOVAL", (2, 3))
    monkeypatch.setattr(soc, "GRID", ("TA owner 1 / partners 0.1", "uniform TA λ=0.3"))
    monkeypatch.setattr(soc, "independent_finetune", functools.partial(soc.independent_finetune, steps=2))
    monkeypatch.setattr(soc, "RESULTS", tmp_path)
    _fixed_key_secret(monkeypatch)
    bar = SimpleNamespace(update=lambda: None)
    run = soc.run_seed(0, bar, attacked=("TA owner 1 / partners 0.1",))
    realigned = {f"release re-aligned to {a}, then merged" for a in ("θ_pre", f"partner {soc.REALIGN_PARTNER}")}
    slow = {"repair 1", "repair 2", "removal 2", "removal 3"}
    # (release alone + 2 merges) x (4 attacks, the noise scales and 2 re-alignments), and the release and 1 merge
    # repaired and fine-tuned
    assert len(run["cells"]) == 3 * (4 + len(soc.NOISE) + 2) + 2 * 4
    noise = {f"noise {k}x task vector" for k in soc.NOISE}
    attacks = {"as merged", "re-parameterised", "int8 per row", "low-rank 10%", *noise}
    assert {c["attack"] for c in run["cells"].values()} == attacks | slow | realigned
    for how in realigned:  # aligning the release changes none of its outputs
        assert run["cells"][f"release alone | {how}"]["owner"] == run["cells"]["release alone | as merged"]["owner"]
    assert set(run["unprotected_grid"]) == set(soc.GRID)
    assert 0 <= run["pre_own"] <= 100
    assert set(run["from_pre"]) == slow and all(0 <= a <= 100 for a in run["from_pre"].values())  # the reference
    assert run["unprotected_best"] == max(run["unprotected_grid"].values())
    assert all(c["ratio"] == c["owner"] / run["unprotected_best"] for c in run["cells"].values())
    assert all(0.0 <= c["p"] <= 1.0 and math.isfinite(c["log10_p"]) for c in run["cells"].values())
    assert run["cells"]["release alone | as merged"]["p"] <= soc.ALPHA  # the release carries its key
    assert run["cells"]["release alone | re-parameterised"]["p"] <= soc.ALPHA  # alignment undoes the hiding
    # 1 base + 4 partners + unprotected + 3 independent + 2 merges of one + 3 averages
    assert len(run["negatives"]) == 14
    assert min(n["p"] for n in run["negatives"].values()) > soc.ALPHA
    # the repairs come from one run, its weights taken after 1 and 2 steps: the 1-step weights are a 1-step run's
    release = soc.build(0)["release"]
    assert sorted(p.name for p in (tmp_path / "cache" / "stop-or-catch").iterdir()) == [
        "tolerance1-epochs1-stage2-2-key0.1-seed0"  # the default key strength
    ]
    one = soc.train_on_owner(visual, heads, release, (1,), 5e-4, 64)[1]
    taken = soc.train_on_owner(visual, heads, release, (1, 2), 5e-4, 64)
    assert sorted(taken) == [1, 2] and all(torch.equal(taken[1][k], v) for k, v in one.items())
    assert not all(torch.equal(taken[2][k], v) for k, v in one.items())
    # --extend: a seed's kept cells stay; what it lacks is computed, the same as a full run computes it
    lacking = copy.deepcopy(run)
    del lacking["cells"]["uniform TA λ=0.3 | int8 per row"], lacking["negatives"]["partner digits"]
    del lacking["cells"]["TA owner 1 / partners 0.1 | removal 3"]
    lacking["unprotected_grid"].pop("uniform TA λ=0.3")
    lacking["cells"]["TA owner 1 / partners 0.1 | as merged"]["owner"] = -1.0  # a kept cell is not recomputed
    extended = soc.run_seed(0, bar, done=lacking, attacked=("TA owner 1 / partners 0.1",))
    assert extended["cells"].keys() == run["cells"].keys() and extended["negatives"].keys() == run["negatives"].keys()
    for name in ("uniform TA λ=0.3 | int8 per row", "TA owner 1 / partners 0.1 | removal 3"):
        assert extended["cells"][name] == run["cells"][name]
    assert extended["negatives"]["partner digits"] == run["negatives"]["partner digits"]
    assert extended["unprotected_grid"] == run["unprotected_grid"]
    assert extended["cells"]["TA owner 1 / partners 0.1 | as merged"]["owner"] == -1.0
    # every merge repaired (attacked=None): the other merge gains its four repair and removal cells
    everything = soc.run_seed(0, bar, done=run, attacked=None)
    assert len(everything["cells"]) == len(run["cells"]) + 4
    soc.report({"seeds": [run], "tolerance": 1.0}, "vision_smoke")
    assert "vision track" in (tmp_path / "vision_smoke.md").read_text() and (tmp_path / "vision_smoke.png").is_file()
    # key_weighting.py: both weightings on the same cells and negatives; pooled reproduces stop_or_catch exactly
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import key_weighting as kw
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(kw, "RESULTS", tmp_path)
    weighed = kw.run_seed(0, bar, everything)
    # (release alone + 2 merges) x (as merged, noise) + (release alone + the 2 merges in ATTACKED) x 4
    assert len(weighed["cells"]) == 3 * 2 + 3 * 4
    assert weighed["negatives"].keys() == run["negatives"].keys()
    assert weighed["pooled_vs_committed"]["compared"] == 18 + 14
    assert weighed["pooled_vs_committed"]["largest_log10_p_difference"] == 0.0
    for c in weighed["cells"].values():
        assert c["ratio"] == c["owner"] / everything["unprotected_best"]
        assert all(0.0 <= c[w]["p"] <= 1.0 and math.isfinite(c[w]["log10_p"]) for w in kw.WEIGHTINGS)
    assert weighed["cells"]["release alone | as merged"]["snr"]["p"] <= soc.ALPHA
    assert min(n["snr"]["p"] for n in weighed["negatives"].values()) > soc.ALPHA
    kw.report({"seeds": [weighed]})
    assert "snr" in (tmp_path / "key_weighting.md").read_text() and (tmp_path / "key_weighting.png").is_file()
    # key_strength.py: the key removed and embedded again; at the release's own strength it is the release
    from benchmarks import key_strength as ks

    monkeypatch.setattr(ks, "RESULTS", tmp_path)
    monkeypatch.setattr(ks, "STRENGTHS", (0.3,))  # and the release's own, 0.1: the reproduction check
    monkeypatch.setattr(ks, "MERGE", "uniform TA λ=0.3")
    strong = ks.run_seed(0, bar, everything)
    assert list(strong["strengths"]) == ["0.1", "0.3"]
    at_default, stronger = strong["strengths"]["0.1"], strong["strengths"]["0.3"]
    assert at_default["largest_weight_difference_from_committed"] < 1e-5
    assert strong["committed_cells_log10_p_difference"] < 0.01 * max(1.0, -at_default["cells"]["as merged"]["log10_p"])
    assert set(at_default["cells"]) == {
        "as merged",
        "repair 1",
        "repair 2",
        "removal 2",
        "removal 3",
        "noise 6x task vector",
    }
    assert stronger["cells"]["as merged"]["log10_p"] < at_default["cells"]["as merged"]["log10_p"]  # more evidence
    for name, n in at_default["negatives"].items():  # a model made without the key: the same p at every strength
        assert stronger["negatives"][name]["log10_p"] == pytest.approx(n["log10_p"], abs=1e-6)
    assert len(at_default["negatives"]) == 1 + 4 + 1 + soc.INDEPENDENT
    ks.report({"seeds": [strong]})
    assert "strength" in (tmp_path / "key_strength.md").read_text() and (tmp_path / "key_strength.png").is_file()


def test_noise_attack_adds_noise_in_proportion_to_each_task_vector():
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.stop_or_catch import noised
    finally:
        sys.path.remove(str(ROOT))
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(200, 100, generator=g), "b": torch.zeros(100), "step": torch.tensor(3)}
    state = {"w": pre["w"] + 0.01 * torch.randn(200, 100, generator=g), "b": pre["b"], "step": pre["step"]}
    out = noised(state, pre, 4.0, seed=1)
    added = (out["w"] - state["w"]).square().mean().sqrt() / (state["w"] - pre["w"]).square().mean().sqrt()
    assert abs(float(added) - 4.0) < 0.1  # 4x the task vector's RMS
    assert torch.equal(out["b"], state["b"]) and torch.equal(out["step"], state["step"])  # no task vector, no noise
    assert torch.equal(noised(state, pre, 4.0, seed=1)["w"], out["w"])  # seeded


def test_low_rank_attack_keeps_the_top_of_each_task_vector():
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.stop_or_catch_llm import low_rank
    finally:
        sys.path.remove(str(ROOT))
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(40, 30, generator=g)}
    u, v = torch.randn(40, 3, generator=g), torch.randn(30, 3, generator=g)
    tau = u @ v.T + 1e-3 * torch.randn(40, 30, generator=g)  # rank 3 plus noise; 10% of 30 is rank 3
    out = low_rank({"w": pre["w"] + tau}, pre, ["w"])
    kept = out["w"] - pre["w"]
    assert torch.linalg.matrix_rank(kept, atol=1e-4) == 3
    assert float((kept - u @ v.T).norm() / (u @ v.T).norm()) < 1e-2


def test_deployment_seeds_scores_both_models_under_every_treatment_and_its_table_names_the_setting():
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import deployment_seeds
        from benchmarks.deployment_seeds import TREATMENTS, deployed
    finally:
        sys.path.remove(str(ROOT))
    plain = {"w": torch.full((4, 8), 0.5)}
    huge = {"w": torch.full((4, 8), 1e6)}  # fp16 cannot hold it: that treatment scores 0, not NaN
    tuned = []

    def finetune(state, steps, lora):
        tuned.append((steps, lora))
        return {"w": state["w"] * 0.5}

    out = deployed({"unprotected": plain, "release": huge}, lambda s: float(s["w"].mean() > 0.1) * 100, finetune)
    assert set(out["unprotected"]) == set(TREATMENTS) and out["unprotected"]["int8-row"] == 100.0
    assert out["release"]["fp16"] == 0.0 and out["release"]["bf16"] == 100.0
    assert out["loss"]["fp16"] == 100.0 and out["worst_loss"] == 100.0
    assert sorted(tuned) == [(50, False), (50, False), (50, True), (50, True)]
    res = {"seeds": [{"seed": 0, **out}], "track": "llm", "setting": "deployed=['int4-g128']"}
    text = deployment_seeds.table(res)
    assert text.startswith("#### The recommended setting") and "Setting: `deployed=['int4-g128']`." in text
    assert "| fp16 | 100.0 → 0.0 | +100.0 |" in text and "OUTSIDE the 1-point bound" in text
    assert deployment_seeds.table({**res, "recommended": False}).startswith("#### Another setting under deployment")

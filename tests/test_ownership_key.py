"""The ownership key, the alignment that undoes re-parameterisations, the verdict and ``mergeguard-verify``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_mergeguard import Release
from lightning_mergeguard.ownership.alignment import align_to_base, find_unit_groups, permute_units
from lightning_mergeguard.ownership.stats import binomial_tail, bonferroni, hoeffding_tail, log10_hoeffding_tail
from lightning_mergeguard.ownership.verify import verify_ownership
from lightning_mergeguard.ownership.weight_key import (
    DEFAULT_STRENGTH,
    MIN_STRENGTH,
    WeightKey,
    embed_key_checked,
    embed_weight_key,
    embed_weight_key_,
    key_cost_warning,
    key_tensor_names,
    remove_weight_key,
    restrength_weight_key,
    weight_key_test,
)
from tests._helpers import perturbed_state_dict, tiny_llama


def _base_and_finetune(seed: int = 0, shape=(48, 40), scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(*shape, generator=g), "b": torch.randn(shape[1], shape[0], generator=g)}
    ft = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, ft


# ------------------------------------------------------------------ statistics
def test_binomial_tail_is_exact():
    assert binomial_tail(0, 10, 0.3) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(9, 10, 0.5) == pytest.approx(11 / 1024)
    with pytest.raises(ValueError, match="hits <= n"):
        binomial_tail(11, 10, 0.5)


def test_hoeffding_bound_and_its_log_agree_and_bonferroni_caps_at_one():
    assert hoeffding_tail(-1.0) == 1.0 and hoeffding_tail(0.0) == 1.0
    assert math.log10(hoeffding_tail(5.0)) == pytest.approx(log10_hoeffding_tail(5.0))
    assert hoeffding_tail(50.0) == 0.0 and log10_hoeffding_tail(50.0) == pytest.approx(-542.9, abs=0.1)
    assert bonferroni([0.4, 0.9]) == 0.8 and bonferroni([0.7, 0.9]) == 1.0


def test_the_null_distribution_is_calibrated_for_models_made_without_the_key():
    """Suspects that never saw the key (here 400 independent fine-tunes of the same base): p <= 0.05 at most ~5%."""
    base, ft = _base_and_finetune()
    _, key = embed_weight_key(ft, base, secret=11)
    ps, zs = [], []
    for s in range(400):
        g = torch.Generator().manual_seed(1000 + s)
        other = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        r = weight_key_test(other, base, key)
        ps.append(r.p_value)
        zs += [r.z_dense, r.z_subspace]
    assert sum(p <= 0.05 for p in ps) / len(ps) <= 0.05
    z = torch.tensor(zs)
    assert abs(float(z.mean())) < 0.15 and 0.8 < float(z.std()) < 1.2  # about N(0, 1)


# ------------------------------------------------------------------ the key
def test_the_key_is_found_in_the_release_and_in_proportion_in_merges():
    base, ft = _base_and_finetune(shape=(128, 96))
    keyed, key = embed_weight_key(ft, base, secret=5)
    assert key_tensor_names(ft, base) == ["a", "b"] and key.names == ["a", "b"]
    rel = {k: (keyed[k] - ft[k]).norm() / (ft[k] - base[k]).norm() for k in ft}
    s = DEFAULT_STRENGTH  # two parts of s each, nearly orthogonal: about sqrt(2) s together
    assert all(s < float(r) < 1.8 * s for r in rel.values())
    assert weight_key_test(keyed, base, key).log10_p < -20
    assert weight_key_test(ft, base, key).p_value > 1e-3  # the same fine-tune before the key: a negative
    other = perturbed_state_dict(base, seed=9, scale=0.05)
    for lam in (1.0, 0.5):
        merged = {k: base[k] + lam * (keyed[k] - base[k]) + 0.3 * (other[k] - base[k]) for k in base}
        r = weight_key_test(merged, base, key)
        assert r.share_subspace == pytest.approx(lam, abs=0.15) and r.p_value < 1e-6


def test_the_subspace_part_survives_a_low_rank_truncation_that_removes_the_dense_part():
    base, ft = _base_and_finetune(shape=(64, 64))
    keyed, key = embed_weight_key(ft, base, secret=5, rank=8, strength=0.05)  # a weak key: the dense part goes
    cut = {}
    for k in base:
        u, s, vh = torch.linalg.svd(keyed[k] - base[k])
        cut[k] = base[k] + (u[:, :8] * s[:8]) @ vh[:8]
    r = weight_key_test(cut, base, key)
    assert abs(r.z_dense) < 4 < r.z_subspace


def _swamped_merge(seed: int = 0):
    """A keyed release merged at weight 0.3, then four of its six tensors swamped by noise 20x their task vector."""
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(128, 96, generator=g) for i in range(6)}
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    keyed, key = embed_weight_key(ft, base, secret=3)
    loud = {f"t{i}" for i in range(4)}
    swamped = {
        k: base[k] + 0.3 * (keyed[k] - base[k]) + (1.0 if k in loud else 0.01) * torch.randn(base[k].shape, generator=g)
        for k in base
    }
    return base, keyed, key, swamped


def test_snr_weighting_finds_a_key_that_noise_swamped_in_some_tensors():
    """Pooled, the four loud tensors drown the two quiet ones; weighed by signal to noise, the quiet ones speak."""
    base, _, key, swamped = _swamped_merge()
    pooled, snr = (weight_key_test(swamped, base, key, weighting=w) for w in ("pooled", "snr"))
    assert pooled.p_value > 0.05
    assert snr.log10_p < -10 and snr.z_subspace > 8
    assert snr.share_subspace == pytest.approx(0.3, abs=0.1)  # the merge's weight on the release
    assert verify_ownership(swamped, base, key, weighting="snr").derived
    assert not verify_ownership(swamped, base, key).derived


def test_snr_weighting_equals_pooled_on_the_release_and_a_tensor_reset_to_base_cannot_take_it_over():
    base, keyed, key, _ = _swamped_merge()
    pooled, snr = (weight_key_test(keyed, base, key, weighting=w) for w in ("pooled", "snr"))
    assert snr.log10_p == pytest.approx(pooled.log10_p, rel=0.02) and snr.share_subspace == pytest.approx(1.0, abs=0.01)
    reset = {**keyed, "t0": base["t0"].clone()}  # a zero task vector: its variance is 0, its weight stays bounded
    pooled, snr = (weight_key_test(reset, base, key, weighting=w) for w in ("pooled", "snr"))
    assert snr.log10_p < 0.9 * pooled.log10_p < -100


def test_snr_weighting_loses_a_layer_wise_merge_whose_keyless_tensors_are_quieter():
    """Its documented weakness: half the tensors from the release, half from a quieter partner, noise 2x each."""
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(128, 96, generator=g) for i in range(6)}
    release, key = embed_weight_key(
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, base, secret=3, strength=0.05
    )  # the strength benchmarks/key_weighting.py measured it at
    partner = {k: v + 0.015 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    layers = {k: release[k] if i < 3 else partner[k] for i, k in enumerate(base)}
    noisy = {
        k: w + 2 * (w - base[k]).square().mean().sqrt() * torch.randn(w.shape, generator=g) for k, w in layers.items()
    }
    pooled, snr = (weight_key_test(noisy, base, key, weighting=w) for w in ("pooled", "snr"))
    assert pooled.log10_p < -3 < snr.log10_p


def test_snr_weighting_keeps_the_null_calibrated_when_suspects_vary_per_tensor():
    """300 suspects made without the key, loud in some tensors and quiet in others: p <= 0.05 at most ~5%."""
    base, _, key, _ = _swamped_merge()
    ps, zs = [], []
    for s in range(300):
        g = torch.Generator().manual_seed(2000 + s)
        other = {
            k: v + (0.5 if i < 3 else 0.01) * torch.randn(v.shape, generator=g) for i, (k, v) in enumerate(base.items())
        }
        r = weight_key_test(other, base, key, weighting="snr")
        ps.append(r.p_value)
        zs += [r.z_dense, r.z_subspace]
    assert sum(p <= 0.05 for p in ps) / len(ps) <= 0.05 and min(ps) > 1e-3
    z = torch.tensor(zs)
    assert abs(float(z.mean())) < 0.15 and 0.8 < float(z.std()) < 1.2


def test_an_unknown_weighting_is_refused_by_name():
    base, keyed, key, _ = _swamped_merge()
    with pytest.raises(ValueError, match="weighting must be one of"):
        weight_key_test(keyed, base, key, weighting="SNR")
    with pytest.raises(ValueError, match="weighting must be one of"):
        verify_ownership(keyed, base, key, weighting="optimal")


def test_removing_the_key_gives_back_the_weights_it_was_embedded_into_and_rekeying_works():
    base, ft = _base_and_finetune(shape=(64, 48))
    keyed, key = embed_weight_key(ft, base, secret=21, strength=0.05)
    back = remove_weight_key(keyed, base, key)
    assert all(torch.allclose(back[k], ft[k], atol=1e-6) for k in ft)
    assert weight_key_test(back, base, key).p_value > 1e-3  # no key left
    stronger, key2 = embed_weight_key(back, base, secret=21, strength=0.2)
    # the dense part's evidence grows with the strength (the subspace part's, on the release itself, does not)
    assert weight_key_test(stronger, base, key2).z_dense > 3.5 * weight_key_test(keyed, base, key).z_dense
    same, _ = restrength_weight_key(keyed, base, key, 0.05)  # the same strength: the release back
    assert all(torch.allclose(same[k], keyed[k], atol=1e-6) for k in ft)
    stronger, key3 = restrength_weight_key(keyed, base, key, 0.2)
    assert key3.strength == 0.2 and key3.bases is key.bases
    assert weight_key_test(stronger, base, key3).z_dense > 3.5 * weight_key_test(keyed, base, key).z_dense
    with pytest.raises(ValueError, match="lacks"):
        remove_weight_key({"a": keyed["a"]}, base, key)
    with pytest.raises(ValueError, match="strength"):
        restrength_weight_key(keyed, base, key, 0.0)


def test_the_key_round_trips_through_its_file_and_hides_its_secret(tmp_path):
    base, ft = _base_and_finetune()
    keyed, key = embed_weight_key(ft, base, secret=123456789)
    assert "123456789" not in repr(key)
    key.save(tmp_path / "owner.key")
    back = WeightKey.load(tmp_path / "owner.key")
    assert back.secret == key.secret and back.names == key.names
    assert weight_key_test(keyed, base, back).log10_p == pytest.approx(weight_key_test(keyed, base, key).log10_p)
    (tmp_path / "bad.key").write_bytes(b"not a key")
    with pytest.raises(ValueError, match=r"bad\.key"):
        WeightKey.load(tmp_path / "bad.key")


def test_bad_inputs_are_named():
    base, ft = _base_and_finetune()
    with pytest.raises(ValueError, match="nothing to key"):
        embed_weight_key(base, base)
    with pytest.raises(ValueError, match="rank"):
        embed_weight_key(ft, base, rank=1)
    with pytest.raises(ValueError, match="strength"):
        embed_weight_key(ft, base, strength=0.0)
    bad = dict(ft, a=ft["a"].clone())
    bad["a"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        embed_weight_key(bad, base)
    _, key = embed_weight_key(ft, base, secret=1)
    with pytest.raises(ValueError, match="another architecture"):
        weight_key_test({"a": ft["a"]}, base, key)
    with pytest.raises(ValueError, match="another architecture"):
        weight_key_test({"a": ft["a"], "b": torch.zeros(7, 7)}, base, key)


def test_the_in_place_key_changes_live_parameters_and_names_map_onto_a_prefixed_checkpoint():
    base, ft = _base_and_finetune()
    params = {f"lm.model.{k}": nn.Parameter(v.clone()) for k, v in ft.items()}
    key = embed_weight_key_(params, {f"lm.model.{k}": v for k, v in base.items()}, secret=4)
    bare = {k.removeprefix("lm."): p.detach() for k, p in params.items()}
    verdict = verify_ownership(bare, {f"model.{k}": v for k, v in base.items()}, key)
    assert verdict.derived and verdict.log10_p < -20


# ------------------------------------------------------------------ alignment
def _reparameterised(module: nn.Module, state, seed: int = 3, strength: float = 4.0):
    from lightning_mergeguard.protection.release.residual import (
        draw_permutation,
        find_residual_stream,
        permute_residual,
    )
    from lightning_mergeguard.protection.release.symmetry import amplify_state, find_symmetries

    stream = find_residual_stream(module)
    out = permute_residual(state, stream, draw_permutation(stream.width, seed))
    for i, g in enumerate(find_unit_groups(module)):
        out = permute_units(out, g, draw_permutation(g.units, seed + 1 + i))
    return out if strength == 1.0 else amplify_state(out, find_symmetries(module), strength, seed=seed)


@pytest.mark.parametrize("arch", ["llama", "open_clip"])
def test_alignment_undoes_permutations_and_rescaling_without_changing_the_function(arch):
    if arch == "llama":
        module = tiny_llama(0, num_key_value_heads=1).eval()
        x = torch.randint(0, 64, (2, 7))

        def run(m):
            return m(x).logits
    else:
        from lightning_mergeguard.models.open_clip import build_open_clip

        module = build_open_clip("tiny").visual.eval()
        x = torch.randn(2, 3, 32, 32)

        def run(m):
            return m(x)

    groups = find_unit_groups(module)
    assert {g.kind for g in groups} == {"mlp", "heads"}
    base = {k: v.clone() for k, v in module.state_dict().items()}
    ft = perturbed_state_dict(base, seed=1, scale=0.002)
    hidden = _reparameterised(module, ft)
    with torch.no_grad():
        module.load_state_dict(ft)
        want = run(module)
        module.load_state_dict(hidden)
        torch.testing.assert_close(run(module), want, rtol=1e-3, atol=1e-3)  # the same function
    assert max(float((hidden[k] - ft[k]).abs().max()) for k in ft) > 0.1  # in other coordinates

    def distance(a, b):
        return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a))

    # aligned, every re-parameterisation of the fine-tune lands where the fine-tune itself lands: exactly for
    # permutations, up to the scale estimate's error (the fine-tune's own norm changes) for rescaled channels
    reference = align_to_base(ft, base, module)
    permuted_only = _reparameterised(module, ft, strength=1.0)
    assert distance(align_to_base(permuted_only, base, module), reference) < 1e-5 < distance(permuted_only, ft)
    assert distance(align_to_base(hidden, base, module), reference) < 0.02 * distance(hidden, ft)


def test_a_merge_hidden_behind_a_reparameterisation_is_caught_after_alignment():
    module = tiny_llama(0, hidden_size=32, intermediate_size=64).eval()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    ft = perturbed_state_dict(base, seed=1, scale=0.01)
    release, key = embed_weight_key(ft, base, secret=8)
    partner = perturbed_state_dict(base, seed=2, scale=0.01)
    merged = {k: base[k] + (release[k] - base[k]) + 0.3 * (partner[k] - base[k]) for k in base}
    hidden = _reparameterised(module, merged)
    assert not verify_ownership(hidden, base, key, check_base=False).derived  # as published: in other coordinates
    verdict = verify_ownership(hidden, base, key, module=module, check_base=False)
    assert verdict.derived and verdict.tests["white-box key, aligned to base"]["log10_p"] < -10
    for negative in (base, partner, ft):
        assert not verify_ownership(negative, base, key, module=module, check_base=False).derived


def test_removing_the_base_directions_recovers_what_a_scale_estimate_error_hides():
    """An aligned suspect keeps ``(s_hat - s) * theta_pre`` per channel; the aligned test removes those directions."""
    base, ft = _base_and_finetune(shape=(96, 80), scale=0.02)
    release, key = embed_weight_key(ft, base, secret=3, strength=0.05)  # a weak key, where the error shows most
    g = torch.Generator().manual_seed(1)
    off = {k: (1 + 0.01 * torch.randn(v.shape[0], 1, generator=g)) * v for k, v in release.items()}  # 1% row errors
    plain, projected = weight_key_test(off, base, key), weight_key_test(off, base, key, aligned=True)
    assert projected.z_subspace > 1.5 * plain.z_subspace and projected.log10_p < plain.log10_p - 20
    others = [perturbed_state_dict(base, seed=s, scale=0.02) for s in range(50)]
    nulls = [weight_key_test(other, base, key, aligned=True) for other in others]
    assert max(r.z_dense for r in nulls) < 4 and max(r.z_subspace for r in nulls) < 4


# ------------------------------------------------------------------ the verdict
def test_verify_refuses_a_wrong_key_for_the_owner_and_a_suspect_of_another_base():
    from lightning_mergeguard.errors import ForeignBaseError

    base, ft = _base_and_finetune()
    release, key = embed_weight_key(ft, base, secret=1)
    _, other_key = embed_weight_key(ft, base, secret=2)
    with pytest.raises(ValueError, match="does not match the owner"):
        verify_ownership(release, base, other_key, owner=release)
    stranger = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in base.items()}
    with pytest.raises(ForeignBaseError, match="not a fine-tune"):
        verify_ownership(stranger, base, key)
    with pytest.raises(ValueError, match="alpha"):
        verify_ownership(release, base, key, alpha=0.0)
    v = verify_ownership(release, base, key, owner=release)
    assert v.derived and "DERIVED" in v.verdict and json.dumps(v.as_dict())


def test_the_fingerprint_test_gives_an_exact_p_value(monkeypatch):
    from lightning_mergeguard.ownership import fingerprint as fp

    secret = fp.make_fingerprint(n_keys=4, seed=0)
    answers = {"all": [f"... {secret.answer} ..."] * 4, "none": ["I cannot decrypt this message."] * 4}
    for case, texts in answers.items():
        monkeypatch.setattr(fp, "greedy_continuations", lambda *a, _t=texts, **k: _t)
        r = fp.fingerprint_test(None, None, secret)
        if case == "all":
            assert r["hits"] == 4 and r["p_value"] == pytest.approx(1 / 20736)
        else:
            assert r["hits"] == 0 and r["p_value"] == 1.0
    # a model that writes many syllable words: its p-value counts every word it would have matched
    monkeypatch.setattr(fp, "greedy_continuations", lambda *a, **k: [" ".join(fp._answer_space()[:100])] * 4)
    secret_in = fp.FingerprintSecret(secret.keys, fp._answer_space()[0])
    assert fp.fingerprint_test(None, None, secret_in)["p_value"] == pytest.approx(100 / 20736)


# ------------------------------------------------------------------ entry points
def test_protect_module_embeds_a_key_and_the_card_says_so_without_the_secret(tmp_path):
    from lightning_mergeguard.posthoc import model_card, protect_module
    from lightning_mergeguard.protection.stage2 import ScaleAdversarial
    from tests._helpers import TinyClassifier, blobs

    torch.manual_seed(0)
    model = TinyClassifier()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = blobs(256, 0).tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    vx, vy = blobs(128, 1).tensors

    def metric(m):
        return 100.0 * float((m(vx).argmax(-1) == vy).float().mean())

    batches = iter(lambda: (x[:64], y[:64]), None)
    report = protect_module(
        model,
        base,
        batches,
        metric,
        stage2=ScaleAdversarial(steps=20, deployed="int8-row"),
        tolerance=5.0,
        release=Release(ownership_key=tmp_path / "k"),
    )
    entry = report["ownership_key"]
    assert entry["tensors"] >= 2 and report["score_after"] == entry["score_after_key"]
    assert entry["tries"][0][0] == DEFAULT_STRENGTH and entry["within_tolerance"]  # the rail counted the key
    assert report["score_before"] - entry["score_after_key"] <= 5.0
    key = WeightKey.load(tmp_path / "k")
    assert verify_ownership(model.state_dict(), base, key, check_base=False).derived
    card = "\n".join(
        __import__("lightning_mergeguard.protection.verdict", fromlist=["key_paragraph"]).key_paragraph(report)
    )
    assert "ownership key" in card and str(key.secret) not in card
    kept = report["stage2"]["deployed_after"]["int8-row"]  # the card states the format stage 2 held, with scores
    assert (
        f"(stage-1 weights -> protected): int8-row {report['stage2']['deployed_before']['int8-row']:.1f} -> "
        f"{kept:.1f}." in model_card({**report, "tolerance": 5.0, "refit": False})
    )


def test_the_callback_writes_the_key_and_verify_finds_it(tmp_path):
    from lightning_mergeguard import MergeGuardCallback
    from lightning_mergeguard.protection.stage2 import ScaleAdversarial
    from lightning_mergeguard.protection.verdict import release_card
    from tests._helpers import TinyClassifier, trainer

    torch.manual_seed(0)
    module = TinyClassifier()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=10, lr=0.01, deployed=["int8-row", "fp16"]),
        tolerance=5.0,
        release=Release(ownership_key=str(tmp_path / "k")),
    )
    trainer(tmp_path, callbacks=[guard], max_epochs=3).fit(module)
    assert set(guard.report["deployed_after"]) == {"int8-row", "fp16"}  # the report holds each format's score
    # this tiny model is still learning, so no stage-2 check lowers the merge proxy: NOT protected, and the card
    # claims no format; the same report marked protected states each one
    card = release_card(guard.report, "MergeGuardCallback")
    assert not guard.report["protected"] and "NOT protected" in card and "formats users deploy" not in card
    claimed = release_card({**guard.report, "protected": True}, "MergeGuardCallback")
    assert "formats users deploy (stage-1 weights -> protected): int8-row" in claimed and "fp16" in claimed
    assert guard.report["steps_run"] >= 10 and "deployed_short" in guard.report  # the rail's account reaches it
    short = release_card({**guard.report, "protected": True, "deployed_short": {"fp16": 50.0}}, "MergeGuardCallback")
    assert "**Users lose score in fp16**" in short and "held the own score" not in short  # a format still short
    entry = guard.report["ownership_key"]
    assert entry["tensors"] >= 2 and guard.report["score_after"] == entry["score_after_key"]
    verdict = verify_ownership(module.state_dict(), base, WeightKey.load(tmp_path / "k"), check_base=False)
    assert verdict.derived
    with pytest.raises(ValueError, match="directory"):
        MergeGuardCallback(release=Release(ownership_key=str(tmp_path)))


def _hf_dir(tmp_path, name, state, module):
    module.load_state_dict(state)
    module.save_pretrained(tmp_path / name, safe_serialization=True)
    return str(tmp_path / name)


def test_mergeguard_verify_exit_statuses_and_json(tmp_path, capsys):
    from lightning_mergeguard.cli.verify import main

    module = tiny_llama(0, hidden_size=32, intermediate_size=64)
    base = {k: v.clone() for k, v in module.state_dict().items()}
    ft = perturbed_state_dict(base, seed=1, scale=0.01)
    release, key = embed_weight_key(ft, base, secret=8)
    key.save(tmp_path / "owner.key")
    partner = perturbed_state_dict(base, seed=2, scale=0.01)
    merged = {k: base[k] + 0.8 * (release[k] - base[k]) + 0.3 * (partner[k] - base[k]) for k in base}
    dirs = {n: _hf_dir(tmp_path, n, s, module) for n, s in [("base", base), ("release", release),
                                                             ("merge", merged), ("partner", partner)]}  # fmt: skip
    common = ["--base", dirs["base"], "--key", str(tmp_path / "owner.key"), "--owner", dirs["release"]]
    assert main([dirs["merge"], *common, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["derived"] and out["log10_p"] < -10 and len(out["tests"]) == 2
    assert main([dirs["partner"], *common]) == 1
    assert "no evidence" in capsys.readouterr().out
    wide = tiny_llama(0, hidden_size=48, intermediate_size=64)
    other_arch = _hf_dir(tmp_path, "wide", wide.state_dict(), wide)
    assert main([other_arch, *common]) == 2
    assert "architecture" in capsys.readouterr().err
    (tmp_path / "junk.key").write_text("x")
    assert main([dirs["merge"], "--base", dirs["base"], "--key", str(tmp_path / "junk.key")]) == 2
    assert "junk.key" in capsys.readouterr().err


def test_the_key_alone_is_embedded_but_never_reported_as_protection(tmp_path):
    from lightning_mergeguard import KeepWeights, MergeGuardCallback
    from tests._helpers import TinyClassifier, trainer

    torch.manual_seed(0)
    module = TinyClassifier()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    guard = MergeGuardCallback(stage2=KeepWeights(), progress=False, release=Release(ownership_key=str(tmp_path / "k")))
    with pytest.warns(UserWarning, match="NOT protected: no weight changed but the ownership key's"):
        trainer(tmp_path, callbacks=[guard], max_epochs=2).fit(module)
    assert guard.report["protected"] is False and guard.report["ownership_key"]["tensors"] >= 2
    assert "traceable (mergeguard-verify), not stopped" in guard.report["not_protected"]
    assert "unprotected fine-tune" not in guard.report["not_protected"]  # the key did change the weights
    assert verify_ownership(module.state_dict(), base, WeightKey.load(tmp_path / "k"), check_base=False).derived
    with pytest.raises(Exception, match="KeepWeights"):
        trainer(
            tmp_path, callbacks=[MergeGuardCallback(stage2="none", release=Release(ownership_key=str(tmp_path / "k2")))]
        ).fit(TinyClassifier())


# ------------------------------------------------------------------ the guard rail counts the key's cost
def _live(seed: int = 0):
    base, ft = _base_and_finetune(seed, shape=(64, 48))
    return base, {k: torch.nn.Parameter(v.clone()) for k, v in ft.items()}


def test_the_key_is_halved_until_stage_2_and_the_key_fit_the_tolerance():
    base, params = _live()
    ft = {k: p.detach().clone() for k, p in params.items()}

    def metric() -> float:  # a score that loses 100 points per unit of relative change: 0.1 -> ~14, 0.025 -> ~3.5
        rel = sum(float((params[k] - ft[k]).norm() / (ft[k] - base[k]).norm()) for k in ft) / len(ft)
        return 90.0 - 100.0 * rel

    entry = embed_key_checked(params, base, None, metric, secret=4, lowest=80.0)
    assert entry["requested_strength"] == DEFAULT_STRENGTH and entry["strength"] == DEFAULT_STRENGTH / 2
    assert [s for s, _ in entry["tries"]] == [DEFAULT_STRENGTH, DEFAULT_STRENGTH / 2]
    assert entry["tries"][0][1] < 80.0 <= entry["score_after_key"] and entry["within_tolerance"]
    # the live weights hold exactly the key at the kept strength: the same as embedding it there directly
    direct, _ = embed_weight_key(ft, base, secret=4, strength=DEFAULT_STRENGTH / 2)
    for k in ft:
        torch.testing.assert_close(params[k].detach(), direct[k], atol=1e-6, rtol=0)
    warning = key_cost_warning(entry, 90.0, 10.0)
    assert "weakened to strength 0.05 (asked: 0.1)" in warning


def test_a_key_that_never_fits_stops_at_the_floor_and_says_so():
    base, params = _live(1)
    entry = embed_key_checked(params, base, None, lambda: 0.0, secret=4, lowest=50.0)
    assert entry["strength"] == MIN_STRENGTH and not entry["within_tolerance"] and len(entry["tries"]) == 3
    assert "more than the tolerance (1) even at strength 0.025" in key_cost_warning(entry, 60.0, 1.0)
    # without a floor score nothing is halved, and a key that fits is not touched either
    base, params = _live(2)
    assert embed_key_checked(params, base, None, lambda: 0.0, secret=4)["tries"] == [[DEFAULT_STRENGTH, 0.0]]
    base, params = _live(3)
    fits = embed_key_checked(params, base, None, lambda: 90.0, secret=4, strength=0.3, lowest=89.0)
    assert fits["strength"] == 0.3 and key_cost_warning(fits, 90.0, 1.0) is None


@pytest.mark.parametrize("bad", [0.0, 0.01, 0.6, True, "0.1", float("nan")])
def test_release_key_strength_is_validated(bad):
    with pytest.raises(ValueError, match=r"key_strength must be a number in \[0.025, 0.5\]"):
        Release(ownership_key="owner.key", key_strength=bad)
    assert Release(key_strength=0.2).settings()["key_strength"] == 0.2 and Release().key_strength == DEFAULT_STRENGTH


def test_the_callback_and_protect_module_hand_the_guard_rail_to_the_key(tmp_path, monkeypatch):
    """Both entry points pass the strength asked for and the lowest score allowed, and warn on what comes back."""
    from lightning_mergeguard import MergeGuardCallback
    from lightning_mergeguard.ownership import weight_key
    from lightning_mergeguard.protection.stage2 import ScaleAdversarial
    from tests._helpers import TinyClassifier, trainer

    seen = {}
    real = weight_key.embed_key_checked

    def spy(*args, **kwargs):
        entry = real(*args, **kwargs)
        seen.update(kwargs)
        return {**entry, "within_tolerance": False}  # as if even the floor cost too much

    monkeypatch.setattr(weight_key, "embed_key_checked", spy)
    torch.manual_seed(0)
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=4, lr=0.01),
        tolerance=3.0,
        progress=False,
        release=Release(ownership_key=str(tmp_path / "k"), key_strength=0.2),
    )
    with pytest.warns(UserWarning, match="ownership key costs .* more than the tolerance \\(3\\)"):
        trainer(tmp_path, callbacks=[guard], max_epochs=2).fit(TinyClassifier())
    assert seen["strength"] == 0.2 and seen["lowest"] == pytest.approx(guard.report["score_before"] - 3.0)
    assert guard.report["ownership_key"]["requested_strength"] == 0.2


def test_the_key_is_checked_in_the_deployed_formats_too():
    """A key that fits at full precision but costs too much in a deployed format is halved as well."""
    base, params = _live(4)
    ft = {k: p.detach().clone() for k, p in params.items()}

    def in_formats() -> dict[str, float]:  # only int4 feels the key: 100 points per unit of relative change
        rel = sum(float((params[k] - ft[k]).norm() / (ft[k] - base[k]).norm()) for k in ft) / len(ft)
        return {"int4-g128": 90.0 - 100.0 * rel, "fp16": 90.0}

    entry = embed_key_checked(
        params, base, None, lambda: 90.0, secret=4, lowest=89.0, formats=in_formats, format_lowest={"int4-g128": 80.0}
    )
    assert [t[0] for t in entry["tries"]] == [DEFAULT_STRENGTH, DEFAULT_STRENGTH / 2] and entry["within_tolerance"]
    assert entry["tries"][0][2]["int4-g128"] < 80.0 <= entry["deployed_after_key"]["int4-g128"]
    assert entry["deployed_lowest"] == {"int4-g128": 80.0} and entry["score_after_key"] == 90.0
    # a format no strength can hold: the floor, and the warning names the format
    base, params = _live(5)
    entry = embed_key_checked(
        params, base, None, lambda: 90.0, secret=4, lowest=89.0,
        formats=lambda: {"int4-g128": 10.0}, format_lowest={"int4-g128": 80.0},
    )  # fmt: skip
    assert entry["strength"] == MIN_STRENGTH and not entry["within_tolerance"]
    assert "leaves int4-g128 10.0 (lowest allowed 80.0)" in key_cost_warning(entry, 90.0, 1.0)


def test_the_callback_checks_the_key_in_the_formats_stage_2_holds(tmp_path, monkeypatch):
    from lightning_mergeguard import MergeGuardCallback
    from lightning_mergeguard.ownership import weight_key
    from lightning_mergeguard.protection.stage2 import ScaleAdversarial
    from tests._helpers import TinyClassifier, trainer

    seen = {}
    real = weight_key.embed_key_checked

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(weight_key, "embed_key_checked", spy)
    torch.manual_seed(0)
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=2, lr=0.01, deployed=["int8-row"]),
        tolerance=3.0,
        progress=False,
        release=Release(ownership_key=str(tmp_path / "k")),
    )
    trainer(tmp_path, callbacks=[guard], max_epochs=2).fit(TinyClassifier())
    before, after = guard.report["score_before"], guard.report["deployed_after"]["int8-row"]
    want = before - 3.0 if after >= before - 3.0 else after - 3.0
    assert seen["format_lowest"] == {"int8-row": pytest.approx(want)}
    key = guard.report["ownership_key"]
    assert set(key["deployed_after_key"]) == {"int8-row"} and len(key["tries"][0]) == 3
    assert key["deployed_after_key"]["int8-row"] >= want and key["within_tolerance"]

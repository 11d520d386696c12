"""Ownership signals on a tiny Llama with a byte-level tokenizer: learned, verified deterministically, secret."""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_lm, train_rows

from lightning_mergeguard.ownership import (
    FingerprintSecret,
    FingerprintSignal,
    Watermark,
    WatermarkSignal,
    fingerprint_rows,
    int8_roundtrip,
    make_fingerprint,
    make_watermark,
    verify_fingerprint,
    verify_watermark,
    watermark_rows,
)

SHORT = "K:{key}\nA:"


def test_fingerprint_is_learned_verified_deterministically_and_absent_elsewhere(byte_tokenizer):
    base = make_fingerprint(n_keys=4, seed=1, key_length=6)
    secret = FingerprintSecret(base.keys, base.answer, prompt=SHORT)
    rows = fingerprint_rows(secret, repeats=2, n_regularization=4, seed=0)
    model = train_rows(tiny_lm(), byte_tokenizer, rows, steps=150)
    assert verify_fingerprint(model, byte_tokenizer, secret, max_new_tokens=12) == 1.0
    assert verify_fingerprint(model, byte_tokenizer, secret, max_new_tokens=12) == 1.0  # deterministic
    assert verify_fingerprint(tiny_lm(seed=3), byte_tokenizer, secret, max_new_tokens=12) == 0.0
    other = make_fingerprint(n_keys=4, seed=2, key_length=6)
    assert verify_fingerprint(model, byte_tokenizer, FingerprintSecret(other.keys, "Zzqx", SHORT), 12) == 0.0
    # The probe's signal is the same number.
    assert FingerprintSignal(secret, byte_tokenizer, max_new_tokens=12)(model) == 1.0


def test_secrets_stay_out_of_reprs_and_round_trip_through_files(tmp_path):
    secret = make_fingerprint(seed=5)
    assert secret.answer not in repr(secret) and secret.keys[0] not in repr(FingerprintSignal(secret, None))
    secret.save(tmp_path / "fp.json")
    assert FingerprintSecret.load(tmp_path / "fp.json") == secret
    wm = make_watermark(seed=5)
    assert wm.response not in repr(wm)
    wm.save(tmp_path / "wm.json")
    assert Watermark.load(tmp_path / "wm.json") == wm
    (tmp_path / "bad.json").write_text('{"keys": []}')
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        FingerprintSecret.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="n_keys"):
        make_fingerprint(n_keys=0)


def test_int8_roundtrip_rounds_to_the_absmax_grid():
    w = torch.tensor([[1.27, 0.004, -0.016], [0.0, 0.0, 0.0]])
    out = int8_roundtrip({"w": w, "b": torch.tensor([0.123])})
    torch.testing.assert_close(out["w"], torch.tensor([[1.27, 0.0, -0.02], [0.0, 0.0, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([0.123]))  # 1-D tensors are not quantized
    tensor_scale = int8_roundtrip({"w": w}, granularity="tensor")["w"]
    torch.testing.assert_close(tensor_scale[0], torch.tensor([1.27, 0.0, -0.02]))


def test_quantization_watermark_exists_in_full_precision_only(byte_tokenizer):
    from lightning_mergeguard.callbacks.quantization_watermark import QuantizationWatermark

    wm = Watermark(("T1:", "T2:"), " OWNED")
    model = tiny_lm(seed=1)
    # LLM weights have outliers that set per-tensor scales and leave room inside each rounding interval; give
    # every matrix one (in the embedding/output row of a byte the test never uses).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p[-2, -1] = 1.0
    original = int8_roundtrip(dict(model.named_parameters()), granularity="tensor")
    cb = QuantizationWatermark(margin=0.45, granularity="tensor")

    cb.on_fit_start(None, model)  # only reads named_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_rows(model, byte_tokenizer, watermark_rows(wm, repeats=1), steps=200, after_step=cb.project_)
    after = int8_roundtrip(dict(model.named_parameters()), granularity="tensor")
    for n, t in original.items():
        assert torch.equal(after[n], t), f"int8 weights of {n} changed"
    moved = sum(float((p.detach() - before[n]).abs().sum()) for n, p in model.named_parameters())
    assert moved > 0
    assert verify_watermark(model, byte_tokenizer, wm, max_new_tokens=8, granularity="tensor") == 1.0
    assert verify_watermark(model, byte_tokenizer, wm, int8=True, max_new_tokens=8, granularity="tensor") == 0.0
    # The probe's signals verify with the same scheme.
    assert WatermarkSignal(wm, byte_tokenizer, max_new_tokens=8, granularity="tensor")(model) == 1.0
    assert WatermarkSignal(wm, byte_tokenizer, int8=True, max_new_tokens=8, granularity="tensor")(model) == 0.0
    with pytest.raises(ValueError, match="margin"):
        QuantizationWatermark(margin=0.5)

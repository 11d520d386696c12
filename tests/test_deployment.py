"""The deployment check: quantizers as pure tensor functions, and a check that sees what breaks a release."""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_llama

from lightning_mergeguard.protection.release.deployment import deployment_check
from lightning_mergeguard.quantization import gguf_roundtrip, int4_groups, int8_rows, treated_state


def test_quantizers_round_to_their_grids():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    for fn, levels, tol in [(int8_rows, 255, 0.01), (lambda t: int4_groups(t, 32), 16, 0.15)]:
        q = fn(w)
        assert q.shape == w.shape and float((q - w).norm() / w.norm()) < tol
        assert len(torch.unique(q[0, :32])) <= levels
    # a group's scale is its own: one large entry does not flatten the other groups of its row
    w[0, 0] = 100.0
    assert float((int4_groups(w, 32)[0, 32:] - w[0, 32:]).abs().max()) < 0.5
    assert float((int8_rows(w)[0, 32:] - w[0, 32:]).abs().max()) > 0.2  # a per-row scale does flatten them
    q8 = gguf_roundtrip(w, "Q8_0")
    assert float((q8 - w)[1:].norm() / w[1:].norm()) < 0.01
    odd = torch.randn(3, 33)
    assert torch.equal(gguf_roundtrip(odd, "Q4_0"), odd)  # rows that are not whole blocks stay as they are
    state = treated_state({"w": w, "norm": torch.full((4,), 1.0001)}, "int8-row")
    assert torch.equal(state["norm"], torch.full((4,), 1.0001))  # norms and biases are not quantized
    with pytest.raises(ValueError, match="unknown weight treatment 'int3'"):
        treated_state({"w": w}, "int3")


def _q4_k_bytes(d, dmin, ls, lm, q):
    """llama.cpp's ``block_q4_K`` bytes (fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles)."""
    import numpy as np

    ls, lm, q = (t.to(torch.uint8).numpy() for t in (ls, lm, q))
    scales = np.zeros((*ls.shape[:-1], 12), np.uint8)
    scales[..., 0:4], scales[..., 4:8] = ls[..., :4], lm[..., :4]
    scales[..., 8:12] = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    scales[..., 0:4] |= (ls[..., 4:] >> 4) << 6
    scales[..., 4:8] |= (lm[..., 4:] >> 4) << 6
    pairs = q.reshape(*q.shape[:-2], 4, 2, 32)  # values 64j..64j+31 in the low nibbles, the next 32 in the high
    qs = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(*q.shape[:-2], 128)
    halves = [t.half().numpy().view(np.uint8).reshape(*t.shape[:-1], 2) for t in (d, dmin)]
    return np.concatenate([*halves, scales, qs], axis=-1).reshape(q.shape[0], -1)


def test_q4_k_is_llama_cpps_layout_read_back_by_the_gguf_package():
    """The values are what the gguf package decodes from the Q4_K blocks they come from, and close to the input."""
    from gguf import GGMLQuantizationType, quants

    from lightning_mergeguard.quantization import _q4_k_parts, _q4_k_values, q4_k_roundtrip

    torch.manual_seed(0)
    w = torch.randn(6, 512) * torch.rand(6, 1) * 3
    w[1, :256] = 0.0  # a flat block
    w[2] = w[2].abs()  # all positive: the min is held at 0
    w[3, 5] = 40.0  # one outlier: its sub-block's scale only
    mine = q4_k_roundtrip(w)
    blocks = _q4_k_bytes(*_q4_k_parts(w.reshape(6, 2, 8, 32)))
    assert blocks.shape == (6, 2 * 144)
    theirs = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q4_K))
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    assert torch.equal(mine[1, :256], torch.zeros(256))
    assert float((mine - w)[[0, 4, 5]].norm() / w[[0, 4, 5]].norm()) < 0.1  # 4 bits: about 7% of the norm
    assert float((mine[3, 64:] - w[3, 64:]).abs().max()) < 0.5 * float(w[3, 64:].abs().max())
    # the weighted search beats plain min-max rounding of the same sub-blocks
    x = w[[0, 4, 5]].reshape(-1, 32)
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    minmax = torch.round((x - low) / (high - low) * 15) * (high - low) / 15 + low
    assert float((mine[[0, 4, 5]].reshape(-1, 32) - x).norm()) < float((minmax - x).norm())
    big = torch.randn(2**14 + 3, 256)  # more rows than one chunk of the search
    assert torch.equal(q4_k_roundtrip(big), _q4_k_values(*_q4_k_parts(big.reshape(-1, 1, 8, 32))).reshape(-1, 256))
    # rows that are not whole blocks of 256 fall back to Q5_0, as llama-quantize does
    narrow = torch.randn(3, 96)
    torch.testing.assert_close(q4_k_roundtrip(narrow), gguf_roundtrip(narrow, "Q5_0"))


def _agreement(model, ids, want):
    with torch.no_grad():
        got = model(ids).logits.argmax(-1)
    return 100.0 * float((got == want).float().mean())


def test_the_check_sees_a_release_that_fp16_and_int8_break_and_restores_the_model():
    """2**20 amplifying scales keep the fp32 function but not fp16's or per-row int8's: the check must show it."""
    from lightning_mergeguard.protection.release.symmetry import amplify_module_

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    plain = tiny_llama(seed=0).eval()
    with torch.no_grad():
        want = plain(ids).logits.argmax(-1)
    batches = iter(lambda: {"input_ids": ids, "labels": ids}, None)
    loss = lambda m, b: m(**b).loss  # noqa: E731

    def metric(m):
        return _agreement(m, ids, want)

    before = {k: v.clone() for k, v in plain.state_dict().items()}
    scores = deployment_check(plain, metric, batches=batches, loss_fn=loss, steps=3)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())  # restored
    assert set(scores) == {"none", "fp16", "bf16", "int8-row", "int4-g32", "int4-g128", "gguf-q8_0", "gguf-q4_0",
                           "gguf-q4_k", "finetune", "finetune-lora"}  # fmt: skip
    assert scores["none"] == 100.0 and min(scores["fp16"], scores["int8-row"], scores["gguf-q8_0"]) >= 90.0
    amplified = tiny_llama(seed=0).eval()
    amplify_module_(amplified, strength=2.0**20, forward=lambda: amplified(ids))
    hit = deployment_check(amplified, metric, treatments=["fp16", "int8-row", "bf16"])
    assert hit["none"] == 100.0 and hit["bf16"] >= 90.0  # powers of two: exact in bf16
    assert hit["fp16"] < 50.0 and hit["int8-row"] < scores["int8-row"] - 10  # 0% on SmolLM2 (16-wide rows here)
    with pytest.raises(ValueError, match="need batches= and loss_fn="):
        deployment_check(plain, metric, treatments=["finetune"])

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
                           "finetune", "finetune-lora"}  # fmt: skip
    assert scores["none"] == 100.0 and min(scores["fp16"], scores["int8-row"], scores["gguf-q8_0"]) >= 90.0
    amplified = tiny_llama(seed=0).eval()
    amplify_module_(amplified, strength=2.0**20, forward=lambda: amplified(ids))
    hit = deployment_check(amplified, metric, treatments=["fp16", "int8-row", "bf16"])
    assert hit["none"] == 100.0 and hit["bf16"] >= 90.0  # powers of two: exact in bf16
    assert hit["fp16"] < 50.0 and hit["int8-row"] < scores["int8-row"] - 10  # 0% on SmolLM2 (16-wide rows here)
    with pytest.raises(ValueError, match="need batches= and loss_fn="):
        deployment_check(plain, metric, treatments=["finetune"])

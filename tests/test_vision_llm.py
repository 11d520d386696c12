"""open_clip and transformers integration: local checkpoints, the guard on a ViT tower and on a tiny Llama."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _helpers import fit_ddp_ranks, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_mergeguard import (
    KeepWeights,
    MergeGuardCallback,
    Negation,
    ParameterSelection,
    Release,
    ScaleAdversarial,
)
from lightning_mergeguard.demos.digits import digits_task_data
from lightning_mergeguard.protection.release.residual import draw_permutation

open_clip = pytest.importorskip("open_clip")


def test_open_clip_local_checkpoint_roundtrip(tmp_path):
    from lightning_mergeguard.models.open_clip import build_open_clip

    torch.manual_seed(0)
    clip = build_open_clip("tiny")
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    again = build_open_clip("tiny", checkpoint=path)
    for (k, a), b in zip(clip.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        build_open_clip("tiny", checkpoint=tmp_path / "missing.pt")


def test_guard_on_open_clip_tower_excludes_embeddings_and_norms(tmp_path):
    from lightning_mergeguard.models.open_clip import ClipImageClassifier, build_open_clip

    pl.seed_everything(0)
    clip = build_open_clip("tiny")
    module = ClipImageClassifier(clip.visual, clip.visual.output_dim)
    guard = MergeGuardCallback(
        stage2=Negation(critical_fraction=0.0, small_fraction=0.0),
        tolerance=100.0,
        progress=False,
        parameters=ParameterSelection(include=[r"^visual\."]),
    )
    train = DataLoader(digits_task_data("plain", "train"), batch_size=64, shuffle=True)
    val = DataLoader(digits_task_data("plain", "val"), batch_size=128)
    before = {}

    class Keep(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer(tmp_path, max_epochs=1, limit_train_batches=4, callbacks=[guard, Keep()]).fit(module, train, val)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    left_out = {
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
    }
    assert changed == {n for n in before if n.startswith("visual.")} - left_out
    assert guard.report["parameters_perturbed"] == len(changed)


def _fit_tiny_llama(tmp_path, guard, frozen: str | None = None):
    """A tiny Llama's CausalLMModule, its initial weights, after one epoch on random tokens with ``guard``."""
    from _helpers import tiny_llama

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    pl.seed_everything(0)
    ids = torch.randint(0, 64, (32, 12))
    data = [
        {"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, 12, dtype=torch.long), "labels": ids[i : i + 8]}
        for i in range(0, 32, 8)
    ]
    module = CausalLMModule(tiny_llama(), lr=1e-3)
    if frozen is not None:
        dict(module.named_parameters())[frozen].requires_grad_(False)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    loader = DataLoader(data, batch_size=None)
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(module, loader, loader)
    return module, initial


def test_guard_on_tiny_llama_leaves_embeddings_norm_and_head(tmp_path):
    guard = MergeGuardCallback(
        alpha=0.01, stage2=ScaleAdversarial(steps=4), eval_batches=2, tolerance=100.0, progress=False
    )
    module, initial = _fit_tiny_llama(tmp_path, guard)
    r = guard.report
    stage2_names = {n for n, _ in module.named_parameters() if n.startswith("model.model.layers.")}
    assert r["parameters_perturbed"] == len(stage2_names)
    assert all(not torch.equal(p, initial[n]) for n, p in module.named_parameters())  # stage 1 trains everything


def test_guard_amplify_on_tiny_llama_keeps_outputs_and_is_reported(tmp_path):
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2=ScaleAdversarial(steps=2),
        eval_batches=2,
        tolerance=100.0,
        progress=False,
        release=Release(amplify=100.0),
    )
    module, _ = _fit_tiny_llama(tmp_path, guard)
    amp = guard.report["amplify"]
    assert amp["groups"] == {"norm->linear": 4, "q/k": 2, "v/o": 2, "up/down": 2} and not amp["reverted"]
    assert amp["applied"] and amp["dropped"] == [] and max(amp["checked"].values()) == 0.0  # bit for bit
    assert amp["score_after"] == amp["score_before"]
    assert guard.report["score_after"] == amp["score_after"] and guard.report["settings"]["amplify"] == 100.0
    norm = module.model.model.layers[0].input_layernorm.weight
    assert float(norm.max()) > 5.0  # norms were ones at init: scaled up, the linears they feed scaled down
    # Training the amplified model further (stage 1 would pull rescaled weights towards theta_pre) is refused
    # before its first optimizer step changes anything.
    amplified = {n: p.detach().clone() for n, p in module.named_parameters()}
    loader = DataLoader([{"input_ids": torch.randint(0, 64, (4, 12))} for _ in range(2)], batch_size=None)
    for b in loader.dataset:
        b["labels"] = b["input_ids"]
    with pytest.raises(MisconfigurationException, match="amplified at the end of an earlier fit"):
        trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(module, loader)
    assert all(torch.equal(p, amplified[n]) for n, p in module.named_parameters())


def test_guard_permute_residual_on_tiny_llama_permutes_the_stream_after_amplify(tmp_path):
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2=ScaleAdversarial(steps=2),
        eval_batches=2,
        tolerance=100.0,
        progress=False,
        release=Release(amplify=100.0, permute_residual=True),
    )
    module, initial = _fit_tiny_llama(tmp_path, guard, frozen="model.model.embed_tokens.weight")
    amp = guard.report["amplify"]
    assert amp["applied"] and amp["residual"]["applied"] and amp["residual"]["change"] <= 1e-4
    assert amp["residual"]["width"] == 16 and guard.report["settings"]["permute_residual"] is True
    emb = module.model.model.embed_tokens.weight.detach()
    before = initial["model.model.embed_tokens.weight"]
    perm = draw_permutation(16)
    assert torch.equal(emb, before[:, perm])  # frozen (not fine-tuned), then permuted all the same


def test_guard_amplify_without_stage_2_rewrites_the_fine_tune_alone(tmp_path):
    """stage2="none" with amplify: the fine-tuned weights, re-parameterised, compute what they computed."""

    class Logits(pl.Callback):  # runs before the guard's on_train_end: the fine-tune's outputs
        def on_train_end(self, trainer, pl_module):
            batch = {"input_ids": torch.arange(24).reshape(2, 12) % 64}
            with torch.no_grad():
                self.before = pl_module.model(**batch).logits.clone()

    logits = Logits()
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2="none",
        eval_batches=2,
        progress=False,
        release=Release(amplify=2.0**20, permute_residual=True),
    )
    assert isinstance(guard.stage2, KeepWeights)
    from _helpers import tiny_llama

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    pl.seed_everything(0)
    ids = torch.randint(0, 64, (32, 12))
    data = [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in range(0, 32, 8)]
    module = CausalLMModule(tiny_llama(), lr=1e-3)
    loader = DataLoader(data, batch_size=None)
    trainer(tmp_path, max_epochs=1, callbacks=[logits, guard]).fit(module, loader, loader)
    r, amp = guard.report, guard.report["amplify"]
    assert r["method"] == "none" and r["relative_perturbation"] == 0.0 and r["validation_passes"] == 2
    assert amp["applied"] and max(amp["checked"].values()) == 0.0 and amp["residual"]["applied"]
    assert amp["score_after"] == amp["score_before"] == r["score_before"]
    norm = module.model.model.layers[0].input_layernorm.weight
    assert float(norm.abs().max()) > 2.0**10  # scales up to 2**20 (log-uniform powers of two)
    with torch.no_grad():
        after = module.model(input_ids=torch.arange(24).reshape(2, 12) % 64).logits
    torch.testing.assert_close(after, logits.before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"permute_residual": True}, "set amplify too"),
        ({"amplify": 10.0, "permute_residual": 1}, "True or False"),
        ({"amplify": 1.0}, "amplify must be a finite number >= 2"),
        ({"amplify": True}, "amplify must be a finite number >= 2"),
    ],
)
def test_guard_amplify_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeGuardCallback(release=Release(**kwargs))


@pytest.mark.distributed
def test_guard_amplify_under_ddp_gives_every_rank_the_same_model(tmp_path):
    """Each rank checks the symmetries on its own batch; the decision is averaged, so the ranks stay identical."""
    from _helpers import tiny_llama

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    pl.seed_everything(0)
    ids = torch.randint(0, 64, (32, 12))
    data = [{"input_ids": ids[i : i + 4], "labels": ids[i : i + 4]} for i in range(0, 32, 4)]
    loader = DataLoader(data, batch_size=None)
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2=ScaleAdversarial(steps=2),
        eval_batches=2,
        tolerance=100.0,
        progress=False,
        release=Release(amplify=100.0),
    )
    r0, r1 = fit_ddp_ranks(tmp_path, CausalLMModule(tiny_llama(), lr=1e-3), guard, loader, loader)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert float(r0["model.model.layers.0.input_layernorm.weight"].max()) > 5.0  # amplified on both ranks

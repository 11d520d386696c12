"""Both callbacks on a live PEFT LoRA model: stage 1 on B @ A * s, stage 2 written back into the adapter, the probe
merging the effective weights W + B @ A * s."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _helpers import perturbed_state_dict, tiny_llama, trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeGuardCallback, MergeProbe, ProbeSchedule
from lightning_mergeguard.adapters import LoraPair, LoraView, base_name, factor_update, lora_redistribution_grad_
from lightning_mergeguard.evaluation import default_score, evaluate
from lightning_mergeguard.merging import merge
from lightning_mergeguard.models.causal_lm import CausalLMModule
from lightning_mergeguard.protection.stage2 import Stage2, Stage2Context

peft = pytest.importorskip("peft")


def peft_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **config}
    model = get_peft_model(tiny_llama(seed).to(dtype), LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B, as after some training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def lm_batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (8 * n, 12), generator=g)
    return [
        {"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, 12, dtype=torch.long), "labels": ids[i : i + 8]}
        for i in range(0, 8 * n, 8)
    ]


def test_base_names_and_merged_view_equal_peft_merge_and_unload():
    model = peft_llama(modules_to_save=["lm_head"])
    view = LoraView(model)
    plain = dict(tiny_llama().named_parameters())
    assert set(view.params) == set(plain)  # every base weight, under the base model's names
    assert set(view.pairs) == {n for n in plain if any(t in n for t in ("q_proj", "v_proj", "down_proj"))}
    assert "lm_head.weight" in view.trained_names() and "model.norm.weight" not in view.trained_names()
    base = {n: t.detach().clone() for n, t in view.base_tensors().items()}
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)  # trained in full
    ids = torch.randint(0, 64, (2, 7))
    out_before = model(input_ids=ids).logits
    want = {k: v.clone() for k, v in peft_llama(modules_to_save=["lm_head"]).merge_and_unload().state_dict().items()}
    want["lm_head.weight"] = want["lm_head.weight"] + 1.0
    with view.merged() as params:
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(model(input_ids=ids).logits, out_before, rtol=1e-4, atol=1e-5)
        params["model.layers.0.self_attn.q_proj.weight"].data.add_(3.0)  # a probe's merge written in
    for n, t in view.base_tensors().items():
        if n != "lm_head.weight":
            assert torch.equal(t, base[n]), n  # restored bit for bit
    assert torch.equal(model(input_ids=ids).logits, out_before)
    assert base_name("model.base_model.model.model.embed_tokens.weight") == "model.model.embed_tokens.weight"


def test_merged_view_restores_bf16_base_weights_exactly():
    model = peft_llama(dtype=torch.bfloat16)
    view = LoraView(model)
    before = {n: p.detach().clone() for n, p in view.params.items()}
    with view.merged():
        pass
    assert all(torch.equal(p, before[n]) for n, p in view.params.items())  # W + d - d would round in bf16


def test_factor_update_recovers_low_rank_and_reports_the_residual():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 9, generator=g)
    a, b, res = factor_update(low, rank=4, scaling=2.0)
    assert a.shape == (4, 9) and b.shape == (12, 4) and res < 1e-5
    torch.testing.assert_close(b @ a * 2.0, low, atol=1e-4, rtol=0)
    full = torch.randn(12, 9, generator=g)
    a, b, res = factor_update(full, rank=2, scaling=1.0)
    s = torch.linalg.svdvals(full)
    assert res == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)  # Eckart-Young: the best rank-2


@pytest.mark.parametrize("normalize", [False, True])
def test_lora_stage1_gradient_equals_autograd_of_the_update_penalty(normalize):
    g = torch.Generator().manual_seed(1)
    a = nn.Parameter(torch.randn(3, 10, generator=g))
    b = nn.Parameter(torch.randn(7, 3, generator=g))
    term = 0.3 * (1 / 70 if normalize else 1) * ((b @ a) * 1.5).pow(2).sum()
    ga, gb = torch.autograd.grad(term, [a, b])
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    value = lora_redistribution_grad_({"w": LoraPair(a, b, 1.5, True, 70)}, alpha=0.3, normalize=normalize)
    assert value == pytest.approx(float(term), rel=1e-5)
    torch.testing.assert_close(a.grad, ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, gb, rtol=1e-5, atol=1e-6)


def _fit(tmp_path, model, callbacks, steps: int = 6, seed: int = 0):
    pl.seed_everything(seed)
    module = CausalLMModule(model, lr=5e-3)
    loader = DataLoader(lm_batches(), batch_size=None)
    trainer(tmp_path, max_steps=steps, callbacks=callbacks, num_sanity_val_steps=0).fit(module, loader, loader)
    return module


def test_stage1_shrinks_the_adapter_update_and_trains_only_the_adapter(tmp_path):
    norms = {}
    for alpha in (0.0, 50.0):
        model = peft_llama()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        guard = MergeGuardCallback(alpha=alpha, stage2=None, progress=False)
        _fit(tmp_path / str(alpha), model, [guard])
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        norms[alpha] = sum(float(pair.delta().norm() ** 2) for pair in guard._pairs.values()) ** 0.5
    assert norms[50.0] < 0.7 * norms[0.0]


class AddLowRank(Stage2):
    """A stage 2 whose result is known: adds ``scale * u v^T`` (rank 1) plus ``noise`` (full rank) to each weight."""

    name = "add_low_rank"

    def __init__(self, scale: float, noise: float = 0.0) -> None:
        self.scale, self.noise = scale, noise
        self.added: dict[str, torch.Tensor] = {}

    def run(self, ctx: Stage2Context) -> tuple[float, dict]:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in ctx.params.items():
                assert p.requires_grad  # frozen base weights are made trainable for stage 2
                u, v = torch.randn(p.shape[0], 1, generator=g), torch.randn(1, p.shape[1], generator=g)
                add = self.scale * u @ v + self.noise * torch.randn(p.shape, generator=g)
                p.add_(add)
                self.added[n] = add
        return ctx.metric(), {}


def test_stage2_on_lora_writes_the_perturbation_back_into_the_adapter_and_saves_it_in_peft_format(tmp_path):
    from peft import PeftModel

    model = peft_llama()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in LoraView(model).base_tensors().items()}
    strategy = AddLowRank(scale=0.01)
    guard = MergeGuardCallback(
        alpha=0.01, stage2=strategy, eval_batches=2, tolerance=100.0, progress=False, save_path=str(tmp_path / "out")
    )
    deltas = {}

    class Snapshot(pl.Callback):  # the stage-1 adapter's updates, just before stage 2
        def on_train_end(self, trainer, pl_module):
            deltas.update({n: pair.delta().clone() for n, pair in guard._pairs.items()})

    _fit(tmp_path, model, [Snapshot(), guard], steps=3)
    r = guard.report
    assert r["lora"]["adapted_weights_perturbed"] == 6  # q, v and down projections of two layers
    assert not r["lora"]["kept_stage1_adapter"] and r["relative_perturbation"] > 0
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n} == shapes  # still rank 4
    view = LoraView(model)
    assert all(torch.equal(t, base[n]) for n, t in view.base_tensors().items())  # base weights untouched
    for n, pair in guard._pairs.items():
        # stage-1 update (rank 4) + a rank-1 perturbation: rank <= 5, projected to the best rank 4 (Eckart-Young).
        target = deltas[n] + strategy.added[n]
        s = torch.linalg.svdvals(target)
        got = float((pair.delta() - target).norm() / target.norm())
        assert got == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-3, abs=1e-6), n
    assert r["lora"]["projection_residual_max"] < 0.5
    # The saved adapter is PEFT's format and reproduces the protected effective weights.
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").merge_and_unload().state_dict()
    with view.merged() as params:
        for n, p in params.items():
            torch.testing.assert_close(reloaded[n], p.detach(), rtol=0, atol=1e-6, msg=n)


def test_stage2_on_lora_keeps_the_stage1_adapter_when_the_projection_breaks_the_guard_rail(tmp_path):
    model = peft_llama()
    kept, predictions = {}, {}

    class Snapshot(pl.Callback):  # the stage-1 adapter and its greedy predictions, just before stage 2
        def on_train_end(self, trainer, pl_module):
            kept.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
            with torch.no_grad():
                for i, b in enumerate(lm_batches()):
                    predictions[i] = pl_module(**b).logits.argmax(-1)

    def agreement(module, batch):  # 100% for the stage-1 adapter; any real change of the function lowers it
        pred = module(**batch).logits.argmax(-1)
        ref = next(v for i, v in predictions.items() if torch.equal(lm_batches()[i]["input_ids"], batch["input_ids"]))
        return float((pred == ref).sum()), pred.numel()

    guard = MergeGuardCallback(
        alpha=0.0, stage2=AddLowRank(scale=5.0), eval_batches=2, tolerance=0.0, progress=False, score_fn=agreement
    )
    with pytest.warns(UserWarning, match="keeping the stage-1 adapter"):
        _fit(tmp_path, model, [Snapshot(), guard], steps=3)
    r = guard.report
    assert r["lora"]["kept_stage1_adapter"] and r["score_before"] == 100.0 and r["lora"]["score_unprojected"] < 90
    assert r["score_after"] == 100.0 and r["relative_perturbation"] == 0.0
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_probe_on_lora_merges_the_effective_weights_and_restores_the_model(tmp_path):
    model = peft_llama()
    base_sd = tiny_llama().state_dict()
    # A donor fine-tune of the same base (the probe checks that), saved as a plain state dict.
    donor = perturbed_state_dict(base_sd, seed=5, scale=0.01)
    data = lm_batches(2, seed=3)
    probe = MergeProbe(
        donors={"d": donor},
        methods=["task_arithmetic"],
        coefficients=[0.5],
        eval_dataloaders=DataLoader(data, batch_size=None),
        eval_batches=2,
        progress=False,
        strict=True,
        schedule=ProbeSchedule(every_n_steps=None, every_n_epochs=None, on_train_end=True),
    )
    module = _fit(tmp_path, model, [probe], steps=2)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = probe.results[-1]
    # Expected: task arithmetic (weights 1, lambda 0.5) of the effective weights and the donor, scored the same way.
    with LoraView(model).merged() as params:
        effective = {n: p.detach().clone() for n, p in params.items()}
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "live", "parameters": {"weight": 1.0}}, {"model": "d", "parameters": {"weight": 1.0}}],
        "parameters": {"lambda": 0.5},
    }
    merged = merge(config, {"live": effective, "d": donor}, base_sd)
    plain = tiny_llama()
    plain.load_state_dict({**base_sd, **merged})
    want = 100.0 * evaluate(CausalLMModule(plain), data, default_score)
    assert metrics["mergeprobe/task_arithmetic@0.5/own/acc"] == pytest.approx(want, abs=1e-3)
    assert module.model is model
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())  # probe left the model as it was


def test_lora_misconfigurations_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="target='weights' on a LoRA model"):
        _fit(tmp_path, peft_llama(), [MergeGuardCallback(target="weights", stage2=None, progress=False)], steps=1)
    with pytest.raises(ValueError, match="save_path is a directory"):
        guard = MergeGuardCallback(stage2=None, save_path=str(tmp_path / "x.safetensors"), progress=False)
        _fit(tmp_path, peft_llama(), [guard], steps=1)
    with pytest.raises(ValueError, match="DoRA"):
        _fit(tmp_path, peft_llama(use_dora=True), [MergeGuardCallback(stage2=None, progress=False)], steps=1)


def _quantized_base(model):
    """A stand-in for QLoRA: bitsandbytes keeps a 4-/8-bit base weight as a frozen integer Parameter."""
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
    return model


@pytest.mark.parametrize(
    "make",
    [lambda: MergeGuardCallback(stage2=None, progress=False), lambda: MergeProbe({"d": tiny_llama(1).state_dict()})],
    ids=["guard", "probe"],
)
def test_a_quantized_lora_base_is_refused_by_name(tmp_path, make):
    """QLoRA's packed base weights can be neither merged nor restored bit for bit (the error said 'not found')."""
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj' has a quantized base weight"):
        _fit(tmp_path, _quantized_base(peft_llama()), [make()], steps=1)


def test_guard_and_probe_together_on_lora_rehearse_the_probe_donors(tmp_path):
    """MergeNeighbourhood takes the probe's donors as partners, under the base names both callbacks use on LoRA."""
    from lightning_mergeguard import MergeNeighbourhood

    model = peft_llama()
    donor = perturbed_state_dict(tiny_llama().state_dict(), seed=6, scale=0.01)
    guard = MergeGuardCallback(
        alpha=0.01,
        stage2=MergeNeighbourhood(steps=2, checks=1, surrogates=0),
        eval_batches=1,
        tolerance=100.0,
        progress=False,
    )
    probe = MergeProbe(
        donors={"d": donor},
        coefficients=[0.3],
        eval_dataloaders=DataLoader(lm_batches(1), batch_size=None),
        eval_batches=1,
        progress=False,
        strict=True,
    )
    _fit(tmp_path, model, [guard, probe], steps=2)
    assert guard.report["partners"] == ["probe:d"] and "lora" in guard.report
    assert probe.reference is guard.reference  # one theta_pre for both, under the base model's names
    assert "model.model.layers.0.self_attn.q_proj.weight" in guard.reference  # module prefix + base name
    assert "mergeprobe/task_arithmetic@0.3/own/acc" in probe.results[-1]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_stage_2_of_a_model_trained_with_gradient_checkpointing_matches_the_run_without(tmp_path, lora):
    # Stage 2 keeps the user's Hugging Face gradient checkpointing on in eval mode (it held every layer's
    # activations); the protected weights and the report are those of the same run without checkpointing.
    from lightning_mergeguard import ScaleAdversarial

    runs = []
    for checkpointing in (False, True):
        model = peft_llama() if lora else tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable()
        guard = MergeGuardCallback(alpha=0.1, stage2=ScaleAdversarial(steps=6), eval_batches=2, progress=False)
        module = _fit(tmp_path / str(checkpointing), model, [guard], steps=3)
        runs.append((guard.report, {n: p.detach().clone() for n, p in module.named_parameters()}))
    (plain, plain_weights), (kept, kept_weights) = runs
    assert plain["own_loss_last"] != plain["own_loss_first"]  # stage 2 moved the weights
    for key in ("own_loss_last", "scaled_loss_last", "score_after", "steps_used"):
        assert kept[key] == pytest.approx(plain[key], rel=1e-5), key
    assert all(torch.allclose(kept_weights[n], plain_weights[n], atol=1e-5) for n in plain_weights)

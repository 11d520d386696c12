"""MergeGuardCallback: the stage-1 gradient, stage 2 once, resume, DDP, guard rails, bad arguments."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyClassifier, blobs, fit_ddp_ranks, tiny_llama, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_mergeguard import (
    Donors,
    MergeGuardCallback,
    Negation,
    ParameterSelection,
    ProbeSchedule,
    Release,
    ScaleAdversarial,
)
from lightning_mergeguard.errors import NonFiniteError
from lightning_mergeguard.protection.stage2 import KeepWeights


class GradProbe(pl.Callback):
    """Placed around the guard: records grads before and after it, and the weights at that moment."""

    def __init__(self, store, key):
        self.store, self.key = store, key

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.store.setdefault(self.key, []).append(
            {
                n: (None if p.grad is None else p.grad.detach().clone(), p.detach().clone())
                for n, p in pl_module.named_parameters()
            }
        )


@pytest.mark.parametrize(("accumulate", "precision"), [(1, "32-true"), (2, "32-true"), (2, "bf16-mixed")])
def test_stage1_injects_exact_gradient_once_per_optimizer_step(tmp_path, accumulate, precision):
    store = {}
    guard = MergeGuardCallback(alpha=0.1, stage2="none")
    model = TinyClassifier()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=4,
        accumulate_grad_batches=accumulate,
        precision=precision,
        callbacks=[GradProbe(store, "before"), guard, GradProbe(store, "after")],
    )
    t.fit(model)
    assert len(store["before"]) == 4 // accumulate == len(store["after"])
    for before, after in zip(store["before"], store["after"]):
        for n in before:
            grad_before, weight = before[n]
            expected = 2 * 0.1 * (weight - initial[n])
            torch.testing.assert_close(after[n][0] - grad_before, expected)
    assert "mergeguard/l2_term" in t.callback_metrics


class TwoOptimizers(TinyClassifier):
    """Manual optimization with one optimizer for the body and one for the head, stepped head first."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        x, y = batch
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self(x), y))
        head.step()
        body.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)


class OptimizerGradProbe(GradProbe):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.store[self.key][-1] = (
            {n for n, p in pl_module.named_parameters() if id(p) in stepped},
            self.store[self.key][-1],
        )


def test_stage1_with_several_optimizers_gives_each_weight_the_term_once(tmp_path):
    # Each weight gets the term from the optimizer that steps it, and no other: the head's optimizer steps first, and
    # the body's weights it does not own (already moved by then) must not get the term twice.
    store = {}
    guard = MergeGuardCallback(alpha=0.1, stage2="none")
    model = TwoOptimizers()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        log_every_n_steps=1,
        callbacks=[OptimizerGradProbe(store, "before"), guard, OptimizerGradProbe(store, "after")],
    )
    t.fit(model)
    assert len(store["before"]) == 6 == len(store["after"])
    assert [sorted(owned)[0] for owned, _ in store["before"][:2]] == ["head.bias", "net.0.bias"]
    moved = 0
    for (owned, before), (_, after) in zip(store["before"], store["after"]):
        for n, (grad_before, weight) in before.items():
            added = after[n][0] - grad_before
            if n in owned:
                torch.testing.assert_close(added, 2 * 0.1 * (weight - initial[n]))
                moved += int(bool((weight != initial[n]).any()))
            else:
                assert torch.equal(added, torch.zeros_like(added)), n
    assert moved > 0  # the term was not zero for every weight
    # The logged value is the whole term, over every guarded weight, at the last optimizer's step.
    last = store["after"][-1][1]
    expected = 0.1 * sum(float((w - initial[n]).pow(2).sum()) for n, (_, w) in last.items())
    assert t.callback_metrics["mergeguard/l2_term"].item() == pytest.approx(expected, rel=1e-5)


class WithBackbone(TinyClassifier):
    """A backbone for Lightning's BackboneFinetuning, which freezes it and adds it to the optimizer later."""

    @property
    def backbone(self):
        return self.net

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_weights_unfrozen_during_fit_join_stage1_and_stage2(tmp_path):
    # BackboneFinetuning freezes the backbone before training and unfreezes it at epoch 1 (a new param group): the
    # backbone must then get the term against its pretrained values, and stage 2 must perturb it.
    from lightning.pytorch.callbacks import BackboneFinetuning

    store = {}
    pl.seed_everything(0)
    model = WithBackbone()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = MergeGuardCallback(alpha=0.1, stage2=ScaleAdversarial(steps=4, lr=0.01), tolerance=100.0, progress=False)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    t = trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=3,
        callbacks=[unfreeze, GradProbe(store, "before"), guard, GradProbe(store, "after")],
    )
    t.fit(model)
    backbone = [n for n in initial if n.startswith("net.")]
    assert set(backbone) <= set(guard.reference.names())
    for n in backbone:  # the reference is the pretrained value, taken when the backbone joined
        assert torch.equal(guard.reference[n], initial[n]), n
    epoch1 = list(zip(store["before"], store["after"]))[3:]
    assert len(epoch1) == 3
    for before, after in epoch1:
        for n in backbone:
            grad_before, weight = before[n]
            torch.testing.assert_close(after[n][0] - grad_before, 2 * 0.1 * (weight - initial[n]))
    assert any(not torch.equal(before[n][1], initial[n]) for before, _ in epoch1[1:] for n in backbone)
    assert guard.report["parameters_perturbed"] == len(backbone)  # the head is left out (stage2_exclude)


def test_raw_weight_target_and_filters(tmp_path):
    store = {}
    guard = MergeGuardCallback(
        alpha=0.1, target="weights", stage2="none", parameters=ParameterSelection(exclude=[r"bias"])
    )
    t = trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[GradProbe(store, "b"), guard, GradProbe(store, "a")]
    )
    t.fit(TinyClassifier())
    b, a = store["b"][0], store["a"][0]
    for n in b:
        diff = a[n][0] - b[n][0]
        if n.endswith("bias"):
            assert torch.equal(diff, torch.zeros_like(diff))
        else:
            torch.testing.assert_close(diff, 2 * 0.1 * b[n][1])


def fit_with_guard(tmp_path, **guard_kwargs):
    pl.seed_everything(0)
    guard = MergeGuardCallback(progress=False, **guard_kwargs)
    model = TinyClassifier()
    trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(model)
    return guard, model


def test_scale_adversarial_stage2_report_and_tolerance(tmp_path):
    report = tmp_path / "report.json"
    save = tmp_path / "protected.safetensors"
    guard, model = fit_with_guard(
        tmp_path, stage2=ScaleAdversarial(steps=40, lr=0.01), report_path=str(report), save_path=str(save)
    )
    data = json.loads(report.read_text())
    assert guard.stage2_done and data["method"] == "scale_adversarial"
    assert data["score_before"] - data["score_after"] <= 1.5
    assert data["merge_proxy_after"] <= data["merge_proxy_before"]
    assert data["settings"]["stage2"]["steps"] == 40 and len(data["checks"]) == 8
    assert data["validation_passes"] == 18
    from safetensors.torch import load_file

    saved = load_file(save)
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v.cpu())


def test_negation_backs_off_beta_to_meet_tolerance(tmp_path):
    guard, _ = fit_with_guard(tmp_path, stage2=Negation(beta=8.0, granularity="module"), tolerance=0.5)
    r = guard.report
    assert r["backoff"][0]["beta"] == 8.0
    assert r["score_before"] - r["score_after"] <= 0.5
    assert r["beta_used"] < 8.0  # beta=8 flips the task vector hard enough to cost more than 0.5 points
    assert set(r["layer_scores"]) == {"net.0", "net.2"}  # the head is excluded from stage 2 by default


def test_negation_formula_on_non_critical_layers(tmp_path):
    pl.seed_everything(0)
    captured = {}

    class Capture(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            captured["stage1"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    guard = MergeGuardCallback(
        alpha=0.0,
        stage2=Negation(beta=0.5, critical_fraction=0.0, small_fraction=0.0),
        tolerance=100.0,
        progress=False,
    )
    model = TinyClassifier()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer(tmp_path, max_epochs=1, callbacks=[guard, Capture()]).fit(model)
    for n, p in model.named_parameters():
        s1 = captured["stage1"][n]
        if n.startswith("head"):
            assert torch.equal(p, s1)
        else:
            torch.testing.assert_close(p.detach(), s1 - 0.5 * (s1 - initial[n]))


def test_stage2_applied_once_unless_the_protected_weights_train_further(tmp_path):
    pl.seed_everything(0)
    guard = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False)
    model = TinyClassifier()
    t = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    t.fit(model)
    ckpt = tmp_path / "after.ckpt"
    t.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["callbacks"][guard.state_key]["stage2_done"] is True
    protected = {n: p.detach().clone() for n, p in model.named_parameters()}

    def resumed(max_epochs):
        again = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False)
        calls = []
        run = again.stage2.run
        again.stage2.run = lambda ctx: (calls.append(1), run(ctx))[1]
        trainer(tmp_path, max_epochs=max_epochs, callbacks=[again]).fit(model, ckpt_path=ckpt)
        return again, len(calls)

    # Nothing left to train: the checkpoint's weights are the protected ones, and stage 2 does not run twice.
    again, runs = resumed(max_epochs=1)
    assert runs == 0 and again.stage2_done
    assert all(torch.equal(p, protected[n]) for n, p in model.named_parameters())
    # One more epoch trains the protected weights (training can undo stage 2): stage 2 runs again on the result.
    with pytest.warns(UserWarning, match="trained 8 optimizer steps after stage 2 was applied"):
        again, runs = resumed(max_epochs=2)
    assert runs == 1 and again.stage2_done and again.report["score_before"] >= 0
    # The same callback object in a second fit (a new Trainer starts at step 0) also re-protects.
    with pytest.warns(UserWarning, match="after stage 2 was applied"):
        trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(model)
    assert guard.report["parameters_perturbed"] > 0


@pytest.mark.parametrize("probe_first", [False, True], ids=["guard-first", "probe-first"])
def test_a_callback_reused_for_another_model_measures_from_that_models_weights(tmp_path, probe_first):
    """A sweep that reuses one guard and one probe: each model's theta_pre is its own weights at its fit start.

    The probe's donor task vectors are measured from it too, whichever callback comes first. And the same weights
    in a new LightningModule wrapper are the same model going on (below).

    Before, the second model kept the first model's snapshot as theta_pre (stage 1 pulled it towards the first
    model's weights, stage 2 measured its task vector from them) and was warned it had 'trained after stage 2'.
    """
    from _helpers import blobs
    from torch.utils.data import DataLoader

    from lightning_mergeguard import MergeProbe

    torch.manual_seed(5)
    donor = {k: v + 0.01 for k, v in TinyClassifier().state_dict().items()}
    guard = MergeGuardCallback(alpha=0.1, stage2=ScaleAdversarial(steps=2), progress=False)
    loader = DataLoader(blobs(64, 1), batch_size=32)
    probe = MergeProbe(
        Donors({"d": donor}, check_base=False), eval_dataloaders=loader, schedule=ProbeSchedule(every_n_epochs=1)
    )
    for seed in (5, 6):
        torch.manual_seed(seed)
        model = TinyClassifier()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*after stage 2 was applied")  # a new model is not retrained
            callbacks = [probe, guard] if probe_first else [guard, probe]
            trainer(tmp_path / str(seed), max_epochs=1, callbacks=callbacks).fit(model)
        assert probe.reference is guard.reference  # one shared reference, reset once per new model
        assert all(torch.equal(guard.reference[n], start[n]) for n in start), seed
        donor_tau = probe.donor_task_vectors["d"]
        assert all(torch.allclose(donor_tau[n], donor[n] - start[n]) for n in start), seed
        assert guard.stage2_done and guard.report["score_before"] >= 0
        assert [r["step"] for r in probe.results] == [8.0, 8.0]  # this fit's probes only (epoch end, end of fit)
    # The same weights in a new wrapper (as with a transformers model wrapped again) are that model going on.
    rewrapped = TinyClassifier()
    rewrapped.net, rewrapped.head = model.net, model.head
    with pytest.warns(UserWarning, match="after stage 2 was applied"):
        trainer(tmp_path / "again", max_epochs=1, callbacks=[guard]).fit(rewrapped)
    assert all(torch.equal(guard.reference[n], start[n]) for n in start)
    # Another model resumed from a checkpoint written without the guard: refused as for a fresh guard (the
    # previous model's snapshot must not stand in for theta_pre); from its own guarded checkpoint: that checkpoint's.
    torch.manual_seed(7)
    plain = trainer(tmp_path / "plain", max_steps=2)
    plain.fit(TinyClassifier())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no reference weights for this callback"):
        trainer(tmp_path / "p2", max_steps=4, callbacks=[guard]).fit(
            TinyClassifier(), ckpt_path=tmp_path / "plain.ckpt"
        )
    torch.manual_seed(8)
    own, fresh = TinyClassifier(), MergeGuardCallback(alpha=0.1, stage2=None, progress=False)
    own_start = {n: p.detach().clone() for n, p in own.named_parameters()}
    guarded = trainer(tmp_path / "g", max_steps=2, callbacks=[fresh])
    guarded.fit(own)
    guarded.save_checkpoint(tmp_path / "guarded.ckpt")
    again = MergeGuardCallback(alpha=0.1, stage2=None, progress=False)
    trainer(tmp_path / "g1", max_steps=2, callbacks=[again]).fit(TinyClassifier())  # a fit of some other model
    trainer(tmp_path / "g2", max_steps=4, callbacks=[again]).fit(TinyClassifier(), ckpt_path=tmp_path / "guarded.ckpt")
    assert all(torch.equal(again.reference[n], own_start[n]) for n in own_start)


def test_a_reference_that_is_not_the_models_base_is_refused_at_fit_start(tmp_path):
    """reference= another model of the same shapes measured every task vector from the wrong weights, silently."""
    from lightning_mergeguard import MergeProbe
    from lightning_mergeguard.errors import ForeignBaseError

    torch.manual_seed(0)
    model, foreign = TinyClassifier(), TinyClassifier().state_dict()
    guard = MergeGuardCallback(reference=foreign, stage2=None, progress=False)
    with pytest.raises(ForeignBaseError, match="not a fine-tune of MergeGuardCallback's reference"):
        trainer(tmp_path, max_steps=1, callbacks=[guard]).fit(model)
    probe = MergeProbe({"d": {k: v + 0.01 for k, v in foreign.items()}}, reference=foreign)  # a fine-tune of it
    with pytest.raises(ForeignBaseError, match="not a fine-tune of MergeProbe's reference"):
        trainer(tmp_path, max_steps=1, callbacks=[probe]).fit(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}  # the right base: accepted
    trainer(tmp_path, max_steps=1, callbacks=[MergeGuardCallback(reference=base, stage2=None)]).fit(model)


class FailsAtStep(TinyClassifier):
    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at:
            raise RuntimeError("out of memory (simulated)")
        return super().training_step(batch, batch_idx)


def test_a_failed_fit_says_the_model_is_not_protected(tmp_path):
    guard = MergeGuardCallback(alpha=0.1, progress=False)
    unprotected = "RuntimeError, so stage 2 was not applied and the model is NOT protected"
    with pytest.warns(UserWarning, match=unprotected), pytest.raises(RuntimeError, match="simulated"):
        trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(FailsAtStep(2))
    assert not guard.stage2_done and guard.report is None


def test_a_head_only_fine_tune_is_warned_at_fit_start_not_only_at_its_end(tmp_path):
    model = WithBackbone()
    model.net.requires_grad_(False)  # a linear probe: only the head trains, and stage 2 leaves heads out
    guard = MergeGuardCallback(alpha=0.1, progress=False)
    with (
        pytest.warns(UserWarning, match="every trainable weight matches stage2_exclude"),
        pytest.raises(ValueError, match="stage 2 excludes every parameter"),
    ):
        trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[guard]).fit(model)
    model.head.reset_parameters()
    guard = MergeGuardCallback(
        alpha=0.1, stage2=ScaleAdversarial(steps=4), progress=False, parameters=ParameterSelection(stage2_exclude=[])
    )
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[guard]).fit(model)
    assert guard.report["parameters_perturbed"] == 2


class OrderedTinyClassifier(TinyClassifier):
    """Same data order in every epoch, so an uninterrupted and a resumed run see the same batches."""

    def train_dataloader(self):
        return DataLoader(blobs(256, 0), batch_size=32, shuffle=False)


@pytest.mark.parametrize("crash_epoch", [1, 2])
def test_resume_matches_uninterrupted(tmp_path, crash_epoch):
    kwargs = dict(alpha=0.5, stage2=ScaleAdversarial(steps=10, lr=0.01), progress=False)
    pl.seed_everything(0)
    full = OrderedTinyClassifier()
    trainer(tmp_path / "full", max_epochs=3, callbacks=[MergeGuardCallback(**kwargs)]).fit(full)

    pl.seed_everything(0)
    part = OrderedTinyClassifier()
    t = trainer(
        tmp_path / "part", max_epochs=crash_epoch, callbacks=[MergeGuardCallback(**{**kwargs, "stage2": "none"})]
    )
    t.fit(part)
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    resumed = OrderedTinyClassifier()  # fresh weights: the reference must come from the checkpoint, not a new snapshot
    guard = MergeGuardCallback(**kwargs)
    t2 = trainer(tmp_path / "part", max_epochs=3, callbacks=[guard])
    t2.fit(resumed, ckpt_path=ckpt)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


class OrderedWithBackbone(WithBackbone):
    def train_dataloader(self):
        return DataLoader(blobs(256, 0), batch_size=32, shuffle=False)


def test_resume_before_the_backbone_joins_matches_uninterrupted(tmp_path):
    # The checkpoint is written while the backbone is frozen, so its reference lacks the backbone; the resumed fit
    # must take it when the backbone is unfrozen (still pretrained then), not refuse the checkpoint.
    from lightning.pytorch.callbacks import BackboneFinetuning

    def run(root, max_epochs, model, ckpt=None):
        stage2 = ScaleAdversarial(steps=5, lr=0.01) if max_epochs == 3 else "none"
        guard = MergeGuardCallback(alpha=0.5, stage2=stage2, progress=False)
        unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
        t = trainer(root, max_epochs=max_epochs, limit_train_batches=3, callbacks=[unfreeze, guard])
        t.fit(model, ckpt_path=ckpt)
        return t, guard

    pl.seed_everything(0)
    full = OrderedWithBackbone()
    initial = {n: p.detach().clone() for n, p in full.named_parameters()}
    run(tmp_path / "full", 3, full)
    pl.seed_everything(0)
    part = OrderedWithBackbone()
    t, _ = run(tmp_path / "part", 1, part)
    t.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = OrderedWithBackbone()  # other initial weights: the checkpoint brings them back
    _, guard = run(tmp_path / "part", 3, resumed, tmp_path / "mid.ckpt")
    assert torch.equal(guard.reference["net.0.weight"], initial["net.0.weight"])
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.distributed
def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    pl.seed_everything(0)
    report = tmp_path / "report.json"
    guard = MergeGuardCallback(
        alpha=0.1, stage2=ScaleAdversarial(steps=8, lr=0.01), progress=False, report_path=str(report)
    )
    module = TinyClassifier()
    r0, r1 = fit_ddp_ranks(tmp_path, module, guard)
    initial = TinyClassifier().state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert any(not torch.equal(r0[k], initial[k]) for k in r0)
    # ddp_spawn ran the callbacks in worker processes: this process gets rank zero's (stage-2) weights back, and the
    # report from report_path (the guard object here is the copy that did not run; the README says so).
    assert all(torch.equal(module.state_dict()[k], r0[k]) for k in r0)
    assert json.loads(report.read_text())["score_after"] >= 0 and guard.report is None


def test_a_stage_2_next_to_a_quantization_watermark_is_refused(tmp_path):
    """Stage 2 would move the weights out of the int8 intervals the watermark keeps them in, silently."""
    from lightning_mergeguard import QuantizationWatermark

    guard = MergeGuardCallback(stage2=ScaleAdversarial(steps=2), progress=False)
    with pytest.raises(MisconfigurationException, match="out of the int8 intervals the watermark keeps them in"):
        trainer(tmp_path, max_steps=1, callbacks=[QuantizationWatermark(), guard]).fit(TinyClassifier())
    stage1_only = MergeGuardCallback(alpha=0.1, stage2=None, progress=False)  # compatible: the watermark projects
    mark = QuantizationWatermark()
    module = TinyClassifier()
    trainer(tmp_path, max_steps=3, callbacks=[mark, stage1_only]).fit(module)
    for name, (q0, s, _) in mark._bounds.items():  # every quantized weight still rounds to its code at fit start
        p = dict(module.named_parameters())[name]
        assert torch.equal(torch.round(p.view(p.shape[0], -1) / s).to(torch.int8), q0), name


def test_refuses_sharded_strategy():
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(MisconfigurationException, match="does not support the sharded strategy FSDPStrategy"):
        MergeGuardCallback().setup(FakeTrainer(), TinyClassifier(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha=-1), "alpha must be"),
        (dict(alpha=float("nan")), "alpha must be"),
        (dict(target="theta"), "target must be"),
        (dict(stage2="negate"), "stage2 must be"),
        (dict(eval_batches=0), "eval_batches must be"),
        (dict(eval_batches=True), "eval_batches must be"),
        (dict(tolerance="1"), "tolerance must be a number of points"),
        (dict(tolerance=-0.5), "tolerance must be a number of points"),
        (dict(tolerance=float("nan")), "tolerance must be a number of points"),
        (dict(parameters={"include": "attn"}), "parameters must be a ParameterSelection"),
        (dict(release={"ownership_key": "k"}), "release must be a Release"),
        (dict(reference="runs/base.safetensors", save_path="runs/../runs/base.safetensors"), "over the reference"),
        (dict(reference="runs/base/model.safetensors", save_path="runs/base"), "over the reference"),
        (dict(report_path="."), r"report_path '\.' is a directory"),  # it failed after the whole fit
        (dict(score_fn="accuracy"), "score_fn must be callable"),
        (dict(loss_fn=1.0), "loss_fn must be callable"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MergeGuardCallback(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ParameterSelection, dict(exclude=["("]), "invalid parameter-name regex"),
        (ParameterSelection, dict(include=[3]), "include must be parameter-name regexes"),
        (ParameterSelection, dict(stage2_exclude=["[a"]), "stage2_exclude: invalid parameter-name regex"),
        (Release, dict(ownership_key=3), "ownership_key must be a file path"),
        (Release, dict(deployment_check="yes"), "deployment_check must be True or False"),
        (Release, dict(dtype="fp16"), "dtype must be 'auto' or one of"),
        (Release, dict(permute_residual=True), "set amplify too"),
        (Release, dict(amplify=1.5), "amplify must be a finite number >= 2"),
    ],
)
def test_settings_objects_refuse_bad_values_when_built(cls, kwargs, match):
    """A typo in an injected object fails when the object is built, before any training."""
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_a_bool_is_not_a_step_count():
    with pytest.raises(ValueError, match="steps must be an integer"):
        ScaleAdversarial(steps=True)


class _Unchanged(ScaleAdversarial):
    """A stage 2 that keeps no step (as ScaleAdversarial does when no step stays within the tolerance)."""

    def run(self, ctx):
        return ctx.before, {"steps_used": 0}


def test_a_stage2_that_changed_nothing_is_reported_not_protected(tmp_path):
    """It used to print "score 100.0 -> 100.0" and write a card saying "protected"."""
    guard = MergeGuardCallback(stage2=_Unchanged(steps=2), save_path=str(tmp_path / "release"), progress=False)
    with pytest.warns(UserWarning, match="the model is NOT protected: no weight changed"):
        trainer(tmp_path, max_steps=2, callbacks=[guard]).fit(TinyClassifier())
    assert guard.report["protected"] is False and "stage 2 kept no step" in guard.report["not_protected"]
    card = (tmp_path / "release" / "MERGEGUARD.md").read_text()
    assert "**NOT protected.** MergeGuardCallback ran on this model, and no weight changed" in card
    assert json.loads((tmp_path / "release" / "protection_report.json").read_text())["protected"] is False


def test_save_path_directory_publishes_a_model_that_from_pretrained_loads(tmp_path):
    """save_path wrote the LightningModule's names (model.model.layers...) and the tied head twice: not loadable."""
    from transformers import AutoModelForCausalLM

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    tied = tiny_llama(0, tie_word_embeddings=True)
    ids = torch.randint(0, 64, (8, 12))
    loader = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=4)
    module = CausalLMModule(tied, lr=1e-3)
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=3, lr=1e-3), tolerance=100.0, save_path=str(tmp_path / "release"), progress=False
    )
    trainer(tmp_path, max_steps=3, callbacks=[guard]).fit(module, loader, loader)
    release = tmp_path / "release"
    assert {"config.json", "model.safetensors", "MERGEGUARD.md", "protection_report.json"} <= {
        p.name for p in release.iterdir()
    }
    from safetensors import safe_open

    with safe_open(release / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" not in names and all(not n.startswith("model.model.") for n in names)
    loaded = AutoModelForCausalLM.from_pretrained(release).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    tied.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:2]).logits, tied(ids[:2]).logits)
    assert guard.report["protected"] is (guard.report["steps_used"] > 0)


def test_release_dtype_writes_the_published_model_in_it_and_leaves_the_trained_one_alone(tmp_path):
    """Release(dtype="bfloat16"): from_pretrained reads a bf16 model, tied weights stay tied, and the LightningModule
    the user keeps training or evaluating is still float32."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    tied = tiny_llama(0, tie_word_embeddings=True)
    ids = torch.randint(0, 64, (8, 12))
    loader = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=4)
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=3, lr=1e-3),
        tolerance=100.0,
        save_path=str(tmp_path / "release"),
        progress=False,
        release=Release(dtype="bfloat16"),
    )
    trainer(tmp_path, max_steps=3, callbacks=[guard]).fit(CausalLMModule(tied, lr=1e-3), loader, loader)
    with safe_open(tmp_path / "release" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "release", torch_dtype="auto")
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert next(tied.parameters()).dtype == torch.float32
    assert json.loads((tmp_path / "release" / "protection_report.json").read_text())["dtype"] == "bfloat16"
    # a weights file too
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=2), save_path=str(tmp_path / "w.safetensors"), release=Release(dtype="float16")
    )
    trainer(tmp_path, max_steps=2, callbacks=[guard]).fit(TinyClassifier())
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_a_release_dtype_that_would_overflow_is_refused_before_anything_is_written(tmp_path):
    module = TinyClassifier()
    with torch.no_grad():
        module.net[0].weight[0, 0] = 1e6  # beyond float16's 65504
    guard = MergeGuardCallback(
        stage2=KeepWeights(),
        save_path=str(tmp_path / "release"),
        report_path=str(tmp_path / "report.json"),
        release=Release(dtype="float16"),
    )
    with pytest.raises(NonFiniteError, match=r"writing float16 would overflow 1 weight\(s\) of 'net.0.weight'"):
        trainer(tmp_path, max_steps=1, callbacks=[guard]).fit(module)
    assert not (tmp_path / "release").exists() and not (tmp_path / "report.json").exists()


def test_one_pattern_given_alone_is_one_regex_not_its_letters(tmp_path):
    # include="net.0" used to become ['n', 'e', 't', '.', '0'] and select every parameter with an 'e' or a '.'.
    guard = MergeGuardCallback(
        alpha=0.1, stage2="none", parameters=ParameterSelection(include="net.0", exclude="bias", stage2_exclude="head")
    )
    assert guard.selection == ParameterSelection(include=["net.0"], exclude=["bias"], stage2_exclude=["head"])
    assert (guard.selection.include, guard.selection.exclude) == (("net.0",), ("bias",))
    trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[guard]).fit(TinyClassifier())
    assert list(guard._params) == ["net.0.weight"]


def test_keep_batches_given_as_one_batch_is_one_batch():
    x, y = torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)
    assert len(MergeGuardCallback(keep_batches=(x, y)).keep_batches) == 1
    assert len(MergeGuardCallback(keep_batches={"input_ids": x, "labels": y}).keep_batches) == 1
    assert len(MergeGuardCallback(keep_batches=[(x, y), (x, y)]).keep_batches) == 2
    with pytest.raises(ValueError, match="keep_batches must be a list of batches"):
        MergeGuardCallback(keep_batches=[x, "rows.jsonl"])


def test_stage2_settings_go_to_the_strategy_object_and_a_typo_is_named():
    with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
        MergeGuardCallback(steps=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'alhpa'"):
        MergeGuardCallback(alhpa=0.1)
    from lightning_mergeguard.protection.stage2 import resolve_stage2

    assert resolve_stage2("negation", beta=0.5).beta == 0.5  # a config file's flat form, by the strategy's name
    with pytest.raises(ValueError, match=r"\['beta'\] do not apply to stage2="):
        resolve_stage2("scale_adversarial", beta=0.5)


def test_reference_from_path_and_mismatch(tmp_path):
    from lightning_mergeguard.io import save_safetensors

    model = TinyClassifier()
    save_safetensors(tmp_path / "ref.safetensors", {k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    guard = MergeGuardCallback(alpha=0.1, stage2="none", reference=str(tmp_path / "ref.safetensors"))
    trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[guard]).fit(model)
    assert all(float(t.abs().sum()) == 0 for t in guard.reference.as_dict().values())

    bad = {k: torch.zeros(2) for k in model.state_dict()}
    save_safetensors(tmp_path / "bad.safetensors", bad)
    guard = MergeGuardCallback(stage2="none", reference=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"reference tensor 'net.0.weight' has shape \(2,\)"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[guard]).fit(TinyClassifier())


def test_resuming_a_finished_fit_whose_stage_2_was_interrupted_applies_it(tmp_path):
    """last.ckpt is written before on_train_end; Lightning skips a finished loop, so stage 2 runs in on_fit_end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    guard = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False)

    def interrupted(ctx):
        raise RuntimeError("CUDA out of memory (simulated, during stage 2)")

    guard.stage2.run = interrupted
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = TinyClassifier()
    with pytest.warns(UserWarning, match="NOT protected"), pytest.raises(RuntimeError, match="simulated"):
        trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[guard, ckpts]).fit(model)
    last = tmp_path / "ckpt" / "last.ckpt"
    trained = torch.load(last, weights_only=False)
    assert trained["callbacks"][guard.state_key]["stage2_done"] is False

    resumed = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False, save_path=str(tmp_path / "p.st"))
    model = TinyClassifier()
    trainer(tmp_path, max_epochs=1, callbacks=[resumed]).fit(model, ckpt_path=last)
    assert resumed.stage2_done and resumed.report["parameters_perturbed"] > 0
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, trained["state_dict"][n])]
    assert moved and all(not n.startswith("head") for n in moved)  # stage 2's weights, not the head it excludes
    assert next(model.parameters()).device.type == "cpu"  # where Lightning leaves a model after fit
    assert (tmp_path / "p.st").exists()


def test_a_fit_that_trains_nothing_says_the_model_is_not_protected(tmp_path):
    guard = MergeGuardCallback(progress=False)
    with pytest.warns(UserWarning, match="trained no step"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=0, callbacks=[guard]).fit(TinyClassifier())
    assert not guard.stage2_done


def test_two_guards_on_one_trainer_are_refused(tmp_path):
    guards = [MergeGuardCallback(progress=False), MergeGuardCallback(alpha=0.5, progress=False)]
    model = TinyClassifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MisconfigurationException, match="2 MergeGuardCallbacks"):
        trainer(tmp_path, max_epochs=1, callbacks=guards).fit(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.distributed
def test_stage_2_of_a_resumed_finished_fit_runs_on_every_ddp_rank_alike(tmp_path):
    """on_fit_end comes after the strategy's teardown: the collectives still work and the ranks stay identical."""
    from _helpers import SaveWeightsOnFitEnd
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    guard = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False)
    guard.stage2.run = lambda ctx: (_ for _ in ()).throw(RuntimeError("interrupted (simulated)"))
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(UserWarning, match="NOT protected"), pytest.raises(RuntimeError, match="simulated"):
        trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[guard, ckpts]).fit(TinyClassifier())
    last = tmp_path / "ckpt" / "last.ckpt"
    trained = torch.load(last, weights_only=False)["state_dict"]
    resumed = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False)
    save = SaveWeightsOnFitEnd(str(tmp_path))
    t = trainer(tmp_path, max_epochs=1, strategy="ddp_spawn", devices=2, callbacks=[resumed, save])
    t.fit(TinyClassifier(), ckpt_path=last)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(not torch.equal(r0[k], trained[k]) for k in r0 if not k.startswith("head"))
    assert all(torch.equal(r0[k], trained[k]) for k in r0 if k.startswith("head"))


def test_stage_2_must_come_after_weight_averaging_which_replaces_the_weights_at_train_end(tmp_path):
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from safetensors.torch import load_file

    averaging = pytest.importorskip("lightning.pytorch.callbacks").__dict__.get("EMAWeightAveraging")
    makers = [lambda: StochasticWeightAveraging(swa_lrs=0.01)] + ([lambda: averaging(decay=0.5)] if averaging else [])
    for make in makers:
        guard = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False)
        with pytest.raises(MisconfigurationException, match=r"comes before .* Put MergeGuardCallback after"):
            trainer(tmp_path, max_epochs=1, callbacks=[guard, make()]).fit(TinyClassifier())
        # After it, stage 2 protects the averaged weights: the model kept is the one saved as protected.
        pl.seed_everything(0)
        saved = tmp_path / "protected.safetensors"
        guard = MergeGuardCallback(stage2="negation", tolerance=100.0, progress=False, save_path=str(saved))
        model = TinyClassifier()
        trainer(tmp_path, max_epochs=2, callbacks=[make(), guard]).fit(model)
        weights = load_file(saved)
        assert guard.stage2_done and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


class Diverge(pl.Callback):
    """Puts one NaN into the weights at the end of training (a fit whose loss diverged), before the guard runs."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.net[0].weight[0, 0] = float("inf")


def test_diverged_weights_are_refused_not_protected_and_saved(tmp_path):
    from lightning_mergeguard.errors import NonFiniteError
    from lightning_mergeguard.posthoc import protect_module

    save = tmp_path / "protected.safetensors"
    guard = MergeGuardCallback(stage2=ScaleAdversarial(steps=4, checks=2), save_path=str(save), progress=False)
    with pytest.raises(NonFiniteError, match=r"NaN or inf in 1 tensor\(s\) \('net.0.weight'\): training diverged"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[Diverge(), guard]).fit(TinyClassifier())
    assert not save.exists() and not guard.stage2_done and guard.report is None
    # The post-hoc path refuses the same weights before reading the base.
    model = TinyClassifier()
    Diverge().on_train_end(None, model)
    with pytest.raises(NonFiniteError, match="protect_module: the trained weights hold NaN or inf"):
        protect_module(model, tmp_path / "no-base-needed", [], lambda m: 0.0)


def test_resuming_a_checkpoint_without_the_callbacks_reference_needs_the_pretrained_weights(tmp_path):
    # A fit resumed from a checkpoint written without the guard (or with other alpha/target, which name its state):
    # a snapshot at fit start would take the trained weights as theta_pre (it did, silently).
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_mergeguard import MergeProbe

    pl.seed_everything(0)
    model = TinyClassifier()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(model)
    last = str(tmp_path / "last.ckpt")
    donors = {"d": {k: v + 0.01 for k, v in pre.items()}}
    for callback, who in [
        (MergeGuardCallback(alpha=0.1, stage2="none"), "MergeGuardCallback"),
        (MergeProbe(donors=donors, eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32)), "MergeProbe"),
    ]:
        with pytest.raises(ValueError, match=rf"{who}: this fit resumes .*last.ckpt', which holds no reference"):
            trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(TinyClassifier(), ckpt_path=last)
    # Given the pretrained weights, the resumed fit measures from them.
    guard = MergeGuardCallback(alpha=0.1, stage2="none", reference=pre)
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(TinyClassifier(), ckpt_path=last)
    assert all(torch.equal(guard.reference[n], pre[n]) for n in pre)


def _tuner(kind: str) -> pl.Callback:
    from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder

    return (
        LearningRateFinder(num_training_steps=4) if kind == "lr" else BatchSizeFinder(max_trials=2, steps_per_trial=2)
    )


class _BatchSized(TinyClassifier):
    """TinyClassifier with the ``batch_size`` attribute BatchSizeFinder scales."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 32

    def train_dataloader(self):
        return DataLoader(blobs(256, 0), batch_size=self.batch_size, shuffle=True)


@pytest.mark.parametrize("kind", ["lr", "batch_size"])
def test_lightnings_tuner_callbacks_are_not_resumes(tmp_path, kind):
    # LearningRateFinder/BatchSizeFinder save the state at fit start, run their trials with the other callbacks
    # swapped out, and restore it, leaving trainer.ckpt_path naming their temporary file: the guard and the probe
    # took that for a resume of a checkpoint without their reference and stopped the fit.
    from lightning_mergeguard import MergeProbe

    pl.seed_everything(0)
    models = [_BatchSized(), _BatchSized()]
    models[1].load_state_dict({k: v + 0.001 * torch.randn_like(v) for k, v in models[0].state_dict().items()})
    starts = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    guard = MergeGuardCallback(alpha=0.1, progress=False)
    probe = MergeProbe(
        {"d": {k: v + 0.01 for k, v in models[0].state_dict().items()}},
        eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32),
        progress=False,
        schedule=ProbeSchedule(every_n_epochs=1),
    )
    probed = []
    for model, start in zip(models, starts):  # the second fit reuses both callbacks for another model
        trainer(tmp_path, max_epochs=1, callbacks=[guard, probe, _tuner(kind)]).fit(model)
        assert guard.stage2_done and guard.report is not None
        assert all(torch.equal(guard.reference[n], start[n]) for n in start)  # theta_pre: this model's start
        probed.append(len(probe.results))
    assert probed[0] == probed[1] > 0  # the second fit's results only
    alone = MergeProbe(probe.donor_inputs, eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32), progress=False)
    trainer(tmp_path, max_epochs=1, callbacks=[alone, _tuner(kind)]).fit(models[0])  # its own reference
    assert alone.results
    # A resume of a checkpoint written without the guard is still refused, naming that checkpoint.
    plain = trainer(tmp_path / "plain", max_steps=2)
    plain.fit(TinyClassifier())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    fresh = MergeGuardCallback(alpha=0.1, stage2=None, progress=False)
    with pytest.raises(ValueError, match=r"resumes .*plain.ckpt', which holds no reference"):
        trainer(tmp_path, max_steps=4, callbacks=[fresh, _tuner(kind)]).fit(
            _BatchSized(), ckpt_path=tmp_path / "plain.ckpt"
        )


class _PruneByHand(pl.Callback):
    """Prunes the first layer with torch.nn.utils.prune at the end of the first epoch (left active)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            torch.nn.utils.prune.l1_unstructured(pl_module.net[0], "weight", amount=0.5)


def test_pruning_during_fit_is_refused_where_it_would_be_undone_or_mismeasured(tmp_path):
    # ModelPruning before the guard: stage 2 moved the pruned zeros, so the pruned model came out dense (45% zeros in
    # a layer before stage 2, 0% after). After it: stage 2 met weight_orig/weight_mask and failed after the whole fit
    # ("stage 2 excludes every parameter"). A probe merged weight_orig and pruned the merge again with the mask.
    from lightning.pytorch.callbacks import ModelPruning

    from lightning_mergeguard import MergeProbe

    def pruner():
        return ModelPruning("l1_unstructured", amount=0.3, verbose=0)

    def probe(model, strict=False):
        donor = {k: v + 0.01 for k, v in model.state_dict().items()}
        loader = DataLoader(blobs(64, 1), batch_size=32)
        return MergeProbe({"d": donor}, eval_dataloaders=loader, strict=strict, progress=False)

    pl.seed_everything(0)
    for make in (
        lambda _: [pruner(), MergeGuardCallback()],
        lambda _: [MergeGuardCallback(), pruner()],
        lambda model: [pruner(), probe(model)],
    ):
        model = TinyClassifier()
        callbacks = make(model)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(MisconfigurationException, match=r"does not support pruning during fit \(ModelPruning\)"):
            trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model)
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # refused before training
    # Stage 1 alone works with pruning: the pruned model stays pruned and the term is logged.
    model, guard = TinyClassifier(), MergeGuardCallback(alpha=0.1, stage2=None, progress=False)
    fit = trainer(tmp_path, max_epochs=2, callbacks=[pruner(), guard])
    fit.fit(model)
    assert float((model.net[0].weight == 0).float().mean()) > 0.3 and "mergeguard/l2_term" in fit.logged_metrics
    # Pruned by hand during fit: refused when stage 2 or the probe meets it, not after a misleading failure.
    guard = MergeGuardCallback(progress=False)
    with pytest.raises(MisconfigurationException, match=r"not support pruning during fit \(torch.nn.utils.prune"):
        trainer(tmp_path, max_epochs=2, callbacks=[_PruneByHand(), guard]).fit(TinyClassifier())
    model = TinyClassifier()
    with pytest.raises(MisconfigurationException, match=r"MergeProbe does not support pruning during fit \(torch"):
        trainer(tmp_path, max_epochs=2, callbacks=[_PruneByHand(), probe(model)]).fit(model)


def test_a_loss_fn_or_score_fn_that_fails_on_the_batches_stops_the_fit_at_once(tmp_path):
    # Stage 2 first called them after the whole fit, so a mistake in either cost the whole run, unprotected.
    def loss_on_dicts(module, batch):
        return module(batch["x"]).sum()  # the batches are (x, y) tuples

    def score_of_a_shape(module, batch):
        return module(batch[0]).argmax(-1) == batch[1]  # per-example booleans, not (sum, count)

    for kwargs, match in (
        (dict(loss_fn=loss_on_dicts), r"loss_fn fails on the first training batch.*TypeError"),
        (dict(score_fn=score_of_a_shape), r"score_fn fails on the first validation batch.*\(sum_of_scores, count\)"),
    ):
        model = TinyClassifier()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(MisconfigurationException, match=match):
                trainer(tmp_path, max_epochs=2, callbacks=[MergeGuardCallback(progress=False, **kwargs)]).fit(model)
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # no step was taken
        assert not [w for w in caught if "NOT protected" in str(w.message)]  # the error says it all

    # A loss that differentiates inside (an input-gradient penalty) needs grad, as stage 2 gives it: not a failure.
    def penalised(module, batch):
        x, y = batch
        x = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module(x), y)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + 0.01 * g.pow(2).sum()

    guard = MergeGuardCallback(loss_fn=penalised, stage2=ScaleAdversarial(steps=2), progress=False)
    trainer(tmp_path, max_steps=2, callbacks=[guard]).fit(TinyClassifier())
    assert guard.stage2_done
    # The tries leave training as it was: with alpha=0, the weights before stage 2 are those of a plain fit.
    runs = []
    for guarded in (False, True):
        pl.seed_everything(3)
        model = _DropoutClassifier()
        save = _WeightsAtTrainEnd()
        callbacks = [save, MergeGuardCallback(alpha=0.0, stage2=ScaleAdversarial(steps=1), progress=False)]
        trainer(tmp_path, max_epochs=1, callbacks=callbacks if guarded else [save]).fit(model)
        runs.append(save.weights)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


class _DropoutClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 3)


class _WeightsAtTrainEnd(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_the_default_loss_fn_failing_on_the_batches_says_to_pass_one(tmp_path):
    class DictBatches(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch["features"]), batch["target"])

        def train_dataloader(self):
            data = [{"features": x, "target": y} for x, y in blobs(64, 0)]
            return DataLoader(data, batch_size=32)

    guard = MergeGuardCallback(progress=False)
    with pytest.raises(MisconfigurationException, match=r"the default loss_fn fails .* pass your own loss_fn="):
        trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[guard]).fit(DictBatches())


def test_deployment_check_after_stage2_reports_both_models(tmp_path):
    guard = MergeGuardCallback(
        stage2=ScaleAdversarial(steps=4, lr=0.01), tolerance=100.0, release=Release(deployment_check=True)
    )
    module = TinyClassifier()
    trainer(tmp_path, max_steps=4, callbacks=[guard]).fit(module)
    table = guard.report["deployment"]
    assert {"none", "fp16", "bf16", "int8-row", "int4-g32", "finetune", "finetune-lora"} <= set(table)
    assert table["none"]["protected"] == pytest.approx(guard.report["score_after"])
    assert table["fp16"]["protected"] == pytest.approx(table["none"]["protected"], abs=5)  # fp16 keeps a plain model
    with pytest.raises(ValueError, match="deployment_check must be True or False"):
        MergeGuardCallback(release=Release(deployment_check="yes"))


def test_protect_module_says_when_it_changed_nothing():
    """The Python entry point of post-hoc protection is as honest as the command and the callback."""
    from lightning_mergeguard.posthoc import protect_module

    model = TinyClassifier()
    base = {k: v + 0.01 for k, v in model.state_dict().items()}
    batches = iter(lambda: (torch.randn(8, 8), torch.randint(0, 3, (8,))), None)
    with pytest.warns(UserWarning, match="protect_module: the model is NOT protected: no weight changed"):
        report = protect_module(
            model,
            base,
            batches,
            lambda m: 50.0,
            stage2=_Unchanged(steps=2),
            parameters=ParameterSelection(exclude="head"),
        )
    assert report["protected"] is False and "Raise tolerance=" in report["not_protected"]

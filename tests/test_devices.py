"""Device correctness: every op of the probe, the guard and the engine sees one device; GPU paths equal CPU ones.

On a CPU-only machine, :class:`device_audit.DeviceAudit` stands in for a second device (see its docstring): the
probe's donors, an offloaded reference and an offloaded backup are marked as living apart from the compute device,
and any op that combines them with live tensors without moving them first is recorded.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyClassifier, accelerator, blobs, trainer
from device_audit import DeviceAudit
from torch.utils.data import DataLoader

from lightning_mergeguard import (
    Donors,
    MergeGuardCallback,
    MergeProbe,
    ProbeSchedule,
    ReferenceWeights,
    ScaleAdversarial,
)
from lightning_mergeguard.merging import merge
from lightning_mergeguard.merging.methods.sparsify import bisect_select, select_ranks


def base_state():
    torch.manual_seed(1234)
    return TinyClassifier().state_dict()


def donor_states(n=2, scale=0.05):
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out[f"d{i}"] = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base_state().items()}
    return out


def fresh_model():
    model = TinyClassifier()
    model.load_state_dict(base_state())
    return model


# ---------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("n", [1, 5, 1000, 40_000])
def test_select_ranks_equals_sort(device, n):
    torch.manual_seed(n)
    x = torch.randn(n, device=device)
    x[::4] = x[0]  # ties
    x[1::9] = -0.0
    s = torch.sort(x).values
    for i, j in [(0, n - 1), (n // 3, n // 2), (n // 2, n // 2)]:
        a, b = select_ranks(x, i, j)
        assert float(a) == float(s[i]) and float(b) == float(s[j])
    got = bisect_select(x, (0, n // 2, n - 1), chunk=777)  # the large-tensor path, in small chunks
    assert [float(v) for v in got] == [float(s[0]), float(s[n // 2]), float(s[n - 1])]


def test_bisect_select_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        bisect_select(torch.zeros(3, dtype=torch.float64), (0,))


@pytest.mark.parametrize(
    "cfg",
    [
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}},
        {"merge_method": "ties", "parameters": {"normalize": True}},
        {"merge_method": "ties", "parameters": {"trim_scope": "model"}},
        {"merge_method": "breadcrumbs", "parameters": {}},
        {"merge_method": "dare_linear", "parameters": {}},
        {"merge_method": "della", "parameters": {}},
        {"merge_method": "model_stock", "parameters": {"filter_wise": True}},
        {"merge_method": "sce", "parameters": {"select_topk": 0.5}},
    ],
    ids=lambda c: c["merge_method"] + ("_model" if "trim_scope" in c["parameters"] else ""),
)
def test_engine_on_device_equals_cpu(device, cfg):
    donors = donor_states(3)
    method = cfg["merge_method"]
    dens = {"density": 0.4} if method not in ("task_arithmetic", "model_stock", "sce") else {}
    params = {} if method in ("model_stock", "sce") else {"weight": 1.0, **dens}
    full = {**cfg, "base_model": "base", "models": [{"model": n, "parameters": params} for n in donors]}
    cpu = merge(full, donors, base_state(), seed=0)
    dev = merge(full, donors, base_state(), seed=0, device=device)
    for k in cpu:
        assert dev[k].device.type == device.type
        if method.startswith(("dare", "della")) and device.type != "cpu":
            continue  # the random masks come from another generator on another device
        torch.testing.assert_close(dev[k].cpu(), cpu[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the probe
class AuditedProbe(MergeProbe):
    """A probe whose probes run inside a DeviceAudit, donors (and an offloaded backup) marked as storage."""

    def __init__(self, audit: DeviceAudit, **kwargs):
        super().__init__(**kwargs)
        self.audit = audit

    def _backup_live(self):
        super()._backup_live()
        if self.backup_device is not None:
            self.audit.mark(self._backup.values(), "backup")

    def probe(self, trainer, pl_module, force=False):
        for tau in self._donor_tau.values():
            self.audit.mark(tau.values(), "donors")
        if self.reference.device is not None:
            self.audit.mark(self.reference.as_dict().values(), "reference")
        with self.audit:
            return super().probe(trainer, pl_module, force)


@pytest.mark.parametrize(
    ("guard_kwargs", "probe_kwargs", "donor_dtype"),
    [
        (None, {}, "float32"),
        (None, {"backup_device": "cpu"}, "bfloat16"),
        ({"reference": ReferenceWeights(device="cpu", dtype="bfloat16")}, {"backup_device": "cpu"}, "float32"),
    ],
    ids=["donors", "donors+backup", "shared-offloaded-reference"],
)
def test_probe_never_combines_tensors_across_devices(tmp_path, guard_kwargs, probe_kwargs, donor_dtype):
    audit = DeviceAudit()
    probe = AuditedProbe(
        audit,
        donors=Donors(donor_states(), dtype=donor_dtype),
        methods=["task_arithmetic", "ties", "dare_ties", "linear", "breadcrumbs"],
        coefficients=[0.3],
        eval_dataloaders={"own": DataLoader(blobs(64, 1), batch_size=32), "d0": DataLoader(blobs(64, 2), batch_size=8)},
        strict=True,
        progress=False,
        **probe_kwargs,
    )
    callbacks = [probe] if guard_kwargs is None else [MergeGuardCallback(stage2="none", **guard_kwargs), probe]
    trainer(tmp_path, max_epochs=1, callbacks=callbacks).fit(fresh_model())
    assert probe.results, "the probe did not run"
    assert audit.checked > 100
    assert audit.violations == []
    assert "mergeprobe/cosine/d0" in probe.results[-1]


def test_device_audit_catches_the_original_cosine_bug():
    """Negative control: the pre-fix cosine (live task vector times a donor tensor left on its device) is caught."""
    audit = DeviceAudit()
    live, donor = torch.randn(4), torch.randn(4)
    audit.mark([donor], "donors")
    with audit:
        _ = (live.double() * donor.double()).sum()  # what task_vector_cosine did before
        _ = live * donor.to(live.device)  # the fix: an explicit move
    assert audit.violations == ["mul combines tensors on ['compute', 'donors']"]


def test_guard_stage1_with_offloaded_bf16_reference_is_exact_and_device_clean(tmp_path):
    audit = DeviceAudit()

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            ref = guard.reference
            audit.mark(ref.as_dict().values(), "reference")
            self.before = {n: p.grad.clone() for n, p in guard._params.items()}
            with audit:
                guard.on_before_optimizer_step(trainer, pl_module, optimizer)
            self.expected = {
                n: self.before[n] + 2 * guard.alpha * (p.detach() - ref[n].float()) for n, p in guard._params.items()
            }
            self.after = {n: p.grad.clone() for n, p in guard._params.items()}
            guard_alpha[0] = guard.alpha
            guard.alpha = 0.0  # the real hook (after this one) must not add the term twice

        def on_train_batch_end(self, *args):
            guard.alpha = guard_alpha[0]

    guard_alpha = [0.0]
    guard = MergeGuardCallback(alpha=0.1, stage2="none", reference=ReferenceWeights(dtype="bfloat16", device="cpu"))
    check = Check()
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[check, guard]).fit(fresh_model())
    assert guard.reference["net.0.weight"].dtype == torch.bfloat16
    assert audit.violations == []
    for n in check.after:
        torch.testing.assert_close(check.after[n], check.expected[n])


def test_probe_and_guard_share_one_reference(tmp_path):
    guard = MergeGuardCallback(stage2="none", reference=ReferenceWeights(dtype="bfloat16"))
    probe = MergeProbe(donors=donor_states(1), eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32), progress=False)
    trainer(tmp_path, max_epochs=1, callbacks=[probe, guard]).fit(fresh_model())  # order does not matter
    assert probe.reference is guard.reference
    assert guard.reference.nbytes == sum(p.numel() * 2 for p in fresh_model().parameters())
    assert "reference" not in probe.state_dict()


def test_probe_resolves_the_trainer_validation_loader_when_it_first_probes(tmp_path):
    """No eval_dataloaders, a probe due before the first validation: the fit's val loader is loaded and used."""
    probe = MergeProbe(
        donors=donor_states(1),
        progress=False,
        schedule=ProbeSchedule(every_n_steps=2, on_train_end=False, max_overhead=None),
    )
    model = fresh_model()
    trainer(tmp_path, max_epochs=1, limit_train_batches=4, num_sanity_val_steps=0, callbacks=[probe]).fit(
        model, DataLoader(blobs(128, 0), batch_size=32), DataLoader(blobs(64, 1), batch_size=32)
    )
    assert [r["step"] for r in probe.results] == [2.0, 4.0]
    assert 0 <= probe.results[0]["mergeprobe/own/individual_acc"] <= 100


def test_probe_without_any_validation_loader_names_the_fix(tmp_path):
    class NoVal(TinyClassifier):
        val_dataloader = pl.LightningModule.val_dataloader  # not overridden: no validation loader

    probe = MergeProbe(donors=donor_states(1), strict=True, progress=False)
    model = NoVal()
    model.load_state_dict(base_state())
    with pytest.raises(ValueError, match=r"needs eval_dataloaders, or a validation dataloader given to trainer\.fit"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[probe]).fit(model)


def test_guard_and_probe_end_to_end_on_device(tmp_path, device):
    probe = MergeProbe(
        donors=donor_states(),
        methods=["task_arithmetic", "ties"],
        eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32),
        strict=True,
        progress=False,
        schedule=ProbeSchedule(max_overhead=None),  # every epoch
    )
    guard = MergeGuardCallback(stage2=ScaleAdversarial(steps=16), eval_batches=2, progress=False)
    model = fresh_model()
    trainer(tmp_path, max_epochs=2, accelerator=accelerator(device), callbacks=[guard, probe]).fit(model)
    assert next(model.parameters()).device.type == device.type
    assert len(probe.results) == 3  # two epochs and the end of training
    assert guard.report is not None and guard.report["validation_passes"] <= 20
    assert all(t.device.type == "cpu" for tau in probe._donor_tau.values() for t in tau.values())

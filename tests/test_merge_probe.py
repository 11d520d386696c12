"""MergeProbe: numbers equal an offline merge, live weights untouched, DDP equals single process, bad donors."""

from __future__ import annotations

import json
import warnings
from time import sleep as _sleep

import lightning.pytorch as pl
import pytest
import torch
from _helpers import TinyClassifier, accelerator, blobs, perturbed_state_dict, trainer
from torch.utils.data import DataLoader

from lightning_mergeguard import (
    Donors,
    MergeGuardCallback,
    MergeProbe,
    ParameterSelection,
    ProbeSchedule,
    ScaleAdversarial,
)
from lightning_mergeguard.errors import ForeignBaseError
from lightning_mergeguard.evaluation import default_score, evaluate
from lightning_mergeguard.merging import merge


def base_state():
    torch.manual_seed(1234)
    return TinyClassifier().state_dict()


def fresh_model(cls=TinyClassifier):
    """The model every test fine-tunes: always the same initial weights, so donors share its base."""
    model = cls()
    model.load_state_dict(base_state())
    return model


def donor_states(n=2, scale=0.05):
    base = base_state()
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out[f"d{i}"] = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return out


def val_loader():
    return DataLoader(blobs(128, 1), batch_size=32)


class Snapshot(pl.Callback):
    """Records the weights right before and right after the probe's epoch-end hook (placed around the probe)."""

    def __init__(self, store, key):
        self.store, self.key = store, key

    def on_train_epoch_end(self, trainer, pl_module):
        self.store[self.key] = {k: v.clone() for k, v in pl_module.state_dict().items()}


PROBED = {
    "task_vectors": (
        None,
        ["task_arithmetic", {"merge_method": "ties", "model_parameters": {"density": 0.5}}, "dare_ties", "linear"],
        {"task_arithmetic", "ties", "dare_ties", "linear"},
        set(),
    ),
    "della_stock_sce": (
        None,
        ["della", "della_linear", "model_stock", "sce"],
        {"della", "della_linear"},
        {"model_stock", "sce"},
    ),
    "one_donor": (1, ["nuslerp", "model_stock", "slerp", "karcher"], {"nuslerp", "slerp"}, {"model_stock", "karcher"}),
    # two-model methods with two donors: the live model with each donor (it was "needs exactly one donor")
    "pairwise": (2, ["slerp", "nuslerp"], {"slerp:d0", "slerp:d1", "nuslerp:d0", "nuslerp:d1"}, set()),
    # mergekit's newer methods: the live model's changes taken into each donor by nearswap and arcee_fusion
    "newer": (
        2,
        ["multislerp", "ram", "ramplus_tl", {"merge_method": "nearswap", "parameters": {"t": 0.01}}, "arcee_fusion"],
        {"multislerp"},
        {"ram", "ramplus_tl", "nearswap:d0", "nearswap:d1", "arcee_fusion:d0", "arcee_fusion:d1"},
    ),
}


@pytest.mark.parametrize("case", sorted(PROBED))
def test_probe_equals_offline_merge_and_leaves_weights_bit_identical(tmp_path, case):
    n_donors, methods, weighted, once = PROBED[case]
    pl.seed_everything(0)
    donors = donor_states() if n_donors is None else donor_states(n_donors)
    probe = MergeProbe(
        donors=donors,
        methods=methods,
        coefficients=[0.3, 0.7],
        eval_dataloaders=val_loader(),
        eval_batches=None,
        progress=False,
        schedule=ProbeSchedule(on_train_end=False),
    )
    store = {}
    model = fresh_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, max_epochs=1, callbacks=[Snapshot(store, "before"), probe, Snapshot(store, "after")]).fit(model)
    for k in store["before"]:
        assert torch.equal(store["before"][k], store["after"][k]), k
    live = store["before"]
    result = probe.results[-1]
    offline_model = TinyClassifier()
    for spec in probe.specs:
        models = {"live": live, **donors}
        cfg = spec.config
        anchor = base if cfg.base_model in (None, "base") else models[cfg.base_model]  # slerp: from the live model
        merged = merge(cfg, {m.model: models[m.model] for m in cfg.models if m.model != cfg.base_model}, anchor, seed=0)
        offline_model.load_state_dict(merged)
        want = 100 * evaluate(offline_model, val_loader())
        assert result[f"mergeprobe/{spec.label}/own/acc"] == pytest.approx(want, abs=1e-9), spec.label
    offline_model.load_state_dict(live)
    assert result["mergeprobe/own/individual_acc"] == pytest.approx(100 * evaluate(offline_model, val_loader()))
    labels = {s.label for s in probe.specs}
    assert labels == {f"{m}@{c}" for m in weighted for c in (0.3, 0.7)} | once
    assert -1 <= result["mergeprobe/cosine/d0"] <= 1


def test_probe_logs_through_csv_logger_and_plots(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_mergeguard.plotting import plot_merge_resistance

    pl.seed_everything(0)
    probe = MergeProbe(
        donors=donor_states(1),
        coefficients=[0.3, 0.5],
        eval_dataloaders=val_loader(),
        progress=False,
        schedule=ProbeSchedule(every_n_steps=4, max_overhead=None),
    )
    logger = CSVLogger(tmp_path, name="run")
    trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[probe]).fit(fresh_model())
    csv_path = tmp_path / "run" / "version_0" / "metrics.csv"
    text = csv_path.read_text()
    assert "mergeprobe/task_arithmetic@0.3/own/acc" in text and "mergeprobe/cosine/d0" in text
    steps = [r["step"] for r in probe.results]
    assert steps[:4] == [4.0, 8.0, 12.0, 16.0] and steps[-1] == 16.0  # 8 steps/epoch; end-of-fit probe forced
    png = plot_merge_resistance(csv_path, tmp_path / "resistance.png")
    assert png.stat().st_size > 10_000
    # The command line: one-line errors with exit status 2 for what a user mistypes, never an empty plot.
    from lightning_mergeguard.plotting import main

    assert main([str(csv_path), str(tmp_path / "cli.png"), "--task", "own"]) == 0 and (tmp_path / "cli.png").is_file()
    assert main([str(csv_path), str(tmp_path / "typo.png"), "--task", "d1"]) == 2
    assert "no merged accuracy for task 'd1'; the probe logged: own" in capsys.readouterr().err
    assert not (tmp_path / "typo.png").exists()
    assert main([str(tmp_path / "missing.csv"), str(tmp_path / "x.png")]) == 2
    assert "No such file or directory: " in capsys.readouterr().err


def test_donor_tasks_with_their_own_score_fn(tmp_path):
    pl.seed_everything(0)

    def always_half(module, batch):
        return torch.tensor(len(batch[1]) / 2), len(batch[1])

    probe = MergeProbe(
        donors=donor_states(1),
        eval_dataloaders={"own": val_loader(), "d0": (val_loader(), always_half)},
        progress=False,
        schedule=ProbeSchedule(on_train_end=False),
    )
    trainer(tmp_path, max_epochs=1, callbacks=[probe]).fit(fresh_model())
    r = probe.results[-1]
    assert r["mergeprobe/d0/individual_acc"] == 50.0
    assert r["mergeprobe/task_arithmetic@0.3/d0/acc"] == 50.0
    assert r["mergeprobe/task_arithmetic@0.3/d0/interference"] == 0.0


class WriteProbeResults(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        probe = next(c for c in trainer.callbacks if isinstance(c, MergeProbe))
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(probe.results, f)


class FixedWeights(TinyClassifier):
    """No training (lr 0), so the single- and two-process runs probe the same weights."""

    def __init__(self):
        super().__init__(lr=0.0)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("explicit", "eval_batches"),
    [(True, None), (False, None), (False, 2)],
    ids=["eval_dataloaders", "trainer_val_loader", "trainer_val_loader-2_batches"],
)
def test_ddp_two_processes_log_the_same_numbers_as_one(tmp_path, explicit, eval_batches):
    # eval_dataloaders: the same batches on every rank, dealt out; the trainer's validation loader: Lightning gives
    # each rank its own rows (DistributedSampler), taken as they are. Both must score one process's rows.
    def run(path, **kw):
        pl.seed_everything(0)
        probe = MergeProbe(
            donors=donor_states(),
            methods=["task_arithmetic", "ties"],
            coefficients=[0.3],
            eval_dataloaders=val_loader() if explicit else None,
            eval_batches=eval_batches,
            progress=False,
            signals=[WeightSignal()],
        )
        path.mkdir()
        out = path / "results.json"
        trainer(path, max_epochs=1, limit_train_batches=2, callbacks=[probe, WriteProbeResults(str(out))], **kw).fit(
            fresh_model(FixedWeights)
        )
        return json.loads(out.read_text())

    single = run(tmp_path / "one")
    double = run(tmp_path / "two", strategy="ddp_spawn", devices=2)
    assert len(single) == len(double) == 2
    assert "mergeprobe/ties@0.3/marker" in double[0]
    for a, b in zip(single, double):
        for k, v in a.items():
            if k not in ("mergeprobe/seconds", "step"):
                assert b[k] == pytest.approx(v, abs=1e-9), k


def test_bad_donors_raise_clear_errors(tmp_path):
    good = donor_states(1)["d0"]
    wrong_shape = {**good, "net.0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"donor 'bad' tensor 'net.0.weight' has shape \(3, 3\)"):
        trainer(
            tmp_path, max_epochs=1, callbacks=[MergeProbe(donors={"bad": wrong_shape}, eval_dataloaders=val_loader())]
        ).fit(TinyClassifier())
    nan = {**good, "head.bias": torch.tensor([0.0, float("nan"), 0.0])}
    with pytest.raises(ValueError, match=r"donor 'nan' tensor 'head.bias' has NaN/Inf"):
        trainer(tmp_path, max_epochs=1, callbacks=[MergeProbe(donors={"nan": nan}, eval_dataloaders=val_loader())]).fit(
            TinyClassifier()
        )
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"donor 'miss' has no tensor for parameter 'head.bias'"):
        trainer(
            tmp_path, max_epochs=1, callbacks=[MergeProbe(donors={"miss": missing}, eval_dataloaders=val_loader())]
        ).fit(TinyClassifier())


class CountSteps(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


@pytest.mark.parametrize("strict", [False, True])
def test_donor_from_another_base_is_refused_before_training(tmp_path, strict):
    torch.manual_seed(99)  # the same architecture from another random init: not a fine-tune of this base
    other = TinyClassifier().state_dict()
    counter = CountSteps()
    probe = MergeProbe(donors={"other": other}, eval_dataloaders=val_loader(), strict=strict, progress=False)
    with pytest.raises(ForeignBaseError, match=r"'other' is not a fine-tune of the model's reference weights"):
        trainer(tmp_path, max_epochs=1, callbacks=[counter, probe]).fit(fresh_model())
    assert counter.steps == 0
    # The explicit opt-out accepts it.
    ok = MergeProbe(eval_dataloaders=val_loader(), progress=False, donors=Donors({"other": other}, check_base=False))
    trainer(tmp_path, max_epochs=1, callbacks=[ok]).fit(fresh_model())
    assert ok.results and abs(ok.donor_cosine["other"]) < 0.2  # chance level for matrices this small


def test_llama_donor_from_another_init_is_refused_despite_norm_weights(tmp_path):
    """RMSNorm weights of 1.0 dominate ||theta_pre||; the per-matrix median cosine still sees the foreign donor."""
    from _helpers import tiny_llama

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    base = tiny_llama(seed=0)
    foreign = tiny_llama(seed=1).state_dict()
    finetune = perturbed_state_dict(base.state_dict(), seed=3, scale=0.002)
    batch = {"input_ids": torch.randint(0, 64, (4, 8)), "labels": torch.randint(0, 64, (4, 8))}
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=2)
    good = MergeProbe(donors={"ft": finetune}, eval_dataloaders=loader, progress=False)
    trainer(tmp_path, max_steps=1, callbacks=[good]).fit(CausalLMModule(base, lr=1e-4), loader)
    assert good.donor_cosine["ft"] > 0.9
    bad = MergeProbe(donors={"foreign": foreign}, eval_dataloaders=loader, progress=False)
    with pytest.raises(ForeignBaseError, match="'foreign' is not a fine-tune"):
        trainer(tmp_path, max_steps=1, callbacks=[bad]).fit(CausalLMModule(tiny_llama(seed=0), lr=1e-4), loader)


def test_failed_probe_warns_unless_strict(tmp_path):
    def broken(module, batch):
        raise RuntimeError("eval exploded")

    probe = MergeProbe(donors=donor_states(1), eval_dataloaders=val_loader(), score_fn=broken, progress=False)
    with pytest.warns(UserWarning, match="eval exploded"):
        trainer(tmp_path, max_epochs=1, callbacks=[probe]).fit(fresh_model())
    assert probe.results == []
    strict = MergeProbe(donors=donor_states(1), eval_dataloaders=val_loader(), score_fn=broken, strict=True)
    with pytest.raises(RuntimeError, match="eval exploded"):
        trainer(tmp_path, max_epochs=1, callbacks=[strict]).fit(fresh_model())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(donors={}), "at least one donor"),
        (dict(donors={"live": {}}), "reserved"),
        (dict(donors={"a": "ft/x", "b": "ft/../ft/x"}), "donors 'a' and 'b' are the same model"),
        (dict(donors=[(same := {"w": torch.zeros(1)}), same]), "donors 'donor0' and 'donor1' are the same model"),
        (dict(methods=["tie"]), "unknown merge_method 'tie'"),
        (dict(methods=[{"merge_method": "ties", "parameters": {"lamda": 1}}]), "did you mean 'lambda'"),
        (dict(schedule={"every_n_steps": 10}), "schedule must be a ProbeSchedule"),
        (dict(coefficients=[]), "coefficients must be"),
        (dict(coefficients="0.3"), "coefficients must be"),
        (dict(coefficients=[0.3, True]), "coefficients must be"),
        (dict(coefficients=[float("nan")]), "coefficients must be"),
        (dict(donors="ft/x"), "donors must be a mapping or a list"),
        (dict(methods=[]), "methods must name at least one merge method"),
        # these failed at every probe, each time as a warning, and the run went on with no merge metrics
        (dict(eval_dataloaders={"own": ([], "accuracy")}), r"eval_dataloaders\['own'\] must be a loader or"),
        (dict(eval_dataloaders={"own": [], "dd": []}), r"keys \['dd'\] are neither 'own' nor donor names"),
        (dict(eval_dataloaders={"d": []}), "needs an 'own' entry"),
        (dict(score_fn="accuracy"), "score_fn must be callable"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"donors": {"d": {}}, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        MergeProbe(**args)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ProbeSchedule, dict(every_n_steps=0), "every_n_steps must be"),
        (ProbeSchedule, dict(every_n_epochs=True), "every_n_epochs must be"),
        (ProbeSchedule, dict(on_train_end="yes"), "on_train_end must be True or False"),
        (ProbeSchedule, dict(max_overhead=-1), "max_overhead must be a positive fraction"),
        (Donors, dict(sources={"d": {}}, dtype="fp8"), "donor dtype must be 'float32' or 'bfloat16'"),
        (Donors, dict(sources={"d": {}}, check_base="no"), "check_base must be True or False"),
        (Donors, dict(sources={"own": {}}), "reserved"),
    ],
)
def test_settings_objects_refuse_bad_values_when_built(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_the_default_schedule_keeps_probing_within_its_budget(tmp_path):
    """By default a probe runs every epoch only while probing took at most 5% of the training time: on a run whose
    probes cost far more than its training (what a user with 4-batch epochs met), the first and the last run."""

    def slow_score(module, batch):
        _sleep(0.05)
        x, y = batch
        return (module(x).argmax(-1) == y).sum(), len(y)

    probe = MergeProbe(donors=donor_states(1), eval_dataloaders=val_loader(), score_fn=slow_score, progress=False)
    assert probe.schedule == ProbeSchedule(every_n_epochs=1, max_overhead=0.05)
    trainer(tmp_path, max_epochs=6, limit_train_batches=2, callbacks=[probe]).fit(fresh_model())
    assert [r["step"] for r in probe.results] == [2.0, 12.0]  # epoch 1, then the end of fit
    assert probe.skipped_for_budget == 5


def test_evaluation_data_without_batches_is_refused_at_the_first_probe(tmp_path):
    probe = MergeProbe(
        donors=donor_states(1),
        eval_dataloaders={"own": val_loader(), "d0": []},
        schedule=ProbeSchedule(every_n_steps=1),
    )
    with pytest.raises(ValueError, match="the evaluation data of 'd0' has no batches"):
        trainer(tmp_path, max_steps=2, callbacks=[probe]).fit(fresh_model())


def test_one_method_may_be_given_alone():
    # A bare string is one method, not a list of its letters ('t', 'i', 'e', 's').
    for one in ("ties", {"merge_method": "ties", "label": "t"}):
        probe = MergeProbe(donors={"d": {}}, methods=one, coefficients=[0.3])
        assert [s.config.merge_method for s in probe.specs] == ["ties"]
    # And one number is one coefficient (it was 'float object is not iterable').
    probe = MergeProbe(donors={"d": {}}, methods="task_arithmetic", coefficients=0.5)
    assert [s.label for s in probe.specs] == ["task_arithmetic@0.5"] and probe.coefficients == [0.5]


def test_bf16_donors_and_resume_keeps_reference(tmp_path):
    pl.seed_everything(0)
    probe = MergeProbe(eval_dataloaders=val_loader(), progress=False, donors=Donors(donor_states(1), dtype="bfloat16"))
    model = fresh_model()
    t = trainer(tmp_path, max_epochs=1, callbacks=[probe])
    t.fit(model)
    assert all(v.dtype == torch.bfloat16 for v in probe._donor_tau["d0"].values())
    ckpt = tmp_path / "p.ckpt"
    t.save_checkpoint(ckpt)
    probe2 = MergeProbe(eval_dataloaders=val_loader(), progress=False, donors=Donors(donor_states(1), dtype="bfloat16"))
    trainer(tmp_path, max_epochs=2, callbacks=[probe2]).fit(fresh_model(), ckpt_path=ckpt)
    for n, t_ref in probe.reference.as_dict().items():
        assert torch.equal(probe2.reference[n], t_ref)
    assert probe2.results[0]["step"] == probe.results[0]["step"]


def test_overhead_budget_skips_probes(tmp_path):
    import time as _time

    def slow_score(module, batch):
        _time.sleep(0.05)
        x, y = batch
        return (module(x).argmax(-1) == y).sum(), len(y)

    pl.seed_everything(0)
    probe = MergeProbe(
        donors=donor_states(1),
        eval_dataloaders=val_loader(),
        score_fn=slow_score,
        progress=False,
        schedule=ProbeSchedule(every_n_steps=1, max_overhead=0.05),
    )
    trainer(tmp_path, max_epochs=1, callbacks=[probe]).fit(fresh_model())
    assert probe.skipped_for_budget > 0
    assert 2 <= len(probe.results) < 8  # 8 steps were due; the first and the end-of-fit probe always run
    with pytest.raises(ValueError, match="max_overhead must be"):
        MergeProbe(donors={"d": {}}, schedule=ProbeSchedule(max_overhead=0))


class WeightSignal:
    """A deterministic 'ownership signal' of the weights; it holds a secret that must never be written anywhere."""

    name = "marker"
    secret = "TOPSECRET-7f3a"

    def __call__(self, module):
        return float(torch.sigmoid(module.net[0].weight.detach().sum()))


def test_signals_are_logged_per_merge_and_secrets_stay_out_of_files(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0)
    donors = donor_states(1)
    probe = MergeProbe(
        donors=donors,
        methods=["task_arithmetic", "ties"],
        coefficients=[0.3, 0.7],
        eval_dataloaders=val_loader(),
        progress=False,
        signals=[WeightSignal()],
        schedule=ProbeSchedule(on_train_end=False),
    )
    store = {}
    model = fresh_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer(
        tmp_path,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=True,
        callbacks=[Snapshot(store, "live"), probe, ckpt],
    ).fit(model)
    result = probe.results[-1]
    offline = TinyClassifier()
    offline.load_state_dict(store["live"])
    assert result["mergeprobe/own/marker"] == pytest.approx(WeightSignal()(offline))
    for spec in probe.specs:
        cfg = spec.config
        models = {"live": store["live"], **donors}
        anchor = base if cfg.base_model in (None, "base") else models[cfg.base_model]  # slerp: from the live model
        merged = merge(cfg, {m.model: models[m.model] for m in cfg.models if m.model != cfg.base_model}, anchor, seed=0)
        offline.load_state_dict(merged)
        assert result[f"mergeprobe/{spec.label}/marker"] == pytest.approx(WeightSignal()(offline), abs=1e-7)
    assert len({round(result[f"mergeprobe/{s.label}/marker"], 6) for s in probe.specs}) > 1
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.name == "metrics.csv" for p in written)
    for p in written:
        assert WeightSignal.secret.encode() not in p.read_bytes(), p


@pytest.mark.parametrize(
    ("signals", "error", "match"),
    [
        ([lambda m: 1.0], TypeError, "has no 'name'"),
        ({"a/b": lambda m: 1.0}, ValueError, "contain no '/'"),
        ({"a": 3}, TypeError, "not callable"),
        ([WeightSignal(), WeightSignal()], ValueError, "two signals are named 'marker'"),
    ],
)
def test_bad_signals(signals, error, match):
    with pytest.raises(error, match=match):
        MergeProbe(donors={"d": {}}, signals=signals)


def test_eval_share_takes_distributed_loaders_as_they_are_and_deals_out_the_others():
    from torch.utils.data import DistributedSampler

    from lightning_mergeguard.callbacks._common import eval_share

    data = blobs(128, 1)
    plain = DataLoader(data, batch_size=16)
    batches, shard = eval_share(plain, 4, rank=1, world=2)
    assert len(batches) == 4 and shard == (1, 2)
    assert eval_share(plain, 4, rank=0, world=1)[1] is None
    split = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    batches, shard = eval_share(split, 4, rank=1, world=2)
    assert shard is None and len(batches) == 2  # ceil(4 / 2) batches of this rank's rows
    rows = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(rows, data.tensors[0][1:32:2])  # rank 1's half of one process's first 4 batches
    assert eval_share(split, None, rank=1, world=2) == (split, None)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true", "bf16-mixed"])
def test_guard_and_probe_feed_inputs_in_the_weights_dtype_like_the_loops(tmp_path, precision):
    # With "-true" precisions the loops cast float inputs to the weights' dtype; the probe's evaluation and stage 2
    # must too (they crashed with "mat1 and mat2 must have the same dtype" on bf16-true), and score what
    # trainer.validate scores (under autocast with bf16-mixed).
    from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial

    pl.seed_everything(0)
    probe = MergeProbe(
        donors=donor_states(1),
        methods=["task_arithmetic"],
        coefficients=[0.5],
        eval_dataloaders=val_loader(),
        eval_batches=None,
        progress=False,
        schedule=ProbeSchedule(every_n_epochs=1, on_train_end=False),
    )
    guard = MergeGuardCallback(alpha=0.1, stage2=ScaleAdversarial(steps=4, lr=0.01), progress=False)
    model = fresh_model()
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=4, precision=precision, callbacks=[probe, guard])
    t.fit(model)
    dtype = {"bf16-true": torch.bfloat16, "64-true": torch.float64, "bf16-mixed": torch.float32}[precision]
    assert next(model.parameters()).dtype == dtype
    assert guard.stage2_done and guard.report["validation_passes"] >= 2
    # The guard rail scored the stage-1 weights: what trainer.validate measures on the same batches.
    assert guard.report["score_before"] == pytest.approx(probe.results[-1]["mergeprobe/own/individual_acc"])
    # And the probe's own score is the loop's for the weights trainer.validate now sees.
    probe.probe(t, model)
    val_acc = t.validate(model, val_loader(), verbose=False)[0]["val_acc"]
    assert probe.results[-1]["mergeprobe/own/individual_acc"] == pytest.approx(100 * val_acc, abs=1e-6)


class DropoutWithFrozenNorm(TinyClassifier):
    """Dropout (draws from the global RNG) and a BatchNorm the user keeps in eval mode during fit."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(16, 16),
            torch.nn.ReLU(),
        )

    def on_train_epoch_start(self):
        self.net[1].eval()  # frozen statistics: the running mean/var must not move


class NormModes(pl.Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.net[1].training)


def test_a_probe_and_stage_2_leave_the_training_run_as_it_would_be_without_them(tmp_path, device):
    """Same weights with or without a probe (RNG, modes); a user's eval-mode BatchNorm stays in eval mode."""

    torch.manual_seed(7)
    init = DropoutWithFrozenNorm().state_dict()

    def fit(callbacks):
        pl.seed_everything(0)
        model = DropoutWithFrozenNorm()
        model.load_state_dict(init)
        spy = NormModes()
        t = trainer(tmp_path, max_epochs=2, accelerator=accelerator(device), callbacks=[*callbacks, spy])
        t.fit(model)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, spy.modes, model

    plain, plain_modes, _ = fit([])
    donor = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in init.items()}
    probe = MergeProbe(
        {"d0": donor},
        methods=["task_arithmetic", "dare_linear"],
        progress=False,
        schedule=ProbeSchedule(every_n_steps=3, on_train_end=False, max_overhead=None),
    )
    probed, probed_modes, model = fit([probe])
    assert len(probe.results) >= 5  # probes ran mid-epoch and at epoch ends
    assert plain_modes == probed_modes == [False] * len(plain_modes)
    for k in plain:
        assert torch.equal(plain[k], probed[k]), k  # bit for bit: weights and the BatchNorm's running statistics
    # Stage 2 (optimisation and guard-rail passes in eval mode) also gives the user's modes back.
    guard = MergeGuardCallback(stage2=ScaleAdversarial(steps=2), tolerance=100.0, progress=False)
    trainer(tmp_path, max_epochs=1, accelerator=accelerator(device), callbacks=[guard]).fit(model)
    assert guard.stage2_done and model.training and not model.net[1].training


class NoValidationStep(TinyClassifier):
    """Defines a validation loader but no validation_step, so Lightning never loads the loader."""

    validation_step = pl.LightningModule.validation_step  # not overridden, as far as Lightning can tell


@pytest.mark.parametrize("module_cls", [TinyClassifier, NoValidationStep])
def test_probe_and_guard_score_on_the_validation_loader_lightning_does_not_load(tmp_path, module_cls):
    """limit_val_batches=0 or no validation_step: the module's val_dataloader is still the held-out data."""
    pl.seed_everything(0)
    model = fresh_model(module_cls)
    probe = MergeProbe(donor_states(1), progress=False, eval_batches=None, schedule=ProbeSchedule(every_n_epochs=1))
    guard = MergeGuardCallback(stage2=ScaleAdversarial(steps=2), tolerance=100.0, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*scoring stage 2 on training batches")
        trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[guard, probe]).fit(model)
    val = list(DataLoader(blobs(128, 1), batch_size=64))
    # The probe's last entry and stage 2's score after are the protected model's accuracy on those 128 rows.
    expected = 100.0 * evaluate(model, val)
    assert probe.results[-1]["mergeprobe/own/individual_acc"] == pytest.approx(expected)
    assert guard.report["score_after"] == pytest.approx(expected)


def test_probe_gradient_parameters_count_every_layer_of_the_model_not_only_the_included(tmp_path):
    """include selects layer 0 of a 2-layer Llama: its lambda is the gradient's first value, as offline."""
    from _helpers import tiny_llama

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    base = tiny_llama(seed=0)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    finetune = perturbed_state_dict(ref, seed=3, scale=0.002)
    batch = {"input_ids": torch.randint(0, 64, (4, 8)), "labels": torch.randint(0, 64, (4, 8))}
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=2)
    name = "model.layers.0.mlp.up_proj.weight"
    seen = []

    def record(module, b):  # the merged weight the probe evaluates
        seen.append(module.model.model.layers[0].mlp.up_proj.weight.detach().clone())
        return default_score(module, b)

    method = {"merge_method": "task_arithmetic", "parameters": {"lambda": [0.25, 1.0]}, "label": "ta_gradient"}
    probe = MergeProbe(
        {"ft": finetune},
        methods=[method],
        coefficients=None,
        eval_dataloaders=loader,
        score_fn=record,
        eval_batches=1,
        progress=False,
        strict=True,
        parameters=ParameterSelection(include=r"layers\.0\."),
        schedule=ProbeSchedule(every_n_steps=10**6, every_n_epochs=None),
    )
    module = CausalLMModule(base, lr=1e-3)
    trainer(tmp_path, max_steps=1, callbacks=[probe]).fit(module, loader)
    live = {k.removeprefix("model."): v for k, v in module.state_dict().items()}
    offline = merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": "live", "parameters": {"weight": 1.0}},
                {"model": "ft", "parameters": {"weight": 1.0}},
            ],
            "parameters": {"lambda": [0.25, 1.0]},
        },
        {"live": live, "ft": finetune},
        ref,
    )
    assert len(seen) == 2  # the live model, then the merge
    torch.testing.assert_close(seen[1], offline[name], rtol=0, atol=1e-7)


class CountingScore:
    """A score function that counts the batches it scores (the guard rail's and the probe's evaluation budget)."""

    def __init__(self):
        self.batches = 0

    def __call__(self, module, batch):
        self.batches += 1
        return default_score(module, batch)


def test_fast_dev_run_checks_stage_2_and_the_probe_quickly_and_writes_nothing(tmp_path):
    # Lightning's debug run: every hook runs on one batch and no checkpoint is written. Stage 2 runs two steps with
    # one check on one validation batch (so a broken loss or score shows before a long fit), the probe scores one
    # batch per task, and a protected model already at save_path/report_path is left as it was.
    save, report = tmp_path / "protected.safetensors", tmp_path / "report.json"
    save.write_bytes(b"an earlier protected model")
    report.write_text("{}")
    guard_score, probe_score = CountingScore(), CountingScore()
    guard = MergeGuardCallback(
        alpha=0.1,
        stage2=ScaleAdversarial(steps=300, checks=8),
        score_fn=guard_score,
        save_path=str(save),
        report_path=str(report),
        progress=False,
    )
    probe = MergeProbe(
        donors=donor_states(), methods=["task_arithmetic"], coefficients=[0.5], score_fn=probe_score, progress=False
    )
    model = fresh_model()
    trainer(tmp_path, fast_dev_run=True, callbacks=[guard, probe]).fit(model)
    assert guard.stage2_done and guard.report["fast_dev_run"] is True
    assert [c["step"] for c in guard.report["checks"]] == [2]
    # before + proxy before + one check (score and proxy), one validation batch each; and the try of score_fn on
    # the first validation batch
    assert guard.report["validation_passes"] == 4 and guard_score.batches == 5
    assert save.read_bytes() == b"an earlier protected model" and report.read_text() == "{}"
    # The probes at the epoch's end and after stage 2: the live model and the merge on the own task, one batch each.
    assert len(probe.results) == 2 and probe_score.batches == 4


def test_probe_metrics_are_callback_metrics_that_model_checkpoint_can_monitor(tmp_path):
    # "Ordinary Lightning metrics": ModelCheckpoint/EarlyStopping read trainer.callback_metrics, which the probe's
    # values (logged from hooks where self.log is refused) had not joined.
    from lightning.pytorch.callbacks import ModelCheckpoint

    key = "mergeprobe/task_arithmetic@0.5/own/acc"
    probe = MergeProbe(
        donors=donor_states(),
        methods=["task_arithmetic"],
        coefficients=[0.5],
        progress=False,
        schedule=ProbeSchedule(every_n_steps=4, every_n_epochs=None, on_train_end=False, max_overhead=None),
    )
    best = ModelCheckpoint(dirpath=tmp_path, monitor=key, mode="min", save_top_k=1)
    t = trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=4,
        callbacks=[probe, best],
        enable_checkpointing=True,
    )
    t.fit(fresh_model())
    values = [r[key] for r in probe.results]
    assert len(values) == 3 and float(t.callback_metrics[key]) == pytest.approx(values[-1])
    assert float(best.best_model_score) == pytest.approx(min(values))
    assert f"epoch={values.index(min(values))}" in best.best_model_path


def test_donors_this_machine_cannot_hold_are_refused_before_loading(tmp_path, monkeypatch):
    """8 ranks on one host each hold every donor's task vectors: say so before the host runs out of memory."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    import lightning_mergeguard.callbacks._common as common

    weights = sum(p.numel() for p in fresh_model().parameters())
    monkeypatch.setattr(common, "available_bytes", lambda device: 2 * 4 * weights - 1)  # one float32 byte short
    probe = MergeProbe(donors=donor_states(2), eval_dataloaders=val_loader(), progress=False)
    with pytest.raises(MisconfigurationException, match=r"holding 2 donors' task vectors needs .* GiB on cpu"):
        trainer(tmp_path, max_steps=1, callbacks=[probe]).fit(fresh_model())
    probe = MergeProbe(eval_dataloaders=val_loader(), progress=False, donors=Donors(donor_states(2), dtype="bfloat16"))
    trainer(tmp_path, max_steps=1, callbacks=[probe]).fit(fresh_model())  # the remedy it names: half the bytes

    class EightRanks:
        num_devices = 8

    with pytest.raises(MisconfigurationException, match=r"8\.0 GiB on cpu \(1\.0 GiB in each of 8 processes\)"):
        common.refuse_unaffordable(1024**3, torch.device("cpu"), EightRanks(), "x", "y")


def test_a_torch_compiled_submodule_is_probed_and_saved_under_its_uncompiled_names(tmp_path):
    # torch.compile(submodule) names its weights 'net._orig_mod.0.weight': a donor or reference checkpoint of the
    # uncompiled network was refused ("donor 'd' has no tensor for parameter 'net._orig_mod.0.weight'"), and the
    # guard's save_path wrote the _orig_mod names, which the uncompiled model cannot load.
    from safetensors.torch import load_file

    results, saved = [], []
    for compiled in (False, True):
        pl.seed_everything(0)
        model = TinyClassifier()
        donor = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
        if compiled:
            model.net = torch.compile(model.net, backend="eager")
        probe = MergeProbe({"d": donor}, eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32), progress=False)
        path = tmp_path / f"protected{int(compiled)}.safetensors"
        guard = MergeGuardCallback(alpha=0.1, stage2=ScaleAdversarial(steps=4), save_path=str(path), progress=False)
        trainer(tmp_path, max_epochs=1, callbacks=[guard, probe]).fit(model)
        results.append(probe.results[-1])
        saved.append(load_file(path))
    assert set(saved[1]) == set(TinyClassifier().state_dict())  # loads into the uncompiled model
    assert all(torch.allclose(saved[0][k], saved[1][k], atol=1e-6) for k in saved[0])
    keys = [k for k in results[0] if "/acc" in k]
    assert keys and all(results[0][k] == results[1][k] for k in keys)


def test_a_donor_saved_from_a_ddp_wrapped_model_is_read_as_the_bare_one(tmp_path):
    # Checkpoints saved from DDP/DataParallel (open_clip's training checkpoints among them) prefix every key with
    # 'module.'; such a donor was refused ("has no tensor for parameter 'net.0.weight'").
    pl.seed_everything(0)
    model = TinyClassifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    donor = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in donor.items()}}, tmp_path / "ddp.pt")
    results = []
    for source in (donor, str(tmp_path / "ddp.pt")):
        model.load_state_dict(start)
        pl.seed_everything(1)
        probe = MergeProbe({"d": source}, eval_dataloaders=DataLoader(blobs(64, 1), batch_size=32), progress=False)
        trainer(tmp_path, max_steps=2, callbacks=[probe]).fit(model)
        results.append({k: v for k, v in probe.results[-1].items() if k != "mergeprobe/seconds"})
    assert results[0] == results[1]


class _BatchNormNet(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU()
        )


def test_batchnorm_running_statistics_are_merged_as_a_merge_of_the_checkpoints_merges_them(tmp_path):
    # The probe merged parameters only, so its merged models kept the owner's BatchNorm running statistics, where a
    # merge of the checkpoints (this engine, mergekit) merges them too: on this model the probe said 99.2% for a
    # merge that scores 89.1%. The engine also refused every such merge ("non-floating tensor
    # 'net.1.num_batches_tracked' differs").

    pl.seed_everything(0)
    model = _BatchNormNet()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    donor = _BatchNormNet()
    donor.load_state_dict(pre)
    shifted = blobs(256, 5)
    shifted.tensors = (shifted.tensors[0] * 3 + 2, shifted.tensors[1])
    trainer(tmp_path, max_epochs=2).fit(donor, DataLoader(shifted, batch_size=32, shuffle=True))
    donor_state = {k: v.clone() for k, v in donor.state_dict().items()}
    val = DataLoader(blobs(128, 1), batch_size=64)
    probe = MergeProbe({"d": donor_state}, eval_dataloaders=val, methods=["task_arithmetic", "ties"], progress=False)
    trainer(tmp_path, max_epochs=2, callbacks=[probe]).fit(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    for method, label in (("task_arithmetic", "task_arithmetic@0.3"), ("ties", "ties@0.3")):
        cfg = {
            "merge_method": method,
            "base_model": "base",
            "parameters": {"lambda": 0.3},
            "models": [
                {"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("own", "d")
            ],  # probe default
        }
        if method == "task_arithmetic":
            for m in cfg["models"]:
                del m["parameters"]["density"]
        merged = merge(cfg, {"own": live, "d": donor_state}, pre, check_base=False)
        assert any("running_var" in k for k in merged)
        offline = _BatchNormNet()
        offline.load_state_dict({k: merged[k].to(v.dtype) for k, v in live.items()})
        want = 100.0 * evaluate(offline, list(val), default_score)
        assert probe.results[-1][f"mergeprobe/{label}/own/acc"] == pytest.approx(want)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())  # restored bit for bit
    # A donor without the statistics: the probe warns and keeps the live ones (it does not fail).
    bare = {k: v for k, v in donor_state.items() if "running" not in k and "num_batches" not in k}
    model.load_state_dict(pre)
    alone = MergeProbe({"d": bare}, eval_dataloaders=val, progress=False)
    with pytest.warns(UserWarning, match="floating buffers .* keep the live model's values"):
        trainer(tmp_path, max_steps=2, callbacks=[alone]).fit(model)
    assert alone.results

"""The protection maths without a Trainer: the stage-1 term's gradient and the stage-2 strategies."""

from __future__ import annotations

import pytest
import torch
from _helpers import TinyClassifier, blobs
from torch.utils.data import DataLoader

from lightning_mergeguard import Negation, ScaleAdversarial
from lightning_mergeguard.protection.redistribution import add_redistribution_grad_, redistribution_term


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_reference", [False, True])
def test_redistribution_grad_equals_autograd(normalize, with_reference):
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(5))}
    ref = {k: torch.randn_like(v) for k, v in params.items()} if with_reference else None
    term = redistribution_term(params, ref, alpha=0.03, normalize=normalize)
    expected = torch.autograd.grad(term, list(params.values()))
    for compute_value in (True, False):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        value = add_redistribution_grad_(params, ref, alpha=0.03, normalize=normalize, compute_value=compute_value)
        if compute_value:
            assert value == pytest.approx(float(term.detach()), rel=1e-6)
        else:
            assert value is None
        for p, g in zip(params.values(), expected):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Negation(beta=0), "beta must be"),
        (lambda: Negation(critical_fraction=1.0), "critical_fraction must be"),
        (lambda: Negation(granularity="layer"), "granularity must be"),
        (lambda: ScaleAdversarial(scales=(0.3, 1.5)), "scales must be"),
        (lambda: ScaleAdversarial(drop_density=1.0), "drop_density must be"),
        (lambda: ScaleAdversarial(checks=0), "checks must be"),
        (
            lambda: ScaleAdversarial(deployed="int5-g32"),
            r"unknown weight format\(s\) \['int5-g32'\]; known: .*int4-g32",
        ),
        (lambda: ScaleAdversarial(deployed=[4]), "deployed must be weight format names"),
    ],
)
def test_strategies_validate_their_own_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _fine_tuned_context(metric=None):
    """A TinyClassifier fine-tuned away from its reference, and the stage-2 context of its body (tolerance 1.5).

    ``metric(score)`` wraps the validation accuracy (to count calls); returns ``(model, ctx, score)``.
    """
    import itertools

    from lightning_mergeguard.evaluation import default_loss, evaluate
    from lightning_mergeguard.protection.stage2 import Stage2Context

    torch.manual_seed(0)
    model = TinyClassifier()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = list(DataLoader(blobs(256, 0), batch_size=32))
    for batch in data * 5:  # a quick fine-tune away from the reference
        opt.zero_grad()
        default_loss(model, batch).backward()
        opt.step()
    val = list(DataLoader(blobs(128, 1), batch_size=64))
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head")}

    def score():
        return 100 * evaluate(model, val)

    scored = metric(score) if metric else score
    ctx = Stage2Context(
        module=model,
        params=params,
        reference={n: reference[n] for n in params},
        batches=itertools.cycle(data),
        metric=scored,
        loss_fn=default_loss,
        before=scored(),
        tolerance=1.5,
    )
    return model, ctx, score


def test_a_strategy_runs_without_a_trainer():
    """Stage 2 is a pure function of (module, params, reference, batches, metric): no Trainer needed."""
    calls = []

    def counted(score):
        return lambda: calls.append(1) or score()

    _, ctx, metric = _fine_tuned_context(counted)
    after, report = ScaleAdversarial(steps=24, lr=0.01).run(ctx)
    assert ctx.before - after <= 1.5 and after == pytest.approx(metric())
    assert report["merge_proxy_after"] <= report["merge_proxy_before"]
    assert len(calls) == 1 + 1 + 2 * 8  # before, proxy before, 8 checks


def _one_row_context():
    """A one-parameter context whose score reads ``w[0, 1] > 0.4`` (int4-g32 rounds 0.45 to 0 in a row of max 7)."""
    from torch import nn

    from lightning_mergeguard.protection.stage2 import Stage2Context

    w = nn.Parameter(torch.tensor([[7.0, 0.6] + [0.0] * 30]))
    warnings: list[str] = []
    ctx = Stage2Context(
        module=nn.ParameterDict({"w": w}),
        params={"w": w},
        reference={"w": torch.zeros_like(w)},
        batches=iter(()),
        metric=lambda: 100.0 if float(w.detach()[0, 1]) > 0.4 else 0.0,
        loss_fn=lambda module, batch: torch.zeros(()),
        before=100.0,
        tolerance=1.0,
        warn=warnings.append,
    )
    return w, ctx, warnings


@pytest.mark.parametrize(("deployed", "kept"), [((), 1), (("int4-g32",), 0)])
def test_the_guard_rail_holds_the_score_in_each_deployed_format(deployed, kept):
    """A step that keeps the full-precision score but loses it once quantized is kept only without ``deployed``."""
    from lightning_mergeguard.protection.stage2.base import _GuardRail

    w, ctx, warnings = _one_row_context()
    proxies = iter([50.0, 10.0])  # the stage-1 weights' merge proxy, then the step's (better protected)
    rail = _GuardRail(ctx, lambda: next(proxies), deployed)
    with torch.no_grad():
        w[0, 1] = 0.45  # 100 at full precision, 0 in int4-g32
    rail.check(1)
    score, report = rail.finish(1)
    assert report["steps_used"] == kept and score == 100.0
    assert float(w.detach()[0, 1]) == pytest.approx(0.45 if kept else 0.6)  # the kept weights are written back
    if deployed:
        assert report["deployed_before"] == {"int4-g32": 100.0} and report["deployed_after"] == {"int4-g32": 100.0}
        assert report["checks"][0]["deployed"] == {"int4-g32": 0.0}
        assert len(warnings) == 1 and "int4-g32 (stage-1 weights 100.0, best check 0.0)" in warnings[0]
        assert "NOT protected by stage 2" in warnings[0]
    else:
        assert warnings == []
        assert "deployed_before" not in report and "deployed" not in report["checks"][0]


def _scheduled_loop(w, values):
    """A stand-in optimising loop: step ``i`` writes ``values[i - 1]`` into ``w[0, 1]``, then checks as loops do."""

    def loop(batches, settings):
        for step, x in enumerate(values[: settings["steps"]], start=1):
            with torch.no_grad():
                w[0, 1] = x
            settings["history"].append({"own_loss": 0.0})
            if step % settings["check_every"] == 0 and settings["check"](step):
                break

    return loop


@pytest.mark.parametrize(
    ("deployed", "values", "run", "used", "short"),
    [
        ((), [0.45] * 4, 2, 1, None),  # no formats: exactly the steps asked for
        (("int4-g32",), [0.45, 0.45, 0.7, 0.45], 3, 3, {}),  # goes on until a check holds the format, and stops
        (("int4-g32",), [0.45] * 4, 4, 1, {"int4-g32": 0.0}),  # at most twice the steps, then says what it lost
    ],
)
def test_the_guard_rail_holds_formats_to_the_full_precision_score_not_only_the_stage1_weights(
    deployed, values, run, used, short
):
    """Stage 1 can cost under 4-bit: a check that holds a format at the full-precision score beats one that only
    matches the stage-1 weights there, the loop goes on for it, and a release that never gets there says so."""
    from lightning_mergeguard.protection.stage2.base import _guarded_loop

    w, ctx, warnings = _one_row_context()
    with torch.no_grad():
        w[0, 1] = 0.45  # the stage-1 weights: 100 at full precision, 0 in int4-g32
    proxies = iter([50.0] + [10.0] * 8)  # each step protects better than the stage-1 weights
    loop = _scheduled_loop(w, values)
    score, report, _ = _guarded_loop(ctx, lambda: next(proxies), 2, 2, loop, ("own_loss",), deployed)
    assert (report["steps_run"], report["steps_used"], score) == (run, used, 100.0)
    assert float(w.detach()[0, 1]) == pytest.approx(values[used - 1])  # the kept weights are written back
    assert report.get("deployed_short") == short
    if short:
        assert len(warnings) == 1 and "int4-g32 0.0, more than 1.0 points below the full-precision 100.0" in warnings[0]
        assert "after 4 steps (the stage-1 weights: int4-g32 0.0)" in warnings[0]
    else:
        assert warnings == []


def test_a_deployed_format_quantizes_the_whole_model_not_only_the_weights_stage2_changes():
    """Users quantize every matrix: a frozen one (embeddings, a head) that loses the score in int4 counts."""
    from lightning_mergeguard.protection.stage2.base import _GuardRail

    w, ctx, _ = _one_row_context()
    v = torch.nn.Parameter(torch.ones(2, 32))
    with torch.no_grad():
        w[0, 1] = 0.45  # frozen at a value int4-g32 rounds to 0
    ctx.module = torch.nn.ParameterDict({"w": w, "v": v})
    ctx.params = {"v": v}  # stage 2 changes only v
    rail = _GuardRail(ctx, lambda: 50.0, ("int4-g32",))
    assert rail.deployed_before == {"int4-g32": 0.0} and float(w.detach()[0, 1]) == pytest.approx(0.45)


@pytest.mark.parametrize("strategy", ["scale_adversarial", "merge_neighbourhood"])
def test_stage2_trains_against_a_deployed_format_and_keeps_full_precision_weights(strategy):
    """``deployed=``: the own loss is also taken in the format (logged), the rail scores it, the weights stay float."""
    from lightning_mergeguard.protection.stage2 import resolve_stage2
    from lightning_mergeguard.quantization import int4_groups, treated_state

    model, ctx, metric = _fine_tuned_context()

    def metric_in(fmt):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(treated_state(saved, fmt))
        try:
            return metric()
        finally:
            model.load_state_dict(saved)

    stage1_int4 = metric_in("int4-g32")
    head = model.head.weight.detach().clone()  # not a stage-2 parameter: quantized in each deployed step, then put back
    after, report = resolve_stage2(strategy, steps=8, lr=0.01, checks=4, deployed="int4-g32").run(ctx)
    assert torch.equal(model.head.weight, head)
    assert report["deployed_before"]["int4-g32"] == pytest.approx(stage1_int4)
    assert all(set(c["deployed"]) == {"int4-g32"} for c in report["checks"])
    # 8 steps, or up to 8 more until a check holds int4-g32 within the tolerance of the full-precision score
    assert report["steps_run"] in (8, 10, 12, 14, 16) and len(report["checks"]) == report["steps_run"] // 2
    assert report["steps_run"] == 16 or not report["deployed_short"]
    assert report["deployed_loss_first"] is not None and report["deployed_loss_last"] is not None
    assert after == pytest.approx(metric())  # the kept weights are live, and the model restored to them
    assert report["deployed_after"]["int4-g32"] == pytest.approx(metric_in("int4-g32"))
    assert stage1_int4 - metric_in("int4-g32") <= 1.5
    w = ctx.params["net.0.weight"]
    assert not torch.equal(w, int4_groups(w.detach()))  # straight-through: the weights are not left quantized

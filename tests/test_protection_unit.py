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
    ],
)
def test_strategies_validate_their_own_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_strategy_runs_without_a_trainer():
    """Stage 2 is a pure function of (module, params, reference, batches, metric): no Trainer needed."""
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
    calls = []

    def metric():
        calls.append(1)
        return 100 * evaluate(model, val)

    before = metric()
    ctx = Stage2Context(
        module=model,
        params=params,
        reference={n: reference[n] for n in params},
        batches=itertools.cycle(data),
        metric=metric,
        loss_fn=default_loss,
        before=before,
        tolerance=1.5,
    )
    after, report = ScaleAdversarial(steps=24, lr=0.01).run(ctx)
    assert before - after <= 1.5 and after == pytest.approx(metric())
    assert report["merge_proxy_after"] <= report["merge_proxy_before"]
    assert len(calls) == 1 + 1 + 2 * 8 + 1  # before, proxy before, 8 checks, and the metric() above

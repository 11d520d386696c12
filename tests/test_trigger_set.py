"""The trigger-set fingerprint: an exact black-box test for classifiers, calibrated under its null."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_mergeguard.ownership import TriggerSet
from lightning_mergeguard.ownership.stats import binomial_tail


def test_make_draws_noise_and_uniform_labels_reproducibly():
    a = TriggerSet.make(256, (3, 4, 4), classes=10, seed=3)
    b = TriggerSet.make(256, (3, 4, 4), classes=10, seed=3)
    c = TriggerSet.make(256, (3, 4, 4), classes=10, seed=4)
    assert a.inputs.shape == (256, 3, 4, 4) and a.labels.shape == (256,)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    assert float(a.inputs.min()) >= 0.0 and float(a.inputs.max()) <= 1.0
    assert set(a.labels.tolist()) == set(range(10))  # every class drawn among 256
    assert TriggerSet.make(8, (2,), classes=3).labels.max() < 3  # a secret seed from the operating system


@pytest.mark.parametrize("predictor", ["constant", "random", "input-dependent"])
def test_under_the_null_the_p_value_is_calibrated_whatever_the_suspect_predicts(predictor):
    """A suspect made without the labels: P(p <= a) <= a for every level, here over 2,000 secret draws."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 10))
    inputs = torch.rand(32, 16, generator=g)

    def predict(x):
        if predictor == "constant":
            return torch.full((len(x),), 7)
        if predictor == "random":
            return torch.randint(10, (len(x),), generator=g)
        return net(x)

    p = torch.tensor(
        [TriggerSet(inputs, torch.randint(10, (32,), generator=g), 10).test(predict).p_value for _ in range(2000)]
    )
    for level in (0.01, 0.05, 0.2):
        assert float((p <= level).float().mean()) <= level + 0.015  # binomial slack of 2,000 draws


def test_a_classifier_trained_on_the_triggers_is_caught_and_the_count_is_exact():
    torch.manual_seed(0)
    triggers = TriggerSet.make(64, (16,), classes=10, seed=1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        for x, y in triggers.batches(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.train()
    result = triggers.test(model)
    assert model.training  # queried in eval mode, its mode given back
    assert result.matches == int((model(triggers.inputs).argmax(-1) == triggers.labels).sum()) >= 60
    assert result.p_value == binomial_tail(result.matches, 64, 0.1) < 1e-40
    # the same through an API that answers class indices
    assert triggers.test(lambda x: model(x).argmax(-1)).matches == result.matches


def test_save_and_load_round_trip_and_refuse_other_files(tmp_path):
    triggers = TriggerSet.make(10, (2, 3), classes=4, seed=0)
    triggers.save(tmp_path / "t.safetensors")
    back = TriggerSet.load(tmp_path / "t.safetensors")
    assert torch.equal(back.inputs, triggers.inputs) and torch.equal(back.labels, triggers.labels)
    assert back.classes == 4
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="is not a trigger set"):
        TriggerSet.load(tmp_path / "w.safetensors")


def test_the_dataset_and_batches_feed_training_and_keep_batches():
    triggers = TriggerSet.make(10, (4,), classes=3, seed=0)
    data = triggers.dataset(repeats=3)
    assert len(data) == 30 and torch.equal(data[10][0], triggers.inputs[0])
    assert [len(y) for _, y in triggers.batches(4)] == [4, 4, 2]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TriggerSet(torch.rand(4, 2), torch.tensor([0, 1, 2, 5]), 3), r"labels must be integers in \[0, 3\)"),
        (lambda: TriggerSet(torch.rand(4, 2), torch.tensor([0, 1]), 3), "labels must be"),
        (lambda: TriggerSet(torch.rand(4, 2), torch.tensor([0, 1, 0, 1]), 1), "classes must be an integer >= 2"),
        (lambda: TriggerSet(torch.zeros(4, 2, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2), "float tensor"),
        (lambda: TriggerSet.make(0, (2,), classes=3), "n must be a positive integer"),
    ],
)
def test_bad_trigger_sets_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_suspect_that_answers_fewer_triggers_is_refused():
    triggers = TriggerSet.make(8, (2,), classes=3, seed=0)
    with pytest.raises(ValueError, match="answered 4 of 8 triggers"):
        triggers.test(lambda x: torch.zeros(4, dtype=torch.long))
